"""Decode speed of the autoregressive stage at LlamaGen's GPT-B shape: milliseconds per token against
LlamaGen's own `generate` (same weights, same process) and against the memory-bandwidth bound.

    python benchmarks/bench_decode.py --quick                         # batch 1, one run of each
    python benchmarks/bench_decode.py --llamagen /path/to/LlamaGen    # also LlamaGen's sampler; batch 1 and 8
    python benchmarks/bench_decode.py --profile                       # where one decode step's time goes
    python benchmarks/bench_decode.py --compile                       # also each precision's step compiled
    python benchmarks/bench_decode.py --compile --torch-attention --batches 1 64 --precisions fp32
    python benchmarks/bench_decode.py --layers [--rows 2 64 4096]     # plain against packed weights, per layer shape
    python benchmarks/bench_decode.py --device cuda --llamagen DIR    # on a GPU: fp32 weights under bf16 autocast, bf16

Each row samples whole 16x16 grids (256 tokens, CFG 2.0, so the model runs on twice the batch) and
reports wall time / 256. Rows run in turn, `--repeats` rounds, and each keeps its best round (the
one least disturbed by other work on a shared machine); compare rows of one run, not runs of different
days. Random weights (speed does not depend on them); with `--llamagen` they are a LlamaGen GPT_B's,
imported into ctfgen with `import_llamagen_gpt`, so both samplers run the same numbers. LlamaGen is
imported from the folder given at run time; nothing of it is copied here.

The bound: one decode step reads every weight matrix once (`weight_bytes_per_token`), so it cannot be
faster than those bytes over the memory's read bandwidth, measured here by summing a 256 MB buffer with
the same threads (every round; the best is kept, as it is for the samplers' times). "/bound" is the
measured time over that bound (1.0 would be perfect).
Rows: `baseline` is ctfgen's AR sampler over V = 16384 codewords (LlamaGen's model), at each
`--decode-precision`; `CTF stage 1` the same sampler over K = 512 coarse labels (a smaller head; fp32,
fp32-packed and int8); the last lines put their ratio beside the ratio of the weight bytes a token reads.
`--compile` adds each precision's rows with the decode step compiled (`Transformer.compile_step`, as `ctfgen sample
--compile`; on the CPU inductor times its own product kernels against ATen's; fp32-packed is left out, inductor
freezes plain fp32 itself), each compiled by one untimed sample before the rounds. `--torch-attention` adds the
compiled rows again with torch's attention kernel in place of inductor's fused loops (`fused_decode_attention`):
what those loops gain, side by side.
`--layers` times one bias-free linear layer at 2 rows (batch 1 with CFG; `--rows` for others, e.g. a refiner's
pass), torch's product against oneDNN's packed one, in fp32 and (where the CPU has oneDNN's bf16 kernels) in
bf16, over weight sizes from the small preset's to GPT-B's head: where packing pays (`PACK_MIN_WEIGHTS` in
ctfgen.transformer.precision).
On CUDA every sampler runs as ctfgen samples there, under bf16 autocast with a bf16 KV cache (LlamaGen's
`generate` in the same autocast, so both compute alike); the rows are fp32 weights and bf16 weights
(`--decode-precision bf16`), the bound is over the GPU memory's read bandwidth, and `--profile` and `--layers`
are not offered (they time CPU kernels).
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path
from typing import Callable, Iterable

import torch

from ctfgen.arguments import Count, arg_type
from ctfgen.artifacts import write_json
from ctfgen.runtime import device_arg, wall_seconds
from ctfgen.sampling import StageSettings, decode_cache, sample_causal
from ctfgen.transformer import build_model, import_llamagen_gpt, preset_config
from ctfgen.transformer.precision import DECODE_PRECISIONS, PACK_MIN_WEIGHTS, PackedLinear, for_decoding, \
    packed_kernels_available, weight_bytes_per_token

GRID, V, K, CLASSES = 16, 16384, 512, 1000
TOKENS = GRID * GRID
STAGE1 = StageSettings(cfg=2.0, temperature=1.0)


def read_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Bytes per second of reading a buffer far larger than the caches (best of `repeats`)."""
    buffer = torch.ones(64 * 2 ** 20, device=device)  # 256 MB of fp32
    best = min(wall_seconds(buffer.sum, device) for _ in range(repeats))
    return buffer.numel() * buffer.element_size() / best


def llamagen_gpt_b(folder: str, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """LlamaGen's GPT_B (random weights, the head re-drawn so sampling is not uniform) and its `generate`."""
    if not (Path(folder) / "autoregressive" / "models" / "gpt.py").is_file():
        sys.exit(f"--llamagen {folder}: not a LlamaGen checkout (autoregressive/models/gpt.py is missing)")
    sys.path.insert(0, str(Path(folder).resolve()))
    from autoregressive.models.generate import generate  # noqa: E402  (LlamaGen, from the user's checkout)
    from autoregressive.models.gpt import GPT_B  # noqa: E402

    torch.manual_seed(0)
    model = GPT_B(vocab_size=V, block_size=TOKENS, num_classes=CLASSES, cls_token_num=1, model_type="c2i").eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.to(device), generate


def ctfgen_models(llamagen: torch.nn.Module | None, device: torch.device) -> dict[str, torch.nn.Module]:
    """The baseline (LlamaGen's weights when given) and a GPT-B coarse model over K labels."""
    torch.manual_seed(0)
    if llamagen is not None:
        baseline = import_llamagen_gpt(llamagen.state_dict(), "GPT-B", num_classes=CLASSES, grid=GRID, vocab_size=V)
    else:
        baseline = build_model(preset_config("GPT-B", role="baseline", vocab_size=V, num_classes=CLASSES,
                                             grid_h=GRID, grid_w=GRID))
    coarse = build_model(preset_config("GPT-B", role="coarse", vocab_size=K, num_classes=CLASSES, grid_h=GRID, grid_w=GRID))
    for model in (baseline, coarse):
        torch.nn.init.normal_(model.head.weight, std=0.02)
    return {"baseline": baseline.to(device).eval(), "CTF stage 1": coarse.to(device).eval()}


def compiled_variants(models: dict[str, torch.nn.Module], eager: Iterable[tuple[str, str]],
                      torch_attention: bool) -> dict[tuple[str, str], torch.nn.Module]:
    """The eager rows' (role, precision)s again with the decode step compiled, each a copy of its own; not
    fp32-packed: inductor cannot compile those weights and freezes plain fp32 itself. torch_attention: each also
    compiled with torch's attention kernel instead of inductor's fused loops (set before the first call traces)."""
    compiled = {}
    for role, p in eager:
        if p == "fp32-packed":
            continue
        for kind in ("compiled", "compiled, torch attention")[:1 + torch_attention]:
            compiled[(role, f"{p}, {kind}")] = fast = for_decoding(copy.deepcopy(models[role]), p)
            fast.compile_step()
            if kind.endswith("torch attention"):
                for block in fast.blocks:
                    block.attn.fused_decode = False
    return compiled


def profile_step(model: torch.nn.Module) -> dict[str, float]:
    """Milliseconds of one decode step (batch 1 with CFG, at the middle position) by kind of operation."""
    from torch.profiler import profile

    cache = decode_cache(model, 2)  # as sampling makes it
    token = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        model.prefill(torch.tensor([0, CLASSES]), cache)
        for _ in range(3):
            cache.pos = TOKENS // 2
            model.step(token, cache)
        with profile() as prof:
            for _ in range(10):
                cache.pos = TOKENS // 2
                model.step(token, cache)
    kinds = {"matrix products": ("aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "aten::bmm",
                                 "mkldnn::_linear_pointwise"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")}
    totals = {kind: 0.0 for kind in [*kinds, "everything else"]}
    for event in prof.key_averages():
        kind = next((k for k, names in kinds.items() if event.key in names), "everything else")
        totals[kind] += event.self_cpu_time_total / 1e3 / 10  # microseconds over 10 steps -> ms per step
    return totals


LAYER_SHAPES = [(128, 128), (128, 512), (256, 768), (512, 512), (128, 4096), (512, 1536), (768, 768), (768, 2304),
                (2048, 768), (768, 16384)]  # (in, out): small and GPT-B blocks and heads


def layer_sweep(dtype: torch.dtype, n_rows: int = 2) -> list[dict[str, float]]:
    """Best microseconds of one layer at `n_rows` rows, plain and packed, interleaved (same background load)."""
    rows, rounds = [], max(5, 600 // n_rows)
    print(f"one {dtype} linear layer at {n_rows} rows, best of {rounds} ({torch.get_num_threads()} threads):")
    for d_in, d_out in LAYER_SHAPES:
        plain = torch.nn.Linear(d_in, d_out, bias=False).to(dtype)
        runs = {"plain": plain, "packed": PackedLinear(plain)}
        x = torch.randn(n_rows, 1, d_in, dtype=dtype)
        best = {name: float("inf") for name in runs}
        with torch.no_grad():
            for _ in range(rounds):
                for name, layer in runs.items():
                    start = time.perf_counter()
                    layer(x)
                    best[name] = min(best[name], time.perf_counter() - start)
        rows.append({"dtype": str(dtype), "rows": n_rows, "in": d_in, "out": d_out, "weights": d_in * d_out,
                     "plain_us": 1e6 * best["plain"], "packed_us": 1e6 * best["packed"],
                     "packed_over_plain": best["packed"] / best["plain"]})
        left_plain = dtype == torch.float32 and d_in * d_out < PACK_MIN_WEIGHTS and n_rows == 2
        print(f"  {d_in:5d} x {d_out:5d} ({plain.weight.nbytes / 2 ** 20:6.2f} MiB): plain {rows[-1]['plain_us']:8.1f} us, "
              f"packed {rows[-1]['packed_us']:8.1f} us, packed/plain {rows[-1]['packed_over_plain']:.2f}"
              + ("  (fp32-packed leaves it plain in a decode step)" if left_plain else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1, one round (otherwise batch 1 and 8, 3 rounds)")
    ap.add_argument("--batches", type=arg_type(Count), nargs="+", default=None,
                    help="batch sizes (default 1 and 8; quick: 1)")
    ap.add_argument("--llamagen", default=None, help="a LlamaGen checkout: also time its generate() on the same weights")
    ap.add_argument("--precisions", default=None, help="ctfgen decode precisions to time (default: all on the CPU, "
                    "fp32,bf16 on CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 3; quick 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="also break one decode step down by operation")
    ap.add_argument("--layers", action="store_true",
                    help="only time plain against packed weights per layer shape (fp32, bf16)")
    ap.add_argument("--rows", type=arg_type(Count), nargs="+", default=[2],
                    help="--layers: rows of the products (2: one image with CFG; 64 and up: a refiner's pass)")
    ap.add_argument("--compile", action="store_true", help="also the rows with the decode step compiled (minutes of "
                    "compiling first)")
    ap.add_argument("--torch-attention", action="store_true",
                    help="--compile: also each compiled row with torch's attention kernel (what inductor's loops gain)")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu, or cuda for the GPU rows (see above)")
    ap.add_argument("--out", default="runs/bench-decode/bench_decode.json")
    args = ap.parse_args()
    device = args.device
    on_gpu = device.type == "cuda"
    if on_gpu and (args.profile or args.layers):
        ap.error("--profile and --layers time CPU kernels; leave out --device cuda")
    if args.compile and args.layers:
        ap.error("--compile times whole samples; --layers times single layers: give one of them")
    if args.torch_attention and (not args.compile or on_gpu):
        ap.error("--torch-attention compares compiled rows on the CPU (elsewhere both use torch's kernel): give "
                 "--compile, without --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers:
        layers = []
        dtypes = [torch.float32] + ([torch.bfloat16] if packed_kernels_available(torch.bfloat16) else [])
        for n_rows in args.rows:
            for dtype in dtypes:
                layers += layer_sweep(dtype, n_rows)
        write_json(args.out, {"date": str(date.today()), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpu": platform.processor() or platform.machine(), "layers": layers})
        print(f"\nwritten to {args.out}")
        return
    warnings.filterwarnings("ignore", category=FutureWarning)  # LlamaGen's torch.backends.cuda.sdp_kernel
    batches, repeats = ([1], args.repeats or 1) if args.quick else ([1, 8], args.repeats or 3)
    batches = args.batches or batches
    precisions = args.precisions.split(",") if args.precisions else ["fp32", "bf16"] if on_gpu else DECODE_PRECISIONS
    offered = [p for p in DECODE_PRECISIONS if not (on_gpu and p == "fp32-packed")]  # (packing: oneDNN, the CPU)
    if set(precisions) - set(offered):
        ap.error(f"--precisions: each of {', '.join(offered)} on this device; got {args.precisions}")
    llamagen, generate = llamagen_gpt_b(args.llamagen, device) if args.llamagen else (None, None)
    models = ctfgen_models(llamagen, device)
    eager = {(role, p): for_decoding(model, p) for role, model in models.items() for p in precisions
             if role == "baseline" or p in ("fp32", "fp32-packed", "int8")}
    variants = eager
    bandwidth = read_bandwidth(device)  # measured again every round, the best kept: the same rule as the samplers' times
    llamagen_name = "LlamaGen generate (bf16 autocast)" if on_gpu else "LlamaGen generate (fp32)"

    rows = []
    for batch in batches:
        labels = torch.arange(batch, device=device) % CLASSES
        if args.compile:  # made afresh for each batch: on the CPU inductor tunes its kernels to the first batch's rows
            torch._dynamo.reset()
            variants = {**eager, **compiled_variants(models, eager, args.torch_attention)}
        runs: dict[str, Callable[[], object]] = {}
        if llamagen is not None:
            def llamagen_run() -> object:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):  # as ctfgen samples there
                    return generate(llamagen, labels, TOKENS, cfg_scale=STAGE1.cfg, temperature=STAGE1.temperature,
                                    top_k=0, top_p=1.0)
            runs[llamagen_name] = llamagen_run
        for (role, p), model in variants.items():
            runs[f"ctfgen {role} ({p})"] = (lambda m: lambda: sample_causal(m, labels, STAGE1,
                                                                            torch.Generator(device=device)))(model)
        for (role, p), model in variants.items():
            if "compiled" in p:  # compiles the prefill's and the steps' shapes, untimed
                with torch.no_grad():
                    runs[f"ctfgen {role} ({p})"]()
        best = {name: float("inf") for name in runs}
        for _ in range(repeats):
            bandwidth = max(bandwidth, read_bandwidth(device))
            print(f"  read bandwidth: {bandwidth / 1e9:.1f} GB/s, best so far ({torch.get_num_threads()} threads)",
                  flush=True)
            for name, run in runs.items():
                with torch.no_grad():
                    best[name] = min(best[name], wall_seconds(run, device) / TOKENS)
                print(f"  batch {batch} {name}: {1e3 * best[name]:.1f} ms/token", flush=True)
        reference = best.get(llamagen_name)
        bound = {f"ctfgen {role} ({p})": weight_bytes_per_token(m) / bandwidth for (role, p), m in variants.items()}
        bound[llamagen_name] = bound["ctfgen baseline (fp32)"] if "fp32" in precisions else float("nan")
        rows += [{"batch": batch, "sampler": name, "ms_per_token": 1e3 * s, "bound_ms": 1e3 * bound[name],
                  "over_bound": s / bound[name], "speedup_over_llamagen": reference / s if reference else None}
                 for name, s in best.items()]

    print(f"\n{'batch':>5}  {'sampler':52} {'ms/token':>9} {'x LlamaGen':>10} {'bound ms':>9} {'/bound':>7}")
    for r in rows:
        speedup = f"{r['speedup_over_llamagen']:.2f}" if r["speedup_over_llamagen"] else "-"
        print(f"{r['batch']:5d}  {r['sampler']:52} {r['ms_per_token']:9.1f} {speedup:>10} {r['bound_ms']:9.1f} "
              f"{r['over_bound']:7.2f}")
    by_name = {(r["batch"], r["sampler"]): r for r in rows}
    for (batch, name), ctf in by_name.items():  # what the smaller head buys, against what it can buy
        base = by_name.get((batch, name.replace("CTF stage 1", "baseline")))
        if "CTF stage 1" in name and base:
            print(f"batch {batch} {name} / baseline: {base['ms_per_token'] / ctf['ms_per_token']:.2f}x measured, "
                  f"{base['bound_ms'] / ctf['bound_ms']:.2f}x in weight bytes a token reads (the most a "
                  "bandwidth-bound step can gain)")
    profiles = {}
    if args.profile:
        for p in precisions:
            profiles[p] = profile_step(variants[("baseline", p)])
            print(f"\none decode step of the baseline ({p}, batch 1 with CFG), ms:",
                  ", ".join(f"{kind} {ms:.1f}" for kind, ms in profiles[p].items()))
    write_json(args.out, {"date": str(date.today()), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine(), "quick": args.quick, "repeats": repeats,
                          "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                          "bandwidth_gb_s": bandwidth / 1e9, "rows": rows, "profile_ms": profiles})
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
