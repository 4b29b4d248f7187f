"""Sampling benchmark: images/s of CTF (coarse AR + refiner) against the baseline AR model, and the
KV cache's per-token decode time at the last position against the first.

    python benchmarks/bench_sampling.py --quick            # small shape at batch 1 and 64, GPT-B shape at batch 1
    python benchmarks/bench_sampling.py --device cuda      # also GPT-B at batch 8 (best of 3 rounds; small: of 7)
    python benchmarks/bench_sampling.py --refine-passes 1,2,4,8   # also CTF with stage 2 in that many passes
    python benchmarks/bench_sampling.py --refiner-depth 0.5 --gpt-b-batches 1,64   # a half-depth refiner
    python benchmarks/bench_sampling.py --refiner-depth 0.25 --refiner-width 0.5     # and a narrower, shallower one
    python benchmarks/bench_sampling.py --decode-precision fp32-packed   # all three models on packed weights
    python benchmarks/bench_sampling.py --shapes small --compile          # both AR stages' decode step compiled

Random weights (speed does not depend on them; the heads are re-initialised so sampling is not
uniform). Three shapes:
- "small": the Fashion-MNIST shape, 8x8 grid, V=4096, K=256, 10 classes, the "small" preset for
  the coarse model, the baseline and the refiner;
- "tiny": the bench grids' tiny models (the `stage2` grid's verdict), 8x8 grid, V=4096, K=512, 10
  classes, the "tiny" preset for all three (not in the default `--shapes`);
- "GPT-B": LlamaGen's B shape, 16x16 grid, V=16384, K=512, 1000 classes, GPT-B for all three.
"CTF/base" is the speed ratio (> 1: CTF is faster); "stage 2" is the share of CTF's time spent in the
refiner pass and its sampling. With --refine-passes the refiner reads decided codes (`reveal`), and
CTF is also timed with stage 2 in each number of passes (`refine(steps=S)`; S = 1 is the paper's).
Stage 2 keeps each code in its cluster (random balanced clusters), as the pipeline does by default;
`--refiner-depth` and `--refiner-width` set the refiner's share of stage 1's layers and width (the bench
found refiners of a quarter of the layers, and of a quarter of the layers at half the width, as good as a
full one: docs/bench.md). Images/s counts token sampling (stage 1 with CFG 2.0, stage 2
without guidance, the pipeline's defaults), not the tokenizer's decoder, which costs the same for both
methods. CTF, the baseline and stage 2 alone run in turn, round after round, and each keeps its best
round (the one least disturbed by other work). On a shared CPU the figures still move with the other
load: compare rows of one run, not runs on different days.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from datetime import date
from typing import Callable

import torch

from ctfgen.arguments import Count, Fraction, arg_list, arg_type
from ctfgen.artifacts import write_json
from ctfgen.hierarchy import Hierarchy
from ctfgen.runtime import device_arg, wall_seconds
from ctfgen.sampling import StageSettings, decode_cache, refine, sample_baseline, sample_ctf
from ctfgen.transformer import MODEL_SIZES, Transformer, build_model, preset_config
from ctfgen.transformer.precision import DECODE_PRECISIONS, for_decoding, refiner_precision

SHAPES = {
    "small": dict(size="small", grid=8, V=4096, K=256, classes=10),
    "tiny": dict(size="tiny", grid=8, V=4096, K=512, classes=10),
    "GPT-B": dict(size="GPT-B", grid=16, V=16384, K=512, classes=1000),
}
STAGE1 = StageSettings(cfg=2.0, temperature=1.1)
STAGE2 = StageSettings(cfg=1.0, temperature=1.1)


def refiner_layers(size: str, depth: float, width: float) -> dict[str, int]:
    """A refiner's layer count and width as shares of a size preset's; its heads keep the preset's head size."""
    preset = MODEL_SIZES[size]
    heads = max(1, round(width * preset["n_head"]))
    return {"n_layer": max(1, round(depth * preset["n_layer"])), "n_head": heads,
            "dim": heads * preset["dim"] // preset["n_head"]}


def random_models(shape: dict, device: torch.device, reveal: bool = False, refiner_depth: float = 1.0,
                  refiner_width: float = 1.0, precision: str = "fp32",
                  compile: bool = False) -> dict[str, Transformer]:
    """The three models of a shape; the autoregressive ones (coarse, baseline) as they decode at `precision`,
    with their decode step compiled if `compile` (`Transformer.compile_step`, as `ctfgen sample --compile`)."""
    common = dict(num_classes=shape["classes"], grid_h=shape["grid"], grid_w=shape["grid"])
    vocab = {"coarse": (shape["K"], shape["K"]), "refiner": (shape["K"], shape["V"]), "baseline": (shape["V"], shape["V"])}
    models = {}
    for role, (vocab_size, head_size) in vocab.items():
        torch.manual_seed(0)
        smaller = refiner_layers(shape["size"], refiner_depth, refiner_width) if role == "refiner" else {}
        with torch.device(device):
            model = build_model(preset_config(shape["size"], role=role, vocab_size=vocab_size, head_size=head_size,
                                              reveal=reveal and role == "refiner", **common, **smaller))
        torch.nn.init.normal_(model.head.weight, std=0.02)
        if role == "refiner":  # as `ctfgen sample` runs it beside a compiled stage 1 (packed on the CPU)
            models[role] = for_decoding(model.eval(), refiner_precision(precision, compile, device))
        else:
            models[role] = for_decoding(model.eval(), precision)
            if compile:
                models[role].compile_step()
    return models


def best_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict[str, float]:
    """Best wall time of each fn over `rounds` rounds that run them in turn: each side sees the same background
    load, and its best round is the one least disturbed by it (a shared machine's noise only adds time)."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], wall_seconds(fn, device))
    return best


def images_per_s(models: dict[str, Transformer], shape: dict, batch: int, device: torch.device,
                 repeats: int, passes: list[int], mask: torch.Tensor | None) -> dict[str, float]:
    labels = torch.arange(batch, device=device) % shape["classes"]
    g = torch.Generator(device=device).manual_seed(0)
    ctf = lambda: sample_ctf(models["coarse"], models["refiner"], labels, STAGE1, STAGE2, g, mask)
    baseline = lambda: sample_baseline(models["baseline"], labels, STAGE1, g)
    coarse = torch.randint(shape["K"], (batch, shape["grid"] ** 2), generator=g, device=device)
    stage2 = lambda: refine(models["refiner"], coarse, labels, STAGE2, g, mask)
    in_passes = {f"{s} passes": (lambda s=s: sample_ctf(models["coarse"], models["refiner"], labels, STAGE1, STAGE2, g, mask,
                                            refine_steps=s)) for s in passes}
    best = best_interleaved({"ctf": ctf, "baseline": baseline, "stage2": stage2, **in_passes}, device, repeats)
    t_ctf, t_base, t_stage2 = best["ctf"], best["baseline"], best["stage2"]
    by_passes = {s: batch / best[f"{s} passes"] for s in passes}
    return {"batch": batch, "ctf_images_per_s": batch / t_ctf, "baseline_images_per_s": batch / t_base,
            "ctf_s_per_image": t_ctf / batch, "baseline_s_per_image": t_base / batch,
            "ctf_over_baseline_speed": t_base / t_ctf, "ctf_stage2_share": t_stage2 / t_ctf,
            "ctf_images_per_s_by_passes": by_passes}


@torch.no_grad()
def decode_step_times(model: Transformer, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds of one cached decode step at the first token position and at the last (CFG-doubled batch)."""
    labels = torch.zeros(2 * batch, dtype=torch.long, device=device)
    token = torch.zeros(2 * batch, 1, dtype=torch.long, device=device)
    cache = decode_cache(model, 2 * batch)  # as sampling makes it
    last = model.config.seq_len - 1  # the last step feeds token seq_len - 2 at input position seq_len - 1

    model.prefill(labels, cache)

    def step_at(pos: int) -> float:
        cache.pos = pos  # what the slots hold does not change the cost; attention reads slots 0..pos
        return wall_seconds(lambda: model.step(token, cache), device)

    # Interleaved, so both positions see the same background load. The ratio uses the best of the
    # repeats, the cost with the least interference from other work on a shared CPU.
    first, last_times = zip(*[(step_at(1), step_at(last)) for _ in range(repeats)])
    return {"batch": batch, "first_token_s": min(first), "last_token_s": min(last_times),
            "first_token_median_s": statistics.median(first), "last_token_median_s": statistics.median(last_times),
            "last_over_first": min(last_times) / min(first)}


def bench_shape(name: str, batches: list[int], device: torch.device, repeats: int, passes: list[int],
                refiner_depth: float, refiner_width: float, masked: bool, precision: str,
                compile: bool = False) -> dict:
    shape = SHAPES[name]
    torch.manual_seed(0)  # balanced random clusters: the cost of a cluster mask, as the pipeline samples by default
    mask = Hierarchy(torch.randperm(shape["V"]) % shape["K"], shape["K"]).member_mask.to(device) if masked else None

    def models_for(batch: int) -> dict[str, Transformer]:
        """The models, warmed up at `batch`: compiled ones are made afresh for each batch (on the CPU inductor tunes
        its kernels to the first call's rows, as `ctfgen sample --compile` does to its batch size)."""
        models = random_models(shape, device, reveal=bool(passes), refiner_depth=refiner_depth,
                               refiner_width=refiner_width, precision=precision, compile=compile)
        for role in ("coarse", "baseline"):
            decode_step_times(models[role], batch, device, 1)  # warm-up: allocation, kernels (and the compiler)
        if compile:  # a whole sampling run too: the first one compiles the prefill's and the first steps' shapes
            images_per_s(models, shape, batch, device, 1, [], mask)
        return models

    models = models_for(1)
    sampling = [images_per_s(models if b == 1 or not compile else models_for(b), shape, b, device, repeats, passes,
                             mask) for b in batches]
    return {"shape": {"name": name, **shape},
            "params": {role: m.num_params() for role, m in models.items()},
            "refiner_depth": refiner_depth, "refiner_width": refiner_width, "refiner_mask": masked,
            "decode_precision": precision, "compile": compile, "sampling": sampling,
            "decode_step": {role: decode_step_times(models[role], 1, device, 31) for role in ("coarse", "baseline")}}


def print_table(results: list[dict]) -> None:
    print(f"{'shape':7} {'batch':>5} {'CTF img/s':>10} {'base img/s':>10} {'CTF s/img':>10} {'base s/img':>10} "
          f"{'CTF/base':>8} {'stage 2':>8}")
    for r in results:
        for s in r["sampling"]:
            print(f"{r['shape']['name']:7} {s['batch']:5d} {s['ctf_images_per_s']:10.3f} {s['baseline_images_per_s']:10.3f} "
                  f"{s['ctf_s_per_image']:10.3f} {s['baseline_s_per_image']:10.3f} {s['ctf_over_baseline_speed']:8.2f} "
                  f"{s['ctf_stage2_share']:8.0%}")
    if any(s["ctf_images_per_s_by_passes"] for r in results for s in r["sampling"]):
        print(f"\n{'shape':7} {'batch':>5} {'passes':>6} {'CTF img/s':>10} {'CTF/base':>8}  (stage 2 in S passes)")
        for r in results:
            for s in r["sampling"]:
                for passes, ips in s["ctf_images_per_s_by_passes"].items():
                    print(f"{r['shape']['name']:7} {s['batch']:5d} {passes:6d} {ips:10.3f} "
                          f"{ips / s['baseline_images_per_s']:8.2f}")
    print(f"\n{'shape':7} {'model':8} {'first tok ms':>12} {'last tok ms':>12} {'last/first':>10}  (best of the repeats)")
    for r in results:
        for role, d in r["decode_step"].items():
            print(f"{r['shape']['name']:7} {role:8} {1e3 * d['first_token_s']:12.2f} {1e3 * d['last_token_s']:12.2f} "
                  f"{d['last_over_first']:10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="GPT-B at batch 1 only, one round (otherwise batch 1 and 8, best of 3 rounds)")
    ap.add_argument("--shapes", default="small,GPT-B", help="comma-separated: small, tiny, GPT-B")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", type=device_arg, default="auto")
    ap.add_argument("--out", default="runs/bench-sampling/bench_sampling.json")
    ap.add_argument("--refine-passes", type=arg_list(Count), default=[], help="comma-separated stage-2 pass counts to time, e.g. 1,2,4,8")
    ap.add_argument("--refiner-depth", type=arg_type(Fraction), default=1.0,
                    help="the refiner's share of the stage-1 depth")
    ap.add_argument("--refiner-width", type=arg_type(Fraction), default=1.0,
                    help="the refiner's share of the stage-1 width (heads of the same size, fewer)")
    ap.add_argument("--no-refiner-mask", dest="mask", action="store_false", help="sample stage 2 from all V codewords "
                    "(the pipeline's default keeps each code in its cluster)")
    ap.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="fp32",
                    help="the weights' precision while sampling, for both sides and CTF's refiner (ctfgen sample's "
                         "flag)")
    ap.add_argument("--compile", action="store_true", help="compile both AR stages' decode step (torch.compile; "
                    "minutes of compiling first); not with fp32-packed: the compiled step lays out fp32 weights itself")
    ap.add_argument("--gpt-b-batches", type=arg_list(Count), default=None, help="GPT-B batch sizes (default: 1, and 8 without --quick)")
    ap.add_argument("--rounds", type=arg_type(Count), default=None,
                    help="rounds for every shape, each side keeping its best (default: 7 at 8x8, 3 at GPT-B; quick 1)")
    args = ap.parse_args()
    if args.compile and args.decode_precision == "fp32-packed":
        ap.error("--compile lays out the fp32 weights itself on the CPU; give --decode-precision fp32")
    shapes = args.shapes.split(",")
    if not set(shapes) <= set(SHAPES):
        ap.error(f"--shapes: each of {', '.join(SHAPES)}; got {args.shapes}")
    passes = args.refine_passes
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    gpt_b = args.gpt_b_batches or ([1] if args.quick else [1, 8])
    batches = {"small": [1, 64], "tiny": [1, 64], "GPT-B": gpt_b}
    repeats = {"small": 7, "tiny": 7, "GPT-B": 1 if args.quick else 3}  # rounds, best of each side (8x8: cheap)
    if args.rounds:
        repeats = dict.fromkeys(repeats, args.rounds)
    results = []
    for name in shapes:
        print(f"benchmarking the {name} shape ...", flush=True)
        results.append(bench_shape(name, batches[name], device, repeats[name], passes, args.refiner_depth,
                                   args.refiner_width, args.mask, args.decode_precision, args.compile))
    print_table(results)
    report = {"date": str(date.today()), "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "quick": args.quick, "stage1": vars(STAGE1), "stage2": vars(STAGE2), "results": results}
    write_json(args.out, report)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
