"""`ctfgen evaluate` on PNG folders, .npz files and toy runs; `ctfgen bench` at a toy budget. CPU, synthetic data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.errors import CtfgenError
from ctfgen.evaluate import Reference, add_evaluate_args, cmd_evaluate, evaluate_source, load_png_folder
from ctfgen.metrics.classifier import train_classifier
from test_demo import fake_fashion_mnist
from test_sampling import CLASSES


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fm")


@pytest.fixture(scope="module")
def classifier(fm: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("clf") / "classifier"
    train_classifier(out=str(out), data_dir=str(fm), epochs=1, limit=128, eval_limit=32, width=8, device="cpu")
    return str(out)


@pytest.fixture()
def ref(fm: Path, tmp_path: Path) -> Reference:
    return Reference("fashion-mnist", "test", None, str(fm), str(tmp_path / "cache"))


def random_images(n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)


def check_labelled(result: dict, n: int) -> dict:
    m = result["metrics"]["domain"]
    assert m["fid_label"] == "FID (domain features)" and m["is_label"] == "IS (domain features)"
    assert np.isfinite(m["fid"]) and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert result["samples"] == m["n"] == n and result["labels"]["domain"]["fid"] == "FID (domain features)"
    assert result["command"] and result["date"]
    return m


def test_png_folder_with_class_subfolders(tmp_path: Path, classifier: str, ref: Reference) -> None:
    images = random_images(20)
    for i, a in enumerate(images):
        (tmp_path / "pngs" / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(tmp_path / "pngs" / str(i % 10) / f"{i:03d}.png")
    loaded = load_png_folder(tmp_path / "pngs")
    assert loaded.images.shape == (20, 1, 32, 32) and float(loaded.images.min()) >= -1
    out = tmp_path / "m.json"
    result = evaluate_source(tmp_path / "pngs", [("domain", {"path": classifier})], ref, out)
    m = check_labelled(json.loads(out.read_text()), 20)
    assert 0 <= m["class_consistency"] <= 1 and "is_mean" in m
    assert result["source"]["type"] == "png-folder"


def test_npz_through_the_command(tmp_path: Path, classifier: str, ref: Reference) -> None:
    np.savez(tmp_path / "set.npz", random_images(12))  # unnamed: arr_0, the layout of ADM's sample batches
    parser = argparse.ArgumentParser()
    add_evaluate_args(parser)
    out = tmp_path / "m.json"
    args = parser.parse_args([str(tmp_path / "set.npz"), "--out", str(out), "--extractor", "domain", "--classifier",
                              classifier, "--data-dir", ref.data_dir, "--cache-dir", ref.cache_dir])
    cmd_evaluate(args)
    m = check_labelled(json.loads(out.read_text()), 12)
    assert "class_consistency" not in m  # no labels in the file


def test_npz_layouts(tmp_path: Path) -> None:
    from ctfgen.evaluate import load_npz

    np.savez(tmp_path / "ours.npz", images=random_images(3), labels=np.array([0, 1, 2]))
    np.savez(tmp_path / "adm.npz", random_images(3, 8)[..., None].repeat(3, -1))  # arr_0 [N, H, W, 3]
    ours, adm = load_npz(tmp_path / "ours.npz"), load_npz(tmp_path / "adm.npz")
    assert ours.images.shape == (3, 1, 32, 32) and ours.labels.tolist() == [0, 1, 2]
    assert adm.images.shape == (3, 3, 8, 8) and adm.labels is None and adm.images.min() >= -1


@pytest.mark.parametrize("kind", ["ctf", "baseline"])
def test_a_run_is_sampled_per_class(run_dir: Path, classifier: str, ref: Reference, kind: str) -> None:
    result = evaluate_source(run_dir, [("domain", {"path": classifier})], ref, kind=kind, per_class=2, seed=3)
    m = check_labelled(result, 2 * CLASSES)
    assert result["source"]["kind"] == kind and result["source"]["seed"] == 3
    assert 0 <= m["class_consistency"] <= 1


def test_reference_statistics_files(tmp_path: Path, classifier: str, ref: Reference) -> None:
    """ctfgen's own file round-trips; pytorch-fid's (mu, sigma) and ADM's (+ arr_0 images) layouts load."""
    from dataclasses import replace as with_

    from ctfgen.metrics import get_extractor
    from ctfgen.metrics.fid import load_stats_file

    np.savez(tmp_path / "set.npz", images=random_images(30))
    spec = [("domain", {"path": classifier})]
    saved = evaluate_source(tmp_path / "set.npz", spec, with_(ref, save_stats=str(tmp_path / "ours.npz")))
    again = evaluate_source(tmp_path / "set.npz", spec, with_(ref, stats_file=str(tmp_path / "ours.npz")))
    assert again["metrics"]["domain"]["fid"] == pytest.approx(saved["metrics"]["domain"]["fid"])
    assert again["metrics"]["domain"]["recall"] == saved["metrics"]["domain"]["recall"]

    extractor = get_extractor("domain", path=classifier)
    with np.load(tmp_path / "ours.npz") as f:
        mu, sigma = f["mu"], f["sigma"]
    np.savez(tmp_path / "pytorch-fid.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, arr_0=random_images(20)[..., None])
    plain = evaluate_source(tmp_path / "set.npz", spec, with_(ref, stats_file=str(tmp_path / "pytorch-fid.npz")))
    assert plain["metrics"]["domain"]["fid"] == pytest.approx(saved["metrics"]["domain"]["fid"])
    assert plain["metrics"]["domain"]["precision"] is None  # no reference images: no precision/recall
    assert len(load_stats_file(tmp_path / "adm.npz", extractor).features) == 20  # features of ADM's images
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(7), sigma=np.eye(7))
    with pytest.raises(CtfgenError, match="7-dimensional statistics"):
        load_stats_file(tmp_path / "wrong.npz", extractor)
    with pytest.raises(CtfgenError, match="exactly one --extractor"):
        evaluate_source(tmp_path / "set.npz", spec * 2, with_(ref, save_stats=str(tmp_path / "two.npz")))


def test_samples_are_quantised_before_scoring(classifier: str, ref: Reference) -> None:
    """Float samples score as their PNGs would: off-grid values are rounded to uint8 levels first."""
    from ctfgen.data.transforms import to_uint8, uint8_to_float
    from ctfgen.evaluate import score
    from ctfgen.metrics import get_extractor

    extractor = get_extractor("domain", path=classifier)
    quantised = uint8_to_float(random_images(40))
    off_grid = quantised + 0.3 / 127.5 * torch.rand(quantised.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(uint8_to_float(to_uint8(off_grid)), quantised)
    assert score(off_grid, None, extractor, ref)["fid"] == score(quantised, None, extractor, ref)["fid"]
