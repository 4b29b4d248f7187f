"""Training benchmark: tokens/s and peak memory of the coarse AR model, the refiner and the baseline.

    python benchmarks/bench_train.py --quick                                # synthetic Fashion-MNIST-shaped codes
    python benchmarks/bench_train.py --codes runs/demo/codes-train --hierarchy runs/demo/hierarchy

Each (size, role) runs the real `ctfgen.training.train` in a fresh process, so its peak RSS
(resource.getrusage maxrss) is its own; "rss_after_import" is what torch alone takes in that
process. Without --codes, the codes are random with the Fashion-MNIST shape: 8x8 grid, V=4096,
K=256, 10 classes. tokens/s excludes the first step (allocation). On a shared CPU the figures
move with the other load: compare roles within one run, not runs on different days.
Roles: `refiner` trains within clusters (ctfgen train's default: the head scores each position's
cluster members only), `refiner-all-V` is the paper's refiner (a softmax over all V codewords).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.training import TrainConfig, train

# role name -> (TrainConfig role, its other fields)
ROLES = {"coarse": ("coarse", {}), "refiner": ("refiner", {}), "refiner-all-V": ("refiner", {"refiner_mask": False}),
         "baseline": ("baseline", {})}
FMNIST_SHAPE = dict(n=60000, grid=8, V=4096, K=256, classes=10)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_synthetic(root: Path, n: int, grid: int, V: int, K: int, classes: int) -> tuple[Path, Path]:
    """Random codes and a random balanced hierarchy in the artifact formats (throughput ignores content)."""
    rng = np.random.default_rng(0)
    codes = root / "codes"
    codes.mkdir(parents=True)
    np.save(codes / "codes.npy", rng.integers(0, V, (n, grid, grid)).astype(np.int16))
    np.save(codes / "labels.npy", rng.integers(0, classes, n).astype(np.int64))
    meta = {"kind": "codes", "count": n, "grid": [grid, grid], "codebook_size": V, "tokenizer_fingerprint": "synthetic",
            "dataset": "synthetic", "split": "train", "views": ["original"], "num_classes": classes, "classes": None}
    (codes / "meta.json").write_text(json.dumps(meta))
    coarse_of = torch.randperm(V, generator=torch.Generator().manual_seed(0)) % K
    save_hierarchy(Hierarchy(coarse_of, K, tokenizer_fingerprint="synthetic"), root / "hierarchy")
    return codes, root / "hierarchy"


def run_one(args: argparse.Namespace) -> None:
    """Child process: one training run; prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_import = peak_rss_mib()
    role, fields = ROLES[args.one]
    cfg = TrainConfig(role=role, size=args.size, codes=args.codes, hierarchy=args.hierarchy, out=args.out,
                      steps=args.steps, batch_size=args.batch_size, lr=1e-4, save_every=10**9, log_every=10**9,
                      device=args.device, **fields)
    info = train(cfg, progress=False)
    row = {"role": args.one, "size": args.size, "parameters_M": info["parameters"] / 1e6, "batch_size": args.batch_size,
           "steps": args.steps, "tokens_per_s": info["tokens_per_s"],
           "step_ms": 1000 * args.batch_size * info["grid"][0] * info["grid"][1] / info["tokens_per_s"],
           "final_loss": info["final_train_loss"], "peak_rss_mib": peak_rss_mib(), "rss_after_import_mib": rss_import,
           "threads": torch.get_num_threads(), "device": info["device"]}
    if torch.cuda.is_available():
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row))


def run_child(role: str, size: str, codes: Path, hierarchy: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", role, "--size", size, "--codes", str(codes), "--hierarchy", str(hierarchy),
           "--out", str(out / f"{size}-{role}"), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--device", args.device, "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{role}/{size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    print(f"{'size':8} {'role':13} {'params':>8} {'batch':>6} {'tokens/s':>10} {'step ms':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['size']:8} {r['role']:13} {r['parameters_M']:7.2f}M {r['batch_size']:6d} {r['tokens_per_s']:10.0f} "
              f"{r['step_ms']:8.1f} {r['peak_rss_mib']:13.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small preset only, 20 steps")
    ap.add_argument("--codes", help="codes folder (default: synthetic Fashion-MNIST-shaped codes)")
    ap.add_argument("--hierarchy", help="hierarchy folder (with --codes)")
    ap.add_argument("--sizes", default=None, help="comma-separated presets (default: small; without --quick: small,medium)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: 20 quick, 60 otherwise)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/bench-train")
    ap.add_argument("--one", choices=ROLES, help=argparse.SUPPRESS)  # internal: run one role in this process
    ap.add_argument("--size", default="small", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return run_one(args)
    if bool(args.codes) != bool(args.hierarchy):
        ap.error("give --codes and --hierarchy together")
    args.steps = args.steps or (20 if args.quick else 60)
    sizes = (args.sizes or ("small" if args.quick else "small,medium")).split(",")

    with tempfile.TemporaryDirectory() as tmp:
        if args.codes:
            codes, hierarchy, source = Path(args.codes), Path(args.hierarchy), args.codes
        else:
            codes, hierarchy = write_synthetic(Path(tmp), **FMNIST_SHAPE)
            source = "synthetic " + json.dumps(FMNIST_SHAPE)
        rows = [run_child(role, size, codes, hierarchy, Path(tmp) / "runs", args) for size in sizes for role in ROLES]

    print_table(rows)
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "codes": source, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_train.json").write_text(json.dumps(result, indent=2))
    print(f"written to {Path(args.out) / 'bench_train.json'}")


if __name__ == "__main__":
    main()
