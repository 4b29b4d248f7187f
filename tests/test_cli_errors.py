"""Every command, given bad input of every kind, ends in one `error:` line with exit status 2, no
traceback, and leaves the artifacts it was pointed at byte-identical. In-process, tiny fixtures."""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.artifacts import save_artifact
from ctfgen.cli import main
from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.hierarchy.redundancy import REPORT_KIND
from ctfgen.metrics.classifier import KIND as CLASSIFIER_KIND, ClassifierConfig, DomainClassifier
from ctfgen.outputs import open_output
from ctfgen.pipeline import SAMPLES_KIND
from ctfgen.tokenizer.model import TOKENIZER_KIND, save_tokenizer
from ctfgen.transformer import save_model
from test_demo import fake_fashion_mnist
from test_sampling import K, V, random_model, tiny_tokenizer
from test_training import write_codes


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run (tokenizer, hierarchy, three models), codes, a classifier and other finished outputs, plus bad files."""
    root = tmp_path_factory.mktemp("fixtures")
    run = root / "run"
    tok = tiny_tokenizer()
    open_output(run / "tokenizer", TOKENIZER_KIND).write(lambda f: save_tokenizer(tok, f))  # written the new way
    save_hierarchy(Hierarchy(torch.arange(V) % K, K, tokenizer_fingerprint=tok.fingerprint), run / "hierarchy")  # the old
    for i, role in enumerate(("coarse", "refiner", "baseline")):
        save_model(random_model(role, seed=i), run / role)
    write_codes(root / "codes", fingerprint=tok.fingerprint)
    save_hierarchy(Hierarchy(torch.arange(16) % K, K, tokenizer_fingerprint=tok.fingerprint), root / "hierarchy-v16")
    clf = DomainClassifier(ClassifierConfig(channels=1, resolution=16, num_classes=5, width=4))
    save_artifact(root / "classifier", {"kind": CLASSIFIER_KIND, "model": vars(clf.config), "classes": []},
                  clf.state_dict())
    open_output(root / "redundancy", REPORT_KIND).write(lambda f: (f / "redundancy.json").write_text("{}"))
    open_output(root / "pngs", SAMPLES_KIND).write(lambda f: Image.new("L", (16, 16)).save(f / "00000_class0.png"))
    fake_fashion_mnist(root / "fm", n_train=32, n_test=16)
    (root / "a-file.txt").write_text("not a folder")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "broken.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    (root / "garbage.npz").write_bytes(b"neither zip nor numpy")
    (root / "one-image" / "cat").mkdir(parents=True)
    Image.new("L", (16, 16)).save(root / "one-image" / "cat" / "x.png")
    torch.save({"model": {}, "where": Path("/tmp")}, root / "unsafe.pt")  # unpickling it would build a PosixPath
    np.savez(root / "stats7.npz", mu=np.zeros(7), sigma=np.eye(7))  # statistics of a 7-feature space
    return root


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def read_only_dir() -> str:
    """A folder even root cannot write into (sysfs), or skip."""
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pass
    except OSError:
        return "/sys"
    pytest.skip("no read-only location on this machine")


RUN = "{root}/run"
TRAIN = ["train", "--codes", "{root}/codes", "--hierarchy", f"{RUN}/hierarchy", "--size", "tiny", "--batch-size", "8",
         "--steps", "2", "--device", "cpu", "--quiet"]
TOKENIZER = ["train-tokenizer", "--data-dir", "{root}/fm", "--steps", "2", "--batch-size", "8", "--device", "cpu", "--quiet"]
CLASSIFIER = ["train-classifier", "--data-dir", "{root}/fm", "--epochs", "1", "--device", "cpu"]
EXTRACT = ["extract", "--tokenizer", f"{RUN}/tokenizer", "--data-dir", "{root}/fm", "--device", "cpu", "--quiet"]
CLUSTER = ["cluster", "--tokenizer", f"{RUN}/tokenizer", "--k", "4", "--data-dir", "{root}/fm"]
REDUNDANCY = ["analyze-redundancy", "--tokenizer", f"{RUN}/tokenizer", "--methods", "kmeans", "--ks", "4", "--data-dir",
              "{root}/fm"]
SAMPLE = ["sample", "--run", RUN, "--device", "cpu", "--quiet"]
EVALUATE = ["evaluate", "--extractor", "domain", "--classifier", "{root}/classifier", "--data-dir", "{root}/fm"]
DEMO = ["demo", "--data-dir", "{root}/fm", "--device", "cpu", "--quiet"]
BENCH = ["bench", "--quick", "--data-dir", "{root}/fm"]

CASES = {
    # output folders: finished work, another kind, a file in the way, no permission
    "train-tokenizer over a finished tokenizer": TOKENIZER + ["--out", f"{RUN}/tokenizer"],
    "train-tokenizer --force over a transformer": TOKENIZER + ["--out", f"{RUN}/coarse", "--force"],
    "train-tokenizer into a file": TOKENIZER + ["--out", "{root}/a-file.txt"],
    "train-tokenizer under a file": TOKENIZER + ["--out", "{root}/a-file.txt/tok"],
    "train-tokenizer into a read-only place": TOKENIZER + ["--out", "{readonly}/ctfgen-tok"],
    "train-tokenizer into a foreign folder": TOKENIZER + ["--out", "{root}/fm"],
    "train over a finished model": TRAIN + ["--role", "coarse", "--out", f"{RUN}/coarse"],
    "train --force over a tokenizer": TRAIN + ["--role", "coarse", "--out", f"{RUN}/tokenizer", "--force"],
    "train --resume over a hierarchy": TRAIN + ["--role", "coarse", "--out", f"{RUN}/hierarchy", "--resume"],
    "train into a read-only place": TRAIN + ["--role", "coarse", "--out", "{readonly}/ctfgen-coarse"],
    "extract over finished codes": EXTRACT + ["--out", "{root}/codes"],
    "extract --force over a hierarchy": EXTRACT + ["--out", f"{RUN}/hierarchy", "--force"],
    "extract under a file": EXTRACT + ["--out", "{root}/a-file.txt/codes"],
    "cluster over a finished hierarchy": CLUSTER + ["--out", f"{RUN}/hierarchy"],
    "cluster --force over codes": CLUSTER + ["--out", "{root}/codes", "--force"],
    "count-draft over a finished model": ["count-draft", "--codes", "{root}/codes", "--out", f"{RUN}/coarse"],
    "count-draft of a model folder": ["count-draft", "--codes", f"{RUN}/coarse", "--out", "{root}/new"],
    "count-draft of a missing folder": ["count-draft", "--codes", "{root}/missing", "--out", "{root}/new"],
    "count-draft with another codebook's hierarchy": ["count-draft", "--codes", "{root}/codes", "--hierarchy",
                                                      "{root}/hierarchy-v16", "--out", "{root}/new"],
    "sample --draft of a codes folder": SAMPLE + ["--draft", "{root}/codes"],
    "analyze-redundancy over a finished report": REDUNDANCY + ["--out", "{root}/redundancy"],
    "train-classifier over a finished classifier": CLASSIFIER + ["--out", "{root}/classifier"],
    "train-classifier --force over a model": CLASSIFIER + ["--out", f"{RUN}/baseline", "--force"],
    "sample --out-dir over finished samples": SAMPLE + ["--out-dir", "{root}/pngs"],
    "sample --out that is a folder": SAMPLE + ["--out", f"{RUN}/coarse"],
    "sample --tokens under a file": SAMPLE + ["--tokens", "{root}/a-file.txt/t.npz"],
    "sample --npz over an existing file": SAMPLE + ["--npz", "{root}/a-file.txt"],
    "sample --npz with --tokens": SAMPLE + ["--npz", "{root}/new.npz", "--tokens", "{root}/t.npz"],
    "evaluate --out that is a folder": EVALUATE + ["{root}/pngs", "--out", f"{RUN}/coarse"],
    "evaluate --out in a read-only place": EVALUATE + ["{root}/pngs", "--out", "{readonly}/m.json"],
    "import-llamagen over a finished tokenizer": ["import-llamagen", "--vq", "{root}/unsafe.pt", "--out", f"{RUN}/tokenizer"],
    "demo in a tokenizer folder": DEMO + ["--run", f"{RUN}/tokenizer"],
    "demo in a file": DEMO + ["--run", "{root}/a-file.txt"],
    "demo on missing data": DEMO + ["--data", "{root}/missing.npz", "--run", "{root}/new"],
    "bench on missing data": BENCH + ["--data", "{root}/missing", "--out", "{root}/new"],
    "bench over a tokenizer": BENCH + ["--out", f"{RUN}/tokenizer", "--force"],
    # zero or negative sizes
    "train-tokenizer --batch-size 0": TOKENIZER + ["--batch-size", "0", "--out", "{root}/new"],
    "train-tokenizer --steps 0": TOKENIZER + ["--steps", "0", "--out", "{root}/new"],
    "train-tokenizer --preset bogus": TOKENIZER + ["--preset", "bogus", "--out", "{root}/new"],
    "train --batch-size 0": TRAIN + ["--batch-size", "0", "--out", "{root}/new"],
    "train --steps -1": TRAIN + ["--steps", "-1", "--out", "{root}/new"],
    "train --class-dropout 1.5": TRAIN + ["--class-dropout", "1.5", "--out", "{root}/new"],
    "train --lr 0": TRAIN + ["--lr", "0", "--out", "{root}/new"],
    "train --role bogus": TRAIN + ["--role", "bogus", "--out", "{root}/new"],
    "train --size bogus": TRAIN + ["--size", "bogus", "--out", "{root}/new"],
    "train --steps many": TRAIN + ["--steps", "many", "--out", "{root}/new"],
    "train-classifier --batch-size 0": CLASSIFIER + ["--batch-size", "0", "--out", "{root}/new"],
    "train-classifier --epochs 0": CLASSIFIER + ["--epochs", "0", "--out", "{root}/new"],
    "train-classifier --epochs -2": CLASSIFIER + ["--epochs", "-2", "--out", "{root}/new"],
    "train-classifier --width 0": CLASSIFIER + ["--width", "0", "--out", "{root}/new"],
    "extract --batch-size 0": EXTRACT + ["--batch-size", "0", "--out", "{root}/new"],
    "cluster --k 0": CLUSTER + ["--k", "0", "--out", "{root}/new"],
    "cluster --k lots": CLUSTER + ["--k", "lots", "--out", "{root}/new"],
    "cluster --k beyond V": CLUSTER + ["--k", str(V + 1), "--out", "{root}/new"],
    "sample --per-class 0": SAMPLE + ["--per-class", "0"],
    "extract --views bogus": EXTRACT + ["--views", "bogus", "--out", "{root}/new-codes"],
    "bench --grid bogus": BENCH + ["--grid", "bogus", "--out", "{root}/new"],
    "bench --device bogus": BENCH + ["--device", "bogus", "--out", "{root}/new"],
    "sample --npz --device bogus": SAMPLE + ["--npz", "{root}/new.npz", "--device", "bogus"],
    "extract --device bogus": EXTRACT + ["--device", "bogus", "--out", "{root}/new"],
    "train --device bogus": TRAIN + ["--device", "bogus", "--out", "{root}/new"],
    "serve --device bogus": ["serve", RUN, "--device", "bogus"],
    "serve --port 0": ["serve", RUN, "--port", "0"],
    "serve --port 70000": ["serve", RUN, "--port", "70000"],
    "serve --max-images 0": ["serve", RUN, "--max-images", "0"],
    "serve a folder that is not a run": ["serve", "{root}/codes", "--device", "cpu"],
    "serve a missing run": ["serve", "{root}/missing", "--device", "cpu"],
    "sample --refine-steps 0": SAMPLE + ["--refine-steps", "0"],
    "sample --decode-precision int4": SAMPLE + ["--decode-precision", "int4"],
    "sample --lookahead 0": SAMPLE + ["--lookahead", "0"],
    "sample --compile with fp32-packed": SAMPLE + ["--decode-precision", "fp32-packed", "--compile", "--out",
                                                   "{root}/new.png"],
    "sample --draft missing": SAMPLE + ["--draft", "{root}/no-such-model", "--out", "{root}/new.png"],
    "sample --draft of another role": SAMPLE + ["--draft", f"{RUN}/baseline", "--out", "{root}/new.png"],
    "sample --refine-steps 2 with a one-pass refiner": SAMPLE + ["--refine-steps", "2", "--out", "{root}/new.png"],
    "train --reveal for the coarse role": TRAIN + ["--role", "coarse", "--reveal", "--out", "{root}/new"],
    "train --corrupt without --coarse-model": TRAIN + ["--role", "refiner", "--corrupt", "0.2", "--out", "{root}/new"],
    "train --corrupt with --refiner-mask": TRAIN + ["--role", "refiner", "--corrupt", "0.2", "--refiner-mask",
                                                    "--coarse-model", f"{RUN}/coarse", "--out", "{root}/new"],
    "train --stage1-features for the coarse role": TRAIN + ["--role", "coarse", "--stage1-features", "--coarse-model",
                                                            f"{RUN}/coarse", "--out", "{root}/new"],
    "train --coarse-model that is a refiner": TRAIN + ["--role", "refiner", "--stage1-features", "--coarse-model",
                                                       f"{RUN}/refiner", "--out", "{root}/new"],
    "train --corrupt 1.5": TRAIN + ["--role", "refiner", "--corrupt", "1.5", "--out", "{root}/new"],
    "sample --batch-size 0": SAMPLE + ["--batch-size", "0"],
    "sample --t1 0": SAMPLE + ["--t1", "0"],
    "sample --top-p2 1.5": SAMPLE + ["--top-p2", "1.5"],
    "sample --classes -1": SAMPLE + ["--classes", "-1"],
    "sample --classes beyond the model": SAMPLE + ["--classes", "99", "--out", "{root}/new.png"],
    "demo --transformer-size bogus": DEMO + ["--transformer-size", "bogus", "--run", "{root}/new"],
    "demo --batch-size 0": DEMO + ["--batch-size", "0", "--run", "{root}/new"],
    "demo --samples-per-class 0": DEMO + ["--samples-per-class", "0", "--run", "{root}/new"],
    "bench --steps 0": BENCH + ["--steps", "0", "--out", "{root}/new"],
    "bench --size bogus": BENCH + ["--size", "bogus", "--out", "{root}/new"],
    "bench --run that is missing": BENCH + ["--run", "{root}/missing", "--out", "{root}/new"],
    "bench --only a field cells lack": BENCH + ["--only", "flavour=sweet", "--out", "{root}/new"],
    "bench --only without a value": BENCH + ["--only", "size", "--out", "{root}/new"],
    "bench --only a value no cell has": BENCH + ["--only", "size=GPT-XL", "--out", "{root}/new"],
    "bench --merge of a tokenizer": BENCH + ["--merge", f"{RUN}/tokenizer", "--out", "{root}/new"],
    "bench --merge with --force": BENCH + ["--merge", f"{RUN}/tokenizer", "--out", "{root}/new", "--force"],
    "bench --tokenizer-seeds 0": BENCH + ["--tokenizer-seeds", "0", "--out", "{root}/new"],
    # empty selections
    "cluster --images 0": CLUSTER + ["--k", "auto", "--images", "0", "--out", "{root}/new"],
    "analyze-redundancy --images 0": REDUNDANCY + ["--images", "0", "--out", "{root}/new"],
    "analyze-redundancy --ks 0": REDUNDANCY[:-4] + ["--ks", "0", "--out", "{root}/new"],
    "analyze-redundancy with nothing to test": REDUNDANCY[:3] + ["--out", "{root}/new"],
    "train-classifier --limit 0": CLASSIFIER + ["--limit", "0", "--out", "{root}/new"],
    "evaluate --ref-images 0": EVALUATE + ["{root}/pngs", "--ref-images", "0", "--out", "{root}/new.json"],
    "evaluate --per-class 0": EVALUATE + [RUN, "--per-class", "0", "--out", "{root}/new.json"],
    # inputs that are missing, corrupt or not what they claim
    "evaluate a broken png": EVALUATE + ["{root}", "--on-error", "raise", "--out", "{root}/new.json"],
    "evaluate a broken npz": EVALUATE + ["{root}/broken.npz", "--out", "{root}/new.json"],
    "evaluate a missing npz": EVALUATE + ["{root}/missing.npz", "--out", "{root}/new.json"],
    "evaluate a plain file": EVALUATE + ["{root}/a-file.txt", "--out", "{root}/new.json"],
    "evaluate --ref-stats that is missing": EVALUATE + ["{root}/pngs", "--ref-stats", "{root}/missing.npz", "--out",
                                                       "{root}/new.json"],
    "evaluate --ref-stats of another feature size": EVALUATE + ["{root}/pngs", "--ref-stats", "{root}/stats7.npz",
                                                               "--out", "{root}/new.json"],
    "evaluate --save-ref-stats with two extractors": EVALUATE + ["{root}/pngs", "--extractor", "effnet-lite0",
                                                                "--save-ref-stats", "{root}/s.npz", "--out", "{root}/new.json"],
    "evaluate with missing Inception weights": EVALUATE[:1] + [RUN, "--extractor", "inception", "--inception-weights",
                                                               "{root}/missing.pt", "--out", "{root}/new.json"],
    "extract with a model for a tokenizer": EXTRACT[:2] + [f"{RUN}/coarse"] + EXTRACT[3:] + ["--out", "{root}/new"],
    "train-tokenizer on a file that is no .npz": TOKENIZER + ["--data", "{root}/garbage.npz", "--out", "{root}/new"],
    "train-tokenizer on one image": TOKENIZER + ["--data", "{root}/one-image", "--out", "{root}/new"],
    "train-tokenizer on fewer images than a batch": TOKENIZER + ["--batch-size", "64", "--out", "{root}/new"],
    "train on a missing codes folder": TRAIN[:2] + ["{root}/missing"] + TRAIN[3:] + ["--out", "{root}/new"],
    "import-llamagen with nothing to import": ["import-llamagen", "--out", "{root}/new"],
    "import-llamagen of an unsafe pickle": ["import-llamagen", "--vq", "{root}/unsafe.pt", "--out", "{root}/new"],
    "import-llamagen of a non-torch file": ["import-llamagen", "--gpt", "{root}/a-file.txt", "--out", "{root}/new"],
    "import-llamagen of a missing file": ["import-llamagen", "--vq", "{root}/missing.pt", "--out", "{root}/new"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(name: str, root: Path, capsys: pytest.CaptureFixture) -> None:
    readonly = read_only_dir() if any("{readonly}" in a for a in CASES[name]) else ""
    argv = [a.format(root=root, readonly=readonly) for a in CASES[name]]
    before = tree_digest(root)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and f"ctfgen {argv[0]}: error: " in lines[0], err
    assert tree_digest(root) == before, "the command changed files it was given"


def test_import_llamagen_accepts_its_argparse_namespace(tmp_path: Path) -> None:
    from test_tokenizer import llamagen_state_dict

    from ctfgen.tokenizer.model import VQConfig, load_tokenizer

    cfg = VQConfig(image_size=16, in_channels=3, base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                   z_channels=16, codebook_size=64, codebook_dim=8, norm_groups=32, attention=True)
    torch.save({"model": llamagen_state_dict(cfg), "args": argparse.Namespace(vq_model="VQ-16")}, tmp_path / "vq.pt")
    main(["import-llamagen", "--vq", str(tmp_path / "vq.pt"), "--image-size", "16", "--out", str(tmp_path / "tok")])
    assert load_tokenizer(tmp_path / "tok").config == cfg


def test_evaluate_skips_unreadable_pngs(tmp_path: Path) -> None:
    from ctfgen.evaluate import load_png_folder

    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "a_class1.png")
    (tmp_path / "b_class2.png").write_bytes(b"not a png at all")
    images = load_png_folder(tmp_path)
    assert images.images.shape == (1, 1, 8, 8) and images.labels.tolist() == [1] and images.source["skipped"] == 1


def test_sigterm_in_train_tokenizer_exits_143_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    import os
    import signal

    from ctfgen.tokenizer.train import TokenizerTrainer

    fm = fake_fashion_mnist(tmp_path / "fm", n_train=32, n_test=16)
    argv = ["train-tokenizer", "--data-dir", str(fm), "--out", str(tmp_path / "tok"), "--steps", "4", "--batch-size", "8",
            "--report-limit", "8", "--device", "cpu", "--quiet"]
    plain_step = TokenizerTrainer.train_step

    def step_then_sigterm(self, x):
        stats = plain_step(self, x)
        if self.step == 1:  # the counter moves on after train_step returns: this stops after 2 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    monkeypatch.setattr(TokenizerTrainer, "train_step", step_then_sigterm)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 2" in err and "again with --resume" in err
    with pytest.raises(SystemExit) as refused:  # an unfinished run is continued only when asked
        main(argv)
    assert refused.value.code == 2 and "--resume" in capsys.readouterr().err
    monkeypatch.setattr(TokenizerTrainer, "train_step", plain_step)
    main(argv + ["--resume"])
    assert json.loads((tmp_path / "tok" / "report.json").read_text())["steps"] == 4


def test_a_comma_list_argument_checks_every_value() -> None:
    """`arguments.arg_list`: the benchmarks' comma-separated counts (--lookaheads, --batches) read as a list of
    checked values; one bad value is one argparse error (exit 2)."""
    import argparse

    from ctfgen.arguments import Count, arg_list

    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=arg_list(Count), default=[1])
    assert parser.parse_args(["--batches", "1,8,64"]).batches == [1, 8, 64]
    for bad in ("1,0", "1,x"):
        with pytest.raises(SystemExit) as stopped:
            parser.parse_args(["--batches", bad])
        assert stopped.value.code == 2
