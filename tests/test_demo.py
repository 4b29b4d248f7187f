"""The main job end to end at toy size, through the CLI, on a synthetic Fashion-MNIST folder."""

import json

import numpy as np

from ctfgen.cli import main
from test_data import write_idx


def fake_fashion_mnist(root, n_train=256, n_test=96):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):  # a class-dependent bar, so there is something to learn
            images[i, 4 + 2 * c: 8 + 2 * c, 4:24] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
    return root


def test_demo_runs_every_stage_then_reuses_them(tmp_path, capsys):
    data = fake_fashion_mnist(tmp_path / "fm")
    run = tmp_path / "run"
    args = ["demo", "--run", str(run), "--data-dir", str(data), "--tokenizer-steps", "4", "--transformer-steps", "3",
            "--transformer-size", "tiny", "--batch-size", "16", "--auto-k-images", "64", "--classifier-epochs", "1", "--classifier-images", "128",
            "--samples-per-class", "2", "--quiet"]
    main(args)
    out = capsys.readouterr().out
    for stage in ("tokenizer", "codes-train", "codes-test", "hierarchy", "coarse", "refiner", "baseline", "classifier"):
        assert f"{stage} -> {run / stage}" in out
    for role in ("coarse", "refiner", "baseline"):
        info = json.loads((run / role / "train_info.json").read_text())
        assert info["steps"] == 3 and np.isfinite(info["held_out"]["loss"])
    assert "held-out loss" in out
    metrics = json.loads((run / "metrics.json").read_text())
    for kind in ("ctf", "baseline"):
        assert metrics[kind]["n"] == 20 and np.isfinite(metrics[kind]["fid"])
        assert 0 <= metrics[kind]["class_consistency"] <= 1
        assert (run / f"samples-{kind}.png").is_file()

    main(args)  # the second run reuses every stage and only samples
    assert capsys.readouterr().out.count("done earlier; reusing it") == 8

    # a stage killed after its last checkpoint but before its artifacts: the next run resumes it
    status = json.loads((run / "refiner" / "status.json").read_text())
    (run / "refiner" / "status.json").write_text(json.dumps({**status, "finished": False}))
    (run / "refiner" / "train_info.json").unlink()
    main(args[:-1] + ["--tokenizer-steps", "5", "--quiet"])
    out = capsys.readouterr().out
    assert out.count("done earlier; reusing it") == 7
    assert "made with steps=4; the flags ask for steps=5" in out  # a reused stage says when its budget differs
    info = json.loads((run / "refiner" / "train_info.json").read_text())
    assert info["resumed_from_step"] == 3 and info["steps"] == 3


def test_demo_on_a_users_npz_without_a_test_split(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 60)
    images = np.zeros((180, 28, 28), np.uint8)
    for i, c in enumerate(labels):
        images[i, 4 + 6 * c: 10 + 6 * c, 4:24] = 200 + rng.integers(0, 50)
    np.savez(tmp_path / "mine.npz", images=images, labels=labels)
    run = tmp_path / "run"
    main(["demo", "--data", str(tmp_path / "mine.npz"), "--run", str(run), "--tokenizer-steps", "3",
          "--transformer-steps", "2", "--transformer-size", "tiny", "--batch-size", "16", "--auto-k-images", "18",
          "--classifier-images", "64", "--samples-per-class", "4", "--quiet"])
    out = capsys.readouterr().out
    assert "is not the verdict" in out and "ctfgen bench" in out
    meta = json.loads((run / "codes-test" / "meta.json").read_text())
    assert meta["count"] == 18 and meta["holdout"] == {"held_out": 18, "of": 180, "seed": 0, "class_balanced": True}
    assert json.loads((run / "codes-train" / "meta.json").read_text())["count"] == 162
    assert json.loads((run / "metrics.json").read_text())["ctf"]["n"] == 3 * 4
