"""Speculative sampling of the autoregressive stage: how often the draft is right, and what that buys.

    python benchmarks/bench_speculative.py --pair "CTF K=512=runs/x/coarse:runs/x/draft-coarse" \
        --pair "baseline V=4096=runs/x/baseline:runs/x/draft-baseline" --quick

    python benchmarks/bench_speculative.py --run runs/x --ctf-draft runs/x/counts-coarse \
        --baseline-draft runs/x/counts-baseline --lookaheads 4 --batches 1

Each --pair is NAME=MODEL:DRAFT: a trained model folder and its draft, of one role: a smaller model (a
coarse draft over the same K; a baseline draft over the same V) or a `ctfgen count-draft` folder (counts
by class, position and neighbours, no network). For each lookahead it samples the same labels plainly and
speculatively (CFG 2.0, t 1.0, the bench's sampler settings) and reports
- the acceptance rate: the share of proposed tokens a row keeps,
- tokens per pass: tokens each row has once the batch is done, per pass of the large model (plain: 1),
- the speed-up: wall time plain / speculative, measured side by side (rows alternate, best of the rounds).
On a CPU at these small shapes a step of any model costs mostly fixed overhead, so the draft is not
much cheaper than the model and the wall-time speed-up says little about large models. `--project`
also times, at LlamaGen's GPT-B shape with random weights and at each batch size, one decode step, one
verification pass over lookahead + 1 tokens and a step of a draft of size `--draft-size`, and combines
them with the measured tokens per pass: the speed-up a GPT-B model with this acceptance would see (a
projection from measured parts, labelled as such). `--decode-precision` samples both models of a pair, and
times both in the projection, at that precision (`ctfgen sample --decode-precision`). A count draft's step
in the projection is its own time per proposed token, measured while it sampled (it does not depend on the
model's size).

`--run DIR` (a run folder as `ctfgen demo` leaves one: tokenizer, hierarchy, coarse, refiner, baseline) times
whole samples instead, side by side: CTF (stage 1 and the refiner pass) and the baseline, each plain and with
its draft (`--ctf-draft`, `--baseline-draft`) at each of `--lookaheads`, and prints CTF/baseline: issue
13's ratio, measured end to end on trained models.

`--compile` compiles every decode step timed (`Transformer.compile_step`, as `ctfgen sample --compile`: the pairs'
models, the projection's GPT-B parts, both pipelines of `--run`), each shape's first calls untimed; a count draft
is not compiled (it is numpy).

`--device cuda` runs all of it on the GPU as ctfgen samples there (bf16 autocast, a bf16 KV cache; a count
draft proposes on the CPU from the codes copied to it), the projection's GPT-B parts included: where a pass at
batch 8-64 costs about what a step does, which a CPU does not show.
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import torch

from ctfgen.arguments import Count, arg_list, arg_type
from ctfgen.artifacts import write_json
from ctfgen.count_draft import CountDraft, load_draft
from ctfgen.errors import CtfgenError
from ctfgen.pipeline import load_pipeline
from ctfgen.runtime import device_arg, wall_seconds
from ctfgen.sampling import StageSettings, decode_cache, inference_mode, sample_baseline, sample_causal, sample_ctf
from ctfgen.transformer import Transformer, build_model, load_model, preset_config
from ctfgen.transformer.precision import DECODE_PRECISIONS, for_decoding

SETTINGS = StageSettings(cfg=2.0, temperature=1.0)
STAGE2 = StageSettings(cfg=1.0, temperature=1.0)  # unguided as the pipeline's default stage 2; t 1.0 as stage 1 here


def parse_pair(text: str) -> tuple[str, Path, Path]:
    name, _, paths = text.rpartition("=")
    model, _, draft = paths.partition(":")
    if not (name and model and draft):
        raise SystemExit(f"--pair {text!r}: expected NAME=MODEL_FOLDER:DRAFT_FOLDER")
    return name, Path(model), Path(draft)


def measure(model: torch.nn.Module, draft: torch.nn.Module, batch: int, lookaheads: list[int], images: int,
            rounds: int, warm_up: bool = False) -> list[dict]:
    device = model.head.weight.device
    labels = torch.arange(images, device=device) % model.config.num_classes
    counted = {k: TimedCounts(draft) for k in lookaheads} if isinstance(draft, CountDraft) else {}
    runs = [0, *lookaheads]  # 0: plain sampling
    for k in runs if warm_up else ():  # a compiled step's first calls at these shapes compile it
        sample_causal(model, labels[:batch], SETTINGS, torch.Generator(device).manual_seed(0), draft=draft if k else None,
                      lookahead=max(k, 1))
    best = {k: float("inf") for k in runs}
    stats: dict[int, dict[str, int]] = {k: {} for k in lookaheads}
    for r in range(rounds):
        for k in runs:
            g = torch.Generator(device).manual_seed(r)

            def sample_all() -> None:
                for chunk in labels.split(batch):
                    if k:
                        d = counted[k] if counted and r == 0 else draft  # the first round times the count draft
                        sample_causal(model, chunk, SETTINGS, g, draft=d, lookahead=k,
                                      stats_out=stats[k] if r == 0 else None)
                    else:
                        sample_causal(model, chunk, SETTINGS, g)
            best[k] = min(best[k], wall_seconds(sample_all, device))
    out = []
    for k in lookaheads:
        s = stats[k]
        passes = s["rounds"] + len(labels.split(batch))  # each batch's first token takes a pass too
        out.append({"batch": batch, "lookahead": k, "acceptance": s["accepted"] / s["proposed"],
                    "tokens_per_pass": s["tokens"] / passes, "speedup": best[0] / best[k]})
        if counted:
            out[-1]["count_draft_step_s"] = counted[k].step_s
    return out


class TimedCounts:
    """A count draft whose proposals are timed: `step_s` is the seconds it took per proposed token of a batch."""

    def __init__(self, draft: CountDraft):
        self.draft, self.config, self.seconds, self.steps = draft, draft.config, 0.0, 0

    @property
    def step_s(self) -> float:
        return self.seconds / max(self.steps, 1)

    def proposer(self, class_labels: torch.Tensor, settings: StageSettings):
        inner, timer = self.draft.proposer(class_labels, settings), self

        class Timed:
            def propose(self, codes: torch.Tensor, t: torch.Tensor, n: int, generator: torch.Generator | None):
                start = time.perf_counter()
                out = inner.propose(codes, t, n, generator)
                timer.seconds, timer.steps = timer.seconds + time.perf_counter() - start, timer.steps + n
                return out
        return Timed()


def gpt_b_costs(role: str, vocab: int, batch: int, lookaheads: list[int], draft_size: str | None, precision: str,
                device: torch.device, compile: bool = False, repeats: int = 5) -> dict:
    """Seconds of a GPT-B decode step, a verification pass over k + 1 tokens (per-row positions, as speculative
    sampling runs it), and a draft step of a `draft_size` model (None: no draft model, a count draft times itself)
    (CFG: 2 x batch rows), all at the decode precision, compiled or not, on `device` as sampling runs there."""
    def model(size: str):
        torch.manual_seed(0)
        with torch.device(device):
            built = for_decoding(build_model(preset_config(size, role=role, vocab_size=vocab, num_classes=1000,
                                                           grid_h=16, grid_w=16)).eval(), precision)
        if compile:
            built.compile_step()
        return built

    def step_time(m, n: int) -> float:
        cache = decode_cache(m, 2 * batch, n)  # as sampling makes it
        tokens = torch.zeros(2 * batch, n, dtype=torch.long, device=device)
        position = 128 if n == 1 else torch.full((2 * batch,), 128, device=device)
        best = float("inf")
        with inference_mode(m):
            m.prefill(torch.arange(2 * batch, device=device) % 1001, cache)
            for _ in range(repeats + compile):  # compiled, the first call compiles: the best is of the others
                cache.pos = position
                best = min(best, wall_seconds(lambda: m.step(tokens, cache), device))
        return best

    big = model("GPT-B")
    costs = {"step_s": step_time(big, 1), "verify_s": {k: step_time(big, k + 1) for k in lookaheads}}
    if draft_size is not None:
        costs["draft_step_s"] = step_time(model(draft_size), 1)
    return costs


def decoding_draft(folder: str, args: argparse.Namespace) -> Transformer | CountDraft:
    draft = load_draft(folder, args.device)
    return for_decoding(draft, args.decode_precision) if isinstance(draft, Transformer) else draft


def measure_run(args: argparse.Namespace, batches: list[int], lookaheads: list[int], images: int,
                rounds: int) -> list[dict]:
    """Seconds per image of CTF and the baseline of one run, plain and with their drafts at each lookahead,
    side by side (the methods alternate within each round; each keeps its best round); the tokenizer's
    decoder is not timed. One row per batch and lookahead; the plain times are shared by a batch's rows."""
    ctf, base = load_pipeline(args.run, "ctf", args.device), load_pipeline(args.run, "baseline", args.device)
    ctf.prepare_decode(args.decode_precision, compile=args.compile)
    base.prepare_decode(args.decode_precision, compile=args.compile)
    mask = ctf.hierarchy.member_mask
    methods = {"CTF": lambda y, g, d, k: sample_ctf(ctf.coarse, ctf.refiner, y, SETTINGS, STAGE2, g, mask, draft=d,
                                                    lookahead=k),
               "baseline": lambda y, g, d, k: sample_baseline(base.model, y, SETTINGS, g, d, k)}
    drafts = {name: decoding_draft(folder, args) for name, folder in
              (("CTF", args.ctf_draft), ("baseline", args.baseline_draft)) if folder}
    runs = [(name, None, 0) for name in methods] + [(name, drafts[name], k) for k in lookaheads
                                                      for name in methods if name in drafts]
    labels = torch.arange(images, device=args.device) % ctf.num_classes
    rows = []
    for batch in batches:
        if args.compile:  # the compiler's first calls at this batch size are not timed
            for name, draft, k in runs:
                methods[name](labels[:batch], torch.Generator(args.device).manual_seed(0), draft, k)
        best = [float("inf")] * len(runs)
        for r in range(rounds):
            for i, (name, draft, k) in enumerate(runs):
                g = torch.Generator(args.device).manual_seed(r)
                seconds = wall_seconds(lambda: [methods[name](y, g, draft, k) for y in labels.split(batch)], args.device)
                best[i] = min(best[i], seconds / images)
        plain = {name: s for (name, d, _), s in zip(runs, best) if d is None}
        for k in lookaheads:
            t = {**plain, **{f"{name} + draft": s for (name, d, kk), s in zip(runs, best) if d is not None and kk == k}}
            row = {"batch": batch, "lookahead": k, "s_per_image": t, "ctf_over_baseline": {"plain": t["baseline"] / t["CTF"]}}
            if "CTF + draft" in t:
                row["ctf_over_baseline"]["CTF drafted, baseline plain"] = t["baseline"] / t["CTF + draft"]
            if "CTF + draft" in t and "baseline + draft" in t:
                row["ctf_over_baseline"]["both drafted"] = t["baseline + draft"] / t["CTF + draft"]
            rows.append(row)
            print(f"\nrun {args.run}, batch {batch}, lookahead {k}: ms per image "
                  + ", ".join(f"{name} {v * 1e3:.1f}" for name, v in t.items())
                  + "; CTF/baseline " + ", ".join(f"{n} {v:.2f}" for n, v in row["ctf_over_baseline"].items()),
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", action="append", default=[], help="NAME=MODEL_FOLDER:DRAFT_FOLDER (repeatable)")
    ap.add_argument("--run", default=None, help="a run folder: time whole CTF and baseline samples, plain and drafted")
    ap.add_argument("--ctf-draft", default=None, help="with --run: the coarse model's draft folder")
    ap.add_argument("--baseline-draft", default=None, help="with --run: the baseline's draft folder")
    ap.add_argument("--lookaheads", type=arg_list(Count), default=[1, 2, 4, 8], help="e.g. 1,2,4,8")
    ap.add_argument("--batches", type=arg_list(Count), default=[1, 8], help="e.g. 1,8")
    ap.add_argument("--images", type=arg_type(Count), default=64, help="images per measurement (quick: 16)")
    ap.add_argument("--rounds", type=arg_type(Count), default=2, help="timing rounds, best kept (quick: 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--project", action="store_true", help="also project the speed-up at GPT-B from measured parts")
    ap.add_argument("--draft-size", default="small", help="the draft's size in the GPT-B projection")
    ap.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="fp32",
                    help="both models' weights while sampling and in the projection (ctfgen sample's flag)")
    ap.add_argument("--compile", action="store_true",
                    help="every decode step timed compiled (ctfgen sample's flag), warmed up untimed")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu, or cuda: everything on the GPU (see above)")
    ap.add_argument("--out", default="runs/bench-speculative/bench_speculative.json")
    args = ap.parse_args()
    if not args.pair and not args.run:
        ap.error("give --pair NAME=MODEL:DRAFT and/or --run DIR")
    if args.compile and args.decode_precision == "fp32-packed":
        ap.error("--compile takes fp32 (inductor freezes and packs it), bf16 or int8, not fp32-packed")
    try:
        run(args)
    except CtfgenError as e:  # a folder that is not what it should be: one error line
        ap.error(str(e))


def run(args: argparse.Namespace) -> None:
    lookaheads, batches = args.lookaheads, args.batches
    images, rounds = (16, 1) if args.quick else (args.images, args.rounds)
    results = []
    for name, model_dir, draft_dir in map(parse_pair, args.pair):
        model = for_decoding(load_model(model_dir, args.device), args.decode_precision)
        if args.compile:
            model.compile_step()
        draft = decoding_draft(draft_dir, args)
        vocab = model.config.vocab_size
        size = f"{draft.num_params() / 1e6:.2f} M parameters" if isinstance(draft, Transformer) else "counts"
        print(f"{name}: model {model.num_params() / 1e6:.2f} M parameters, draft {size}, vocabulary {vocab}", flush=True)
        rows = [row for b in batches for row in measure(model, draft, b, lookaheads, images, rounds, args.compile)]
        if args.project:
            role = model.config.role  # the coarse model keeps its K; a baseline gets LlamaGen's V
            draft_size = None if isinstance(draft, CountDraft) else args.draft_size
            costs = {b: gpt_b_costs(role, vocab if role == "coarse" else 16384, b, lookaheads, draft_size,
                                    args.decode_precision, args.device, args.compile) for b in batches}
            for row in rows:
                k, c = row["lookahead"], costs[row["batch"]]
                draft_s = row["count_draft_step_s"] if "count_draft_step_s" in row else c["draft_step_s"]
                round_s = k * draft_s + c["verify_s"][k]
                row["gpt_b_projected_speedup"] = row["tokens_per_pass"] * c["step_s"] / round_s
            results.append({"name": name, "vocab": vocab, "rows": rows, "gpt_b_costs": costs})
        else:
            results.append({"name": name, "vocab": vocab, "rows": rows})
    if results:
        print(f"\n{'pair':24} {'batch':>5} {'lookahead':>9} {'accepted':>8} {'tok/pass':>8} {'speed-up':>8}"
              + (f" {'GPT-B proj.':>11}" if args.project else ""))
    for r in results:
        for row in r["rows"]:
            extra = f" {row['gpt_b_projected_speedup']:11.2f}" if args.project else ""
            print(f"{r['name']:24} {row['batch']:5d} {row['lookahead']:9d} {row['acceptance']:8.2f} "
                  f"{row['tokens_per_pass']:8.2f} {row['speedup']:8.2f}{extra}")
    end_to_end = measure_run(args, batches, lookaheads, images, rounds) if args.run else []
    write_json(args.out, {"date": str(date.today()), "torch": torch.__version__, "device": str(args.device),
                          "threads": torch.get_num_threads(),
                          "decode_precision": args.decode_precision, "compile": args.compile,
                          "settings": vars(SETTINGS), "images": images,
                          "rounds": rounds, "results": results, "end_to_end": end_to_end})
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
