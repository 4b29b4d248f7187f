"""Tests for ctfgen.hierarchy: clustering methods, the artifact, the redundancy test and auto K."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from ctfgen.artifacts import ArtifactError
from ctfgen.errors import CtfgenError
from ctfgen.hierarchy import (
    Hierarchy,
    analyze_redundancy,
    build_hierarchy,
    check_compatible,
    choose_k,
    cluster_codebook,
    load_hierarchy,
    save_hierarchy,
    write_redundancy_report,
)
from ctfgen.hierarchy.cluster import agglomerative, balanced, kmeans, random_partition
from ctfgen.hierarchy.redundancy import nearest_other, swap_random, swap_within_cluster
from ctfgen.tokenizer.model import VQConfig, VQTokenizer, save_tokenizer

METHODS = ["kmeans", "balanced", "agglomerative", "random"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # many small ops: one thread is faster than two on a shared 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def planted(k: int = 8, per: int = 40, noise: float = 0.03, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on the sphere in k tight, well-separated groups (the centres are nearly orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:k]
    truth = torch.arange(k).repeat_interleave(per)
    x = F.normalize(centres[truth] + noise * torch.randn(k * per, 16, generator=g), dim=1)
    return x, truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to relabelling: the pairs (a_i, b_i) define a bijection."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def assert_valid_partition(labels: torch.Tensor, n: int, k: int) -> None:
    assert labels.shape == (n,) and labels.dtype == torch.long
    assert labels.min() >= 0 and labels.max() < k
    assert (torch.bincount(labels, minlength=k) > 0).all()


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> VQTokenizer:
    torch.manual_seed(0)
    cfg = VQConfig(image_size=16, in_channels=1, base_channels=8, channel_mult=[1, 2], norm_groups=4,
                   z_channels=8, codebook_size=64, attention=False)
    tok = VQTokenizer(cfg).eval()
    save_tokenizer(tok, tmp_path_factory.mktemp("tok"))  # sets the fingerprint
    return tok


@pytest.fixture(scope="module")
def tiny_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    # smooth-ish images: upsampled noise, in [-1, 1]
    return F.interpolate(torch.rand(6, 1, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")


# --- clustering ----------------------------------------------------------------------------------

def test_kmeans_recovers_planted_clusters():
    x, truth = planted()
    c = kmeans(x, 8, seed=0)
    assert same_partition(c.labels, truth)
    assert c.method == "kmeans" and c.K == 8 and c.iterations >= 1


def test_kmeans_with_faiss_recovers_planted_clusters_too():
    pytest.importorskip("faiss")  # the optional backend (ctfgen[faiss]; part of the test extras)
    x, truth = planted()
    c = kmeans(x, 8, seed=0, backend="faiss")
    assert same_partition(c.labels, truth) and c.method == "kmeans" and c.K == 8
    assert torch.equal(c.labels, kmeans(x, 8, seed=0, backend="faiss").labels)  # a seed fixes it
    assert c.inertia == pytest.approx(kmeans(x, 8, seed=0).inertia, rel=1e-4)
    assert len(c.inertia_history) == c.iterations


def test_the_faiss_backend_without_faiss_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(CtfgenError, match="needs faiss \\(pip install faiss-cpu\\)"):
        kmeans(unit(100), 4, backend="faiss")


@pytest.mark.parametrize("method", ["balanced", "agglomerative"])
def test_other_methods_recover_planted_clusters(method):
    x, truth = planted()
    assert same_partition(cluster_codebook(x, method, 8, seed=0).labels, truth)


def test_kmeans_deterministic_for_a_seed():
    x = unit(1000)
    a, b = kmeans(x, 20, seed=3), kmeans(x, 20, seed=3)
    assert torch.equal(a.labels, b.labels) and a.inertia == b.inertia and a.inertia_history == b.inertia_history


def test_kmeans_inertia_never_increases():
    c = kmeans(unit(2000, seed=1), 32, seed=0, tol=0.0)
    h = c.inertia_history
    assert len(h) > 5
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(h, h[1:]))
    assert c.inertia <= h[-1] * (1 + 1e-9)  # final means only improve on the last assignment


def test_kmeans_reseeds_empty_clusters():
    # 3 distinct points, 20 copies each, 5 clusters: seeding must repeat points and leave clusters empty
    x = F.normalize(torch.eye(8)[:3], dim=1).repeat_interleave(20, 0)
    c = kmeans(x, 5, seed=0)
    assert_valid_partition(c.labels, 60, 5)
    assert c.inertia == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_a_valid_partition(method):
    x = unit(256, seed=2)
    c = cluster_codebook(x, method, 16, seed=0)
    assert_valid_partition(c.labels, 256, 16)
    assert c.method == method and math.isfinite(c.inertia)
    if method in ("balanced", "random"):
        assert (c.sizes == 16).all()
    json.dumps(c.params)  # params go into config.json


def test_random_partition_sizes_differ_by_at_most_one():
    c = random_partition(unit(100), 7, seed=0)
    assert_valid_partition(c.labels, 100, 7)
    assert c.sizes.max() - c.sizes.min() <= 1


def test_agglomerative_is_exact_average_linkage():
    scipy_hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    x = F.normalize(unit(200, seed=4).double(), dim=1)
    z = scipy_hierarchy.linkage(x.numpy(), method="average", metric="cosine")
    from ctfgen.hierarchy.cluster import _average_linkage_cosine
    heights = sorted(h for h, _, _ in _average_linkage_cosine(x))
    assert max(abs(a - b) for a, b in zip(heights, sorted(z[:, 2]))) < 1e-9
    ref = torch.as_tensor(scipy_hierarchy.fcluster(z, 10, criterion="maxclust"))
    assert same_partition(agglomerative(x, 10).labels, ref)


def test_agglomerative_euclidean_via_scipy():
    pytest.importorskip("scipy")
    c = agglomerative(unit(120, seed=5), 12, metric="euclidean")
    assert_valid_partition(c.labels, 120, 12)


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_raise(method):
    x = unit(64)
    with pytest.raises(ValueError, match="at least 1"):
        cluster_codebook(x, method, 0)
    with pytest.raises(ValueError, match="larger than"):
        cluster_codebook(x, method, 65)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cluster_codebook(x[0], method, 4)
    with pytest.raises(ValueError, match="integer"):
        cluster_codebook(x, method, 4.0)


def test_balanced_needs_k_dividing_v_and_unknown_method():
    with pytest.raises(ValueError, match="divide"):
        balanced(unit(64), 6)
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster_codebook(unit(64), "spectral", 4)


# --- the artifact --------------------------------------------------------------------------------

def test_hierarchy_round_trip(tmp_path, tiny_tokenizer):
    h = build_hierarchy(tiny_tokenizer, "kmeans", 8, seed=0)
    save_hierarchy(h, tmp_path / "h")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["kind"] == "hierarchy" and config["K"] == 8 and config["V"] == 64
    assert config["tokenizer_fingerprint"] == tiny_tokenizer.fingerprint
    assert sum(int(s) * n for s, n in config["cluster_sizes"]["histogram"].items()) == 64

    loaded = load_hierarchy(tmp_path / "h", tokenizer=tiny_tokenizer)
    assert torch.equal(loaded.coarse_of, h.coarse_of) and loaded.fingerprint == h.fingerprint
    assert (loaded.K, loaded.V, loaded.method, loaded.seed) == (8, 64, "kmeans", 0)
    seen = torch.cat([loaded.members(k) for k in range(loaded.K)])
    assert torch.equal(seen.sort().values, torch.arange(64))
    for k in range(loaded.K):
        assert (loaded.coarse_of[loaded.members(k)] == k).all()
    expected = loaded.coarse_of[None, :] == torch.arange(8)[:, None]
    assert loaded.member_mask.dtype == torch.bool and torch.equal(loaded.member_mask, expected)


def test_to_coarse_any_shape():
    h = Hierarchy(torch.tensor([2, 0, 1, 0, 2, 1]))
    for codes in (torch.tensor([0, 5, 3]), torch.tensor([[1, 2], [3, 4]]), torch.arange(6).view(1, 2, 3)):
        out = h.to_coarse(codes)
        assert out.shape == codes.shape and torch.equal(out, h.coarse_of[codes])
    assert torch.equal(h.to_coarse(torch.tensor([4, 0], dtype=torch.int32)), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="integer"):
        h.to_coarse(torch.tensor([0.0]))


def test_hierarchy_rejects_empty_clusters_and_bad_labels():
    with pytest.raises(ValueError, match="empty"):
        Hierarchy(torch.tensor([0, 0, 2]))
    with pytest.raises(ValueError, match="lie in"):
        Hierarchy(torch.tensor([0, 1, 3]), K=2)


def test_fingerprint_and_codebook_size_checks(tmp_path, tiny_tokenizer):
    h = Hierarchy(torch.arange(64) % 8, tokenizer_fingerprint="abc123")
    save_hierarchy(h, tmp_path / "h")
    with pytest.raises(ArtifactError, match="made from tokenizer abc123, but the tokenizer has fingerprint"):
        load_hierarchy(tmp_path / "h", tokenizer=tiny_tokenizer)
    with pytest.raises(ArtifactError, match="V=64 but the code array uses a codebook of 16384"):
        load_hierarchy(tmp_path / "h", codebook_size=16384)
    with pytest.raises(ArtifactError, match="fingerprint def"):
        load_hierarchy(tmp_path / "h", fingerprint="def")
    check_compatible(h, fingerprint="abc123", codebook_size=64)  # fits: no error
    with pytest.raises(ArtifactError, match="V=64"):
        check_compatible(h, codebook_size=4096)


def test_loading_a_wrong_or_corrupt_folder(tmp_path, tiny_tokenizer):
    save_tokenizer(tiny_tokenizer, tmp_path / "tok")
    with pytest.raises(ArtifactError, match="expected 'hierarchy'"):
        load_hierarchy(tmp_path / "tok")
    from ctfgen.artifacts import save_artifact
    h = Hierarchy(torch.arange(64) % 8)
    save_artifact(tmp_path / "bad", h.config(), {"coarse_of": h.coarse_of, "offsets": h.offsets,
                                                 "indices": h.indices.flip(0)})
    with pytest.raises(ArtifactError, match="corrupt"):
        load_hierarchy(tmp_path / "bad")


# --- the redundancy test -------------------------------------------------------------------------

def test_swaps():
    h = Hierarchy(torch.tensor([0, 0, 0, 1, 1, 2]))  # codeword 5 is alone in cluster 2
    codes = torch.tensor([0, 1, 2, 3, 4, 5] * 50).view(10, 5, 6)
    within = swap_within_cluster(codes, h, torch.Generator().manual_seed(0))
    assert torch.equal(h.to_coarse(within), h.to_coarse(codes))
    assert ((within != codes) | (codes == 5)).all() and (within[codes == 5] == 5).all()
    rand = swap_random(codes, 6, torch.Generator().manual_seed(0))
    assert (rand != codes).all() and rand.max() < 6
    nn = nearest_other(unit(50))
    assert (nn != torch.arange(50)).all()


def test_redundancy_on_a_tiny_tokenizer(tmp_path, tiny_tokenizer, tiny_images):
    hs = [build_hierarchy(tiny_tokenizer, "kmeans", 8), Hierarchy(torch.arange(64), method="singletons",
                                                                  tokenizer_fingerprint=tiny_tokenizer.fingerprint)]
    report = analyze_redundancy(tiny_tokenizer, tiny_images, hs, seed=0)
    for stats in [report["random"], report["nearest"]] + [row["within"] for row in report["hierarchies"]]:
        assert all(math.isfinite(v) for v in stats.values())
    assert report["random"]["tokens_changed"] == 1.0
    singles = report["hierarchies"][1]["within"]  # K = V: no other member, nothing changes
    assert singles["tokens_changed"] == 0.0 and singles["mse_vs_plain"] == 0.0 and singles["feature_distance"] == 0.0
    assert singles["psnr_vs_plain"] == report["psnr_cap_db"]
    assert singles["psnr_vs_original"] == pytest.approx(report["plain"]["psnr_vs_original"])
    again = write_redundancy_report(tmp_path, tiny_tokenizer, tiny_images, hs, seed=0, n_show=4)
    assert json.loads((tmp_path / "redundancy.json").read_text())["hierarchies"] == report["hierarchies"] == again["hierarchies"]
    assert (tmp_path / "redundancy.png").stat().st_size > 0


def test_redundancy_refuses_a_foreign_hierarchy(tiny_tokenizer, tiny_images):
    with pytest.raises(ArtifactError, match="V=128"):
        analyze_redundancy(tiny_tokenizer, tiny_images, [Hierarchy(torch.arange(128) % 4)])


# --- auto K --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tolerance", [0.05, 0.5])  # not met up to V/2 / met at a small K
def test_choose_k_picks_the_smallest_k_under_the_noise_floor(tiny_tokenizer, tiny_images, tolerance):
    auto = choose_k(tiny_tokenizer, tiny_images, tolerance=tolerance)
    assert auto.K in (2, 4, 8, 16, 32) and [row["K"] for row in auto.curve] == [2 ** i for i in range(1, len(auto.curve) + 1)]
    passed = [row["within_mse"] <= tolerance * auto.recon_mse for row in auto.curve]
    assert passed[:-1] == [False] * (len(passed) - 1) and passed[-1] == auto.met
    assert_valid_partition(auto.clustering.labels, 64, auto.K)


def test_build_hierarchy_auto(tiny_tokenizer, tiny_images):
    h = build_hierarchy(tiny_tokenizer, k="auto", images=tiny_images)
    assert h.params["k_selection"]["K"] == h.K and h.tokenizer_fingerprint == tiny_tokenizer.fingerprint
    json.dumps(h.config())
    with pytest.raises(ValueError, match="images"):
        build_hierarchy(tiny_tokenizer, k="auto")
