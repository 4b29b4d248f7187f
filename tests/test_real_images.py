"""Real data: photos from scikit-image through the vq-16 layout, and a slice of Fashion-MNIST end to end."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ctfgen
from ctfgen.cli import main
from ctfgen.data.codes import CodeDataset
from ctfgen.data.datasets import FASHION_MNIST_DIR
from ctfgen.data.transforms import ImageTransform
from ctfgen.tokenizer.model import VQTokenizer
from ctfgen.tokenizer.presets import preset_config

skimage_data = pytest.importorskip("skimage.data")


def test_vq16_encodes_and_decodes_real_photos():
    transform = ImageTransform(256, 3)
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]
    x = torch.stack([transform(Image.fromarray(p)) for p in photos])
    torch.manual_seed(0)
    model = VQTokenizer(preset_config("vq-16")).eval()
    codes = model.encode(x)
    assert codes.shape == (3, 16, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16384
    assert torch.equal(model.encode(x), codes)  # deterministic
    images = model.decode(codes[:1])
    assert images.shape == (1, 3, 256, 256) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and torch.isfinite(images).all()
    assert torch.equal(model.decode(codes[:1]), images)


fmnist = pytest.mark.skipif(not Path(os.environ.get("CTFGEN_FASHION_MNIST", FASHION_MNIST_DIR)).is_dir(),
                            reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")


@fmnist
def test_fashion_mnist_slice_through_the_cli(tmp_path, capsys):
    out = tmp_path / "tok"
    main(["train-tokenizer", "--out", str(out), "--steps", "40", "--batch-size", "64", "--report-limit", "500",
          "--quiet", "--save-every", "20"])
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 500 and report["steps"] == 40
    assert report["psnr_db"] > 14  # an untrained tokenizer gives about 6 dB here
    tok = ctfgen.load_tokenizer(out)
    assert tok.fingerprint == report["fingerprint"]

    main(["extract", "--tokenizer", str(out), "--out", str(tmp_path / "codes"), "--split", "test", "--quiet"])
    codes = CodeDataset(tmp_path / "codes")
    assert len(codes) == 10_000 and codes.grid == (8, 8) and codes.num_classes == 10
    assert codes.meta["tokenizer_fingerprint"] == tok.fingerprint
    assert np.bincount(codes.labels).tolist() == [1000] * 10
    assert int(codes.codes.max()) < 4096

    # resume picks up at the checkpoint and runs only the missing steps
    main(["train-tokenizer", "--out", str(out), "--steps", "50", "--batch-size", "64", "--report-limit", "100",
          "--quiet", "--resume"])
    assert json.loads((out / "report.json").read_text())["steps"] == 50


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["extract", "--tokenizer", str(tmp_path / "nope"), "--out", str(tmp_path / "c")])
    assert e.value.code == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-tokenizer", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "t")])
    assert "missing.npz not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-tokenizer", "--data", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "t")])
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_photo_patches_make_a_second_dataset_the_bench_reads(tmp_path, monkeypatch):
    """benchmarks/photo_patches.py: one class per shipped photo, photos_{train,test}.npz files that
    build_dataset finds by their names, every class equally often, crops differing within a class."""
    import runpy
    import sys

    from ctfgen.data.datasets import build_dataset, dataset_labels

    monkeypatch.setattr(sys, "argv", ["photo_patches.py", "--out", str(tmp_path), "--train-per-class", "4",
                                      "--test-per-class", "2"])
    runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "photo_patches.py"), run_name="__main__")
    train, test = (build_dataset(str(tmp_path / "photos.npz"), split) for split in ("train", "test"))  # the pair
    assert np.bincount(dataset_labels(train)).tolist() == [4] * 9
    assert np.bincount(dataset_labels(test)).tolist() == [2] * 9
    assert train[0][0].shape == (1, 32, 32)  # read as grey by the small tokenizer's transform
    with np.load(tmp_path / "photos_train.npz") as f:
        images = f["images"]
    assert images.shape == (36, 32, 32, 3) and not np.array_equal(images[0], images[1])
    monkeypatch.setattr(sys, "argv", ["photo_patches.py", "--out", str(tmp_path / "big"), "--size", "100"])
    with pytest.raises(SystemExit) as stop:  # argparse's one error line, before anything is written
        runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "photo_patches.py"), run_name="__main__")
    assert stop.value.code == 2 and not (tmp_path / "big").exists()
