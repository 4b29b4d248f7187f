"""Soak test of resume: kill `ctfgen train` and `ctfgen train-tokenizer` with SIGKILL at random moments,
restart them with --resume until they finish, and check the weights are bit-exact against one
uninterrupted run of the same command.

    python benchmarks/soak_resume.py --quick     # 5 kills of each command (about 3 minutes on 2 cores)
    python benchmarks/soak_resume.py --kills 30  # the full soak

Each kill lands uniformly at random in [0, T] after the process starts, T being the uninterrupted run's
wall time, so kills fall during start-up, training steps, checkpoint writes and the final artifact writes.
The transformer trains on synthetic codes; the tokenizer on Fashion-MNIST (Debian's package).
Exit status 1 if any resumed run differs from the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctfgen.artifacts import load_tensors
from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.outputs import is_finished

V, K, GRID, CLASSES = 256, 16, 8, 10


def write_codes(folder: Path, n: int = 512, seed: int = 0) -> Path:
    """Learnable synthetic codes: a class pattern with 20% random tokens (the test suite's recipe)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    codes = (7 * labels[:, None] + 3 * np.arange(GRID * GRID)[None, :]) % V
    codes = np.where(rng.random(codes.shape) < 0.2, rng.integers(0, V, codes.shape), codes)
    folder.mkdir(parents=True)
    np.save(folder / "codes.npy", codes.reshape(n, GRID, GRID).astype(np.int16))
    np.save(folder / "labels.npy", labels.astype(np.int64))
    meta = {"kind": "codes", "count": n, "grid": [GRID, GRID], "codebook_size": V, "tokenizer_fingerprint": "soak",
            "dataset": "synthetic", "split": "train", "views": ["original"], "num_classes": CLASSES, "classes": None}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def commands(work: Path, quick: bool) -> dict[str, list[str]]:
    codes = write_codes(work / "codes")
    save_hierarchy(Hierarchy(torch.arange(V) % K, K, tokenizer_fingerprint="soak"), work / "hierarchy")
    steps = 40 if quick else 120
    return {
        "train": ["train", "--role", "refiner", "--size", "tiny", "--codes", str(codes), "--hierarchy",
                  str(work / "hierarchy"), "--steps", str(steps), "--batch-size", "32", "--lr", "1e-3", "--save-every", "3",
                  "--ema-decay", "0.9", "--lr-decay", "cosine", "--warmup-steps", "5", "--device", "cpu", "--quiet"],
        "train-tokenizer": ["train-tokenizer", "--steps", str(steps // 2), "--batch-size", "32", "--save-every", "3",
                            "--image-every", "10", "--report-limit", "200", "--device", "cpu", "--quiet"],
    }


def run(argv: list[str], out: Path, kill_after: float | None) -> tuple[int, float]:
    """Start `ctfgen ARGV --out OUT --resume`; SIGKILL it after `kill_after` seconds unless it ended before.
    Returns (exit status, wall time)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ctfgen.cli", *argv, "--out", str(out), "--resume"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.exit(f"{argv[0]} failed with status {proc.returncode}:\n{proc.stderr.read()}")
    return proc.returncode, time.perf_counter() - start


def soak(name: str, argv: list[str], work: Path, kills: int, rng: random.Random) -> dict:
    """Episodes of: a fresh folder, restarted with --resume after each kill until it finishes, compared with
    the uninterrupted run; as many episodes as it takes to land `kills` kills."""
    reference = work / f"{name}-reference"
    _, wall = run(argv, reference, None)
    expected = load_tensors(reference / "model.safetensors")
    episodes, killed, runs, failures = 0, 0, 0, []
    while killed < kills:
        episodes += 1
        soaked = work / f"{name}-soaked-{episodes}"
        while True:
            status, _ = run(argv, soaked, rng.uniform(0, wall))
            runs += 1
            if status == 0:
                break
            killed += 1
        got = load_tensors(soaked / "model.safetensors")
        kind = json.loads((soaked / "status.json").read_text())["kind"]
        if got.keys() != expected.keys() or not all(torch.equal(got[k], expected[k]) for k in got):
            failures.append(f"episode {episodes}: weights differ")
        if not is_finished(soaked, kind) or list(soaked.glob(".*.tmp")):
            failures.append(f"episode {episodes}: not marked finished, or temporary files left")
    return {"command": name, "kills": killed, "runs": runs, "episodes": episodes, "uninterrupted_wall_s": round(wall, 1),
            "bit_exact": not failures, "failures": failures}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 kills of each command, shorter runs")
    p.add_argument("--kills", type=int, default=None, help="kills per command (default: 30, or 5 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder)")
    args = p.parse_args()
    kills = args.kills if args.kills is not None else (5 if args.quick else 30)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = [soak(name, argv, work, kills, rng) for name, argv in commands(work, args.quick).items()]
    for r in results:
        print(json.dumps(r))
    ok = all(r["bit_exact"] for r in results)
    print("all resumed runs are bit-exact" if ok else "MISMATCH: a resumed run differs from the uninterrupted one")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
