"""The CUDA path in one call: the checks a session lent a GPU for a few minutes runs, in one prepared script.

No GPU has been lent to this project's sessions so far, so the CUDA code (bf16 autocast, the bf16 KV cache,
`--compile` on CUDA, sampling speed at batch 64) is written but unchecked; this script checks it in one call
of the device tool, whose machine has PyTorch but no network and no Fashion-MNIST. Prepare once, here:

    mkdir -p .device && cp -r /usr/share/datasets/fashion-mnist .device/     # .device/ is git-ignored
    # and, for the decode check against LlamaGen's sampler, a LlamaGen checkout's files (the search tool's
    # `fetch github:FoundationVision/LlamaGen` gives its git folder G):
    mkdir -p .device/LlamaGen && git --git-dir G archive HEAD autoregressive utils tokenizer | tar -x -C .device/LlamaGen

then one call of the device tool (`run`, carry [".device"], timeout_s 600; the machine's PyTorch is kept):

    python3 -m pip install -q --no-deps --no-build-isolation -e . && \
      python3 benchmarks/device_check.py --data-dir .device/fashion-mnist --llamagen .device/LlamaGen --out $OUT

and here, to check the script itself on tiny budgets and a slice of the data (compiling alone takes minutes
on 2 cores):

    python benchmarks/device_check.py --device cpu --quick --budget-s 1800 --out /tmp/device-check

Checks, in order; each is a command of its own with a time limit, all within `--budget-s`, and a failure is
recorded while the next check runs:
- env: torch, CUDA, the GPU's name, bf16 support.
- demo: `ctfgen demo` on Fashion-MNIST with a short budget on the device: tokenizer, codes, the three models
  trained under bf16 autocast, sampling and metrics.
- compile: `ctfgen sample` of the demo run eager and with `--compile`, the share of equal tokens (bf16 on CUDA
  may round differently in the compiled graph, so this is a figure, not a pass/fail).
- speculative: count drafts of the demo run's codes (`ctfgen count-draft`, coarse labels and codewords), then
  `benchmarks/bench_speculative.py --run` at batch 1, 8 and 64, lookahead 4: whole CTF and baseline samples, plain and
  speculative, on the device (a short-budget run: its acceptance is not a trained model's, its pass costs are).
- sampling: `benchmarks/bench_sampling.py` at the small and GPT-B shapes (GPT-B at batch 1, 8 and 64): images/s
  of CTF and the baseline, and their ratio.
- decode: `benchmarks/bench_decode.py` at GPT-B, batch 1 and 8: ms/token of ctfgen's AR sampler (fp32 and bf16
  weights) against LlamaGen's `generate` on the same weights (with `--llamagen`) and the bandwidth bound.
- train: `benchmarks/bench_train.py`: training tokens/s at the small and GPT-B presets.
- sampling-compiled: `sampling` at GPT-B with both AR stages' decode step compiled (last: compiling is slow, and
  what `--budget-s` leaves may not suffice; `--only sampling-compiled` in a second call then).
NCCL needs a process per GPU: on a one-GPU machine the multi-process path is not checked.
Writes OUT/device_check.json (each check's command, exit status, seconds, output tail and the benchmark's own
report) and OUT/checks.log (every check's whole output): two files (the device tool brings back eight at most).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ctfgen.arguments import Above, checked
from ctfgen.data.datasets import balanced_subset, load_fashion_mnist_arrays

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "ctfgen.cli"]
SLICE = "fashion-mnist-slice.npz"  # the quick mode's data, in the work folder
ENV_REPORT = """import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": cuda, "cuda_version": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "bf16": torch.cuda.is_bf16_supported() if cuda else None,
                  "nccl": torch.distributed.is_nccl_available()}))"""


class Check(NamedTuple):
    command: list[str]
    limit_s: int  # its own time limit
    figures: str | None = None  # the JSON report its benchmark writes, in the work folder


def checks(args: argparse.Namespace, work: Path) -> dict[str, Check]:
    """Every check by name; what they write goes to `work`."""
    run, device, quick = work / "demo-run", ["--device", args.device], args.quick
    demo_budget = (["--data", str(work / SLICE), "--tokenizer-steps", "20",
                    "--transformer-steps", "10", "--transformer-size", "tiny", "--samples-per-class", "2",
                    "--classifier-images", "500"] if quick else
                   ["--tokenizer-steps", "500", "--transformer-steps", "300"]
                   + (["--data-dir", args.data_dir] if args.data_dir else []))
    sample = CLI + ["sample", "--run", str(run), "--classes", "0", "1", "2", "--per-class", "4", "--seed", "0",
                    "--quiet", *device]
    gpt_b_batches = "1" if quick else "1,8,64"
    count = CLI + ["count-draft", "--codes", str(run / "codes-train"), "--force"]
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_sampling.py"), *device]
    return {
        "env": Check([sys.executable, "-c", ENV_REPORT], 60),
        "demo": Check(CLI + ["demo", "--run", str(run), "--quiet", *device, *demo_budget], 300),
        "compile": Check(["bash", "-c", " && ".join(shlex.join(c) for c in (
            sample + ["--out", str(work / "eager.png"), "--tokens", str(work / "eager.npz")],
            sample + ["--out", str(work / "compiled.png"), "--tokens", str(work / "compiled.npz"), "--compile"]))], 240),
        "speculative": Check(["bash", "-c", " && ".join(shlex.join(c) for c in (
            count + ["--hierarchy", str(run / "hierarchy"), "--out", str(work / "counts-ctf")],
            count + ["--out", str(work / "counts-baseline")],
            [sys.executable, str(ROOT / "benchmarks" / "bench_speculative.py"), "--run", str(run), *device,
             "--ctf-draft", str(work / "counts-ctf"), "--baseline-draft", str(work / "counts-baseline"),
             "--lookaheads", "4", "--batches", "1" if quick else "1,8,64", "--images", "8" if quick else "64",
             "--rounds", "1", "--out", str(work / "speculative.json")]))], 150, "speculative.json"),
        "sampling": Check(bench + ["--shapes", "tiny" if quick else "small,GPT-B", "--gpt-b-batches", gpt_b_batches]
                          + (["--quick", "--rounds", "1"] if quick else []) + ["--out", str(work / "sampling.json")],
                          300, "sampling.json"),
        "decode": Check([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), *device]
                        + (["--llamagen", args.llamagen] if args.llamagen else [])
                        + (["--quick", "--precisions", "fp32"] if quick else ["--repeats", "2"])
                        + ["--out", str(work / "decode.json")], 240, "decode.json"),
        "train": Check([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), *device]
                       + (["--sizes", "tiny", "--steps", "5"] if quick else ["--sizes", "small,GPT-B", "--steps", "30"])
                       + ["--out", str(work / "train")], 180, "train/bench_train.json"),
        "sampling-compiled": Check(bench + ["--shapes", "tiny" if quick else "GPT-B", "--gpt-b-batches", gpt_b_batches,
                                            "--compile", "--rounds", "1"]
                                   + ["--out", str(work / "sampling-compiled.json")], 300, "sampling-compiled.json"),
    }


def write_fashion_mnist_slice(path: Path, data_dir: str | None, n: int = 1000) -> None:
    """A class-balanced slice of Fashion-MNIST's training set as an .npz (the demo holds out a tenth to test on):
    the quick mode's data, so that a CPU extracts and scores a thousand images, not seventy thousand."""
    images, labels = load_fashion_mnist_arrays(data_dir, "train")
    keep = balanced_subset(labels, n, seed=0)
    np.savez(path, images=images[keep], labels=labels[keep])


def equal_tokens(work: Path) -> float | None:
    """The share of tokens the compiled sampler drew as the eager one did (None if either file is missing)."""
    try:
        eager, compiled = np.load(work / "eager.npz"), np.load(work / "compiled.npz")
    except FileNotFoundError:
        return None
    return float((eager["tokens"] == compiled["tokens"]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for device_check.json and checks.log (nothing else: the "
                    "device tool brings back 8 files)")
    ap.add_argument("--work", default=None, help="folder for the runs and samples the checks make (default: a "
                    "temporary one, removed at the end)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST's idx files (default: ctfgen's search path)")
    ap.add_argument("--llamagen", default=None, help="a LlamaGen checkout, for the decode check's LlamaGen row")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the script, not the device")
    ap.add_argument("--only", default=None, help="comma-separated checks to run (default: all; give the --work "
                    "of an earlier call for checks that read its demo run)")
    ap.add_argument("--budget-s", type=checked(float, Above(0)), default=540, help="seconds for all checks together")
    args = ap.parse_args()
    names = list(checks(args, Path()))
    only = args.only.split(",") if args.only else names
    if set(only) - set(names):
        ap.error(f"--only: unknown checks {sorted(set(only) - set(names))}; choose from {', '.join(names)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        todo = {name: check for name, check in checks(args, work).items() if name in only}
        failed = run_checks(todo, args, out, work)
    sys.exit(1 if failed else 0)


def run(command: list[str], limit: float) -> tuple[int | str, str]:
    """Exit status ("timeout" if cut off) and output of a command; a cut-off one is killed with its children."""
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            text = proc.communicate(timeout=limit)[0]
            return proc.returncode, text
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return "timeout", proc.communicate()[0]


def run_checks(todo: dict[str, Check], args: argparse.Namespace, out: Path, work: Path) -> list[str]:
    """Run the checks, writing OUT/device_check.json after each; the names of those that failed."""
    deadline, report = time.monotonic() + args.budget_s, {"device": args.device, "quick": args.quick, "checks": {}}
    if args.only and (out / "device_check.json").exists():  # a rerun of some checks keeps the others' results
        report["checks"] = json.loads((out / "device_check.json").read_text())["checks"]
    else:
        (out / "checks.log").unlink(missing_ok=True)
    for name, check in todo.items():
        report["checks"][name] = run_check(name, check, deadline - time.monotonic(), args, out, work)
        (out / "device_check.json").write_text(json.dumps(report, indent=2))  # after every check: a kill keeps it
    failed = [name for name in todo if report["checks"][name].get("rc") != 0]
    print(f"\n{len(todo) - len(failed)} of {len(todo)} checks ran to the end"
          + (f"; failed, cut off or skipped: {', '.join(failed)}" if failed else "") + f"; {out / 'device_check.json'}")
    return failed


def run_check(name: str, check: Check, left: float, args: argparse.Namespace, out: Path, work: Path) -> dict:
    """One check's result (its whole output is appended to OUT/checks.log); skipped when under 10 s of the budget
    are left."""
    if left < 10:
        return {"skipped": "out of --budget-s"}
    limit = min(check.limit_s, left)
    print(f"--- {name} (at most {limit:.0f} s)", flush=True)
    start = time.monotonic()
    if name == "demo" and args.quick:
        write_fashion_mnist_slice(work / SLICE, args.data_dir)
    rc, text = run(check.command, limit)
    with open(out / "checks.log", "a") as log:
        log.write(f"=== {name}: {shlex.join(check.command)}\n{text}\n")
    result = {"command": check.command, "rc": rc, "seconds": round(time.monotonic() - start, 1), "tail": text[-2000:]}
    if name == "compile":
        result["equal_tokens"] = equal_tokens(work)
    if check.figures and (work / check.figures).exists():
        result["figures"] = json.loads((work / check.figures).read_text())
    print(f"    rc {rc}, {result['seconds']} s" + "".join(f"\n    {line}" for line in text.strip().splitlines()[-8:]))
    return result


if __name__ == "__main__":
    main()
