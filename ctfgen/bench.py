"""`ctfgen bench`: CTF against the baseline as a grid of cells, on Fashion-MNIST or `--data`.

The grid (`ctfgen.experiments.grids`) is data; each cell is run by `experiments.protocol.Workshop`
through the engine (`experiments.engine.run_grid`: one JSON line per finished cell in OUT/cells.jsonl,
so an interrupted bench resumes and a finished cell is never recomputed); the report
(`experiments.report`) is written from that file alone. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from .arguments import Count, Positive, arg_type
from .data.datasets import build_dataset, check_data
from .errors import CtfgenError
from .experiments import Results, cell_key, run_grid
from .experiments.grids import GRIDS
from .experiments.protocol import FOLDERS, Cell, Workshop
from .experiments.report import write_report
from .outputs import add_output_flags, check_not_busy, folder_state, plan_output
from .runtime import pick_device
from .transformer import MODEL_SIZES

log = logging.getLogger(__name__)
BENCH_KIND = "bench"  # the kind of the folder `ctfgen bench` writes (ctfgen.outputs)
RESULTS_NAME = "cells.jsonl"


def machine() -> str:
    cpu = " ".join(filter(None, (platform.machine(), platform.processor())))
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def cell_condition(text: str) -> tuple[str, Any]:
    """An argparse type: FIELD=VALUE, a field of a cell and the value a cell must have there (read as JSON:
    400, 0.25, true, [1.0, 0.25]; anything else is a string, e.g. tiny)."""
    name, equals, value = text.partition("=")
    fields = sorted(f.name for f in dataclasses.fields(Cell) if f.name != "scoring")
    if not equals or name not in fields:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with FIELD one of {', '.join(fields)}; got {text!r}")
    try:
        wanted = json.loads(value)
    except json.JSONDecodeError:
        wanted = value
    return name, tuple(wanted) if isinstance(wanted, list) else wanted  # a cell holds tuples


def conditions_text(only: Sequence[tuple[str, Any]]) -> str:
    return " ".join(f"{name}={json.dumps(value)}" for name, value in only)


def bench_cells(grid: str, seeds: int, quick: bool, data: str, data_dir: str | None, steps: int | None = None,
                size: str | None = None, tokenizer_steps: int | None = None,
                beyond_cfg: Sequence[float] = (), only: Sequence[tuple[str, Any]] = (),
                tokenizer_seeds: int = 1) -> list[Cell]:
    """The grid's cells, each on `tokenizer_seeds` tokenizer instances, that have every value `only` names
    (`cell_condition`), with `steps`, `size`, `tokenizer_steps` and `beyond_cfg` (the scoring's) then
    overriding every cell's (duplicates dropped). Reading the training set (budgets in epochs need its size)
    also checks `data`."""
    train_items = len(build_dataset(data, "train", data_dir=data_dir))
    cells = GRIDS[grid](Cell(side="ctf", steps=1, data=data), seeds, quick, train_items)
    cells = [replace(c, tokenizer_seed=t) for t in range(tokenizer_seeds) for c in cells]
    kept = [c for c in cells if all(getattr(c, name) == value for name, value in only)]
    if not kept:
        quick_form = " (quick)" if quick else ""
        taken = {name: sorted({json.dumps(getattr(c, name)) for c in cells}) for name, _ in only}
        missing = [f"{name} takes {', '.join(taken[name])} there" for name, value in only
                   if json.dumps(value) not in taken[name]]
        raise CtfgenError(f"--only {conditions_text(only)}: no cell of the {grid} grid{quick_form} has that"
                          + (f" ({'; '.join(missing)})" if missing else " (each value is there, not all together)"))
    cells = kept
    if steps is not None:
        cells = [replace(c, steps=steps) for c in cells]
    if size is not None:
        cells = [replace(c, size=size, refiner_size=size) for c in cells]
    if tokenizer_steps is not None:
        cells = [replace(c, tokenizer_steps=tokenizer_steps) for c in cells]
    if beyond_cfg:
        try:
            cells = [replace(c, scoring=replace(c.scoring, beyond_cfg=tuple(beyond_cfg))) for c in cells]
        except ValueError as e:  # values at or below the grid's own guidance
            raise CtfgenError(f"--beyond-cfg: {e}") from None
    return list({cell_key(c): c for c in cells}.values())


def check_parts(parts: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Bench folders to merge into `out`: each one, not `out` itself, and written by no running process."""
    checked = []
    for part in map(Path, parts):
        if not part.is_dir() or folder_state(part)[0] != BENCH_KIND:
            raise CtfgenError(f"--merge {part}: not a folder `ctfgen bench` wrote")
        if part.resolve() == Path(out).resolve():
            raise CtfgenError(f"--merge {part}: that is --out itself")
        check_not_busy(part)
        checked.append(part)
    return checked


def _content(folder: Path) -> str | None:
    """A hash of an artifact's weights or codes: what two folders of one name must share to be the same."""
    for name in ("model.safetensors", "codes.npy"):
        if (folder / name).is_file():
            digest = hashlib.sha256()
            with open(folder / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            return digest.hexdigest()
    return None


def merge_parts(parts: Sequence[Path], out: Path) -> int:
    """Fold bench folders `parts` (one grid run in pieces, say `--only seed=S` on several machines) into `out`:
    their cells' results and whatever of the Workshop's folders `out` lacks (finished artifacts and models,
    measurements, sample grids, reference statistics). An artifact both hold must be the same one (same
    weights or codes), else the parts' numbers rest on different tokenizers or classifiers: refused. Returns
    how many cells were added."""
    for part in parts:  # every check before anything is copied
        for folder in sorted((part / "artifacts").glob("*")):
            mine = out / "artifacts" / folder.name
            if mine.is_dir() and folder_state(mine)[1] and folder_state(folder)[1] and _content(mine) != _content(folder):
                raise CtfgenError(f"--merge {part}: its artifacts/{folder.name} differs from the one in {out}; parts "
                                  "must share their artifacts (start each from a copy of one folder that holds them, "
                                  "or give them all the same --run)")
    results, added = Results(out / RESULTS_NAME), 0
    for part in parts:
        for name in FOLDERS:
            for item in sorted((part / name).glob("*")):
                target = out / name / item.name
                if target.exists() or item.name.startswith("."):  # (dot names: a stage's temporary files)
                    continue
                if item.is_dir() and name in ("artifacts", "models") and not folder_state(item)[1]:
                    continue  # unfinished: a run in `out` trains it again
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, target)
        def moved(path: str) -> str:  # an artifact of the part is now the one in `out`
            inside = Path(path).resolve().is_relative_to(part.resolve())
            return str(out / Path(path).resolve().relative_to(part.resolve())) if inside else path

        have = {r["key"] for r in results.load(quiet=True)}
        for record in Results(part / RESULTS_NAME).load():
            if record["key"] not in have:
                artifacts = {name: moved(path) for name, path in record["result"]["artifacts"].items()}
                results.append({**record, "result": {**record["result"], "artifacts": artifacts}})
                have.add(record["key"])
                added += 1
    return added


def run_bench(out: str | Path, cells: list[Cell], meta: dict[str, Any], data_dir: str | None = None,
              cache_dir: str | None = None, run: str | Path | None = None, device: str = "cpu", force: bool = False,
              resume: bool = False, classifier_epochs: int = 2, classifier_limit: int | None = 20000,
              report_also: Sequence[Cell] = (), report_only: bool = False,
              merge: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run `cells` into folder `out` and write the report; `meta` (grid, data, seeds, ...) heads it. A finished
    folder is replaced only with `force`; an interrupted one continues (cells done stay done) only with
    `resume` (see ctfgen.outputs). The report also covers those of `report_also` (the rest of a grid run in
    parts) that the folder holds results of. `report_only`: run nothing, report the cells the folder holds
    results of (of an interrupted grid too) and leave the folder's state as it was. `merge`: run nothing, fold
    those bench folders into `out` (`merge_parts`; a new `out` is made), then report as `report_only` does."""
    start = time.perf_counter()
    device = str(pick_device(device))  # every check before the folder is created
    for data in {c.data for c in cells}:
        check_data(data, data_dir)
    if merge and force:  # a replacement is written beside `out` and swapped in: the parts' paths would not be it
        raise CtfgenError("--merge adds the parts to OUT: it does not go with --force (merge into a new folder instead)")
    parts = check_parts(merge, out)
    output = plan_output(out, BENCH_KIND, force=force, resume=resume or report_only or bool(parts), resumable=True)
    results = Results(output.path / RESULTS_NAME)
    if parts:
        output.open()
        log.info("%d cells merged into %s", merge_parts(parts, output.path), out)
    if report_only or parts:
        records = []
    else:
        output.open()
        workshop = Workshop(output.path, data_dir, cache_dir, run, device, classifier_epochs, classifier_limit)
        records = run_grid(cells, workshop.run, results)
    done, ran = {r["key"]: r for r in results.load()}, {r["key"] for r in records}
    records += [done[key] for key in dict.fromkeys(map(cell_key, [*cells, *report_also])) if key in done
                and key not in ran]
    if not records:
        held = "holds no results of these cells" if output.path.is_dir() else "does not exist"
        raise CtfgenError(f"{out}: {held}; nothing to report")
    meta = {"command": " ".join(sys.argv), **meta, "machine": machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - start, 1)}
    summary = write_report(records, meta, output.path)
    if not report_only:
        output.finish()
    return summary


# --- the `ctfgen bench` command ------------------------------------------------------------------------

def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grid", default="versus", choices=sorted(GRIDS),
                   help="versus: the protocol (seeds, refiners, compute-matched baselines); map: V x K x size x "
                        "epochs; cpu: versus cut to a 2-core CPU session; refiner: the refiner options; precision: "
                        "the AR stage sampled in fp32, bf16 and int8; stage2: the cheap within-cluster refiner "
                        "against the baseline at its compute (docs/bench.md)")
    p.add_argument("--quick", action="store_true", help="the grid's quick form (tiny models, minutes on a CPU)")
    p.add_argument("--seeds", type=arg_type(Count), default=None, help="training seeds per cell (default 3; quick 2)")
    p.add_argument("--tokenizer-seeds", type=arg_type(Count), default=1,
                   help="tokenizer instances (seeds 0, 1, ...), each with every training seed: the report's spread then "
                        "covers the tokenizer too (each instance is trained anew: expensive)")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench-GRID[-quick])")
    p.add_argument("--run", default=None, help="reuse RUN/{tokenizer,codes-train,codes-test,hierarchy,classifier} "
                   "where their V and K fit a cell")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist', an .npz or an image folder with one "
                   "sub-folder per class (a set without a test split gets a seeded, class-balanced 10%% hold-out)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--cache-dir", default=None, help="reference-statistics cache (default: OUT/cache)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--steps", type=arg_type(Count), default=None, help="one training budget for every cell")
    p.add_argument("--size", default=None, choices=sorted(MODEL_SIZES), help="one model size for every cell")
    p.add_argument("--tokenizer-steps", type=arg_type(Count), default=None,
                   help="the tokenizer's training steps for every cell (grids: 600; quick 100); when the floors show "
                        "the tokenizer's reconstructions near the samples, a longer-trained tokenizer leaves more room")
    p.add_argument("--beyond-cfg", type=arg_type(Positive), nargs="+", default=[], metavar="CFG",
                   help="stronger guidance to try, in turn, for a side whose best point sits at the largest CFG scored "
                        "so far (e.g. 6 8; above the grid's 4)")
    p.add_argument("--only", type=cell_condition, nargs="+", default=[], metavar="FIELD=VALUE",
                   help="run only the grid's cells with these values (before --steps and --size apply), e.g. "
                        "size=small refiner_mask=true; fields as in ctfgen.experiments.protocol.Cell")
    p.add_argument("--merge", nargs="+", default=[], metavar="PART",
                   help="run nothing: fold these bench folders (the grid run in parts, e.g. --only seed=S on several "
                        "machines or GPUs, each from a copy of one folder that holds the artifacts) into OUT, then "
                        "report it as --report-only does")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the report of the grid's cells that OUT holds results of (say, while a "
                        "long grid is interrupted)")
    add_output_flags(p, resumable=True)


def cmd_bench(args: argparse.Namespace) -> None:
    if args.run and not Path(args.run).is_dir():  # a mistyped --run would silently mean "build everything"
        raise CtfgenError(f"--run {args.run} is not a folder")
    if args.report_only and args.force:
        raise CtfgenError("--report-only runs nothing and keeps the folder: it does not go with --force")
    if args.merge and (args.report_only or args.run):
        clash = "--report-only" if args.report_only else "--run"
        raise CtfgenError(f"--merge adds the parts to OUT and reports it, running nothing: it does not go with {clash}")
    for name in ("ctfgen.experiments", __name__):
        logging.getLogger(name).setLevel(logging.INFO)
    out = args.out or f"runs/bench-{args.grid}" + ("-quick" if args.quick else "")
    seeds = args.seeds or (2 if args.quick else 3)
    grid = functools.partial(bench_cells, args.grid, seeds, args.quick, args.data, args.data_dir, args.steps,
                             args.size, args.tokenizer_steps, args.beyond_cfg, tokenizer_seeds=args.tokenizer_seeds)
    cells = grid(args.only)
    name = args.grid + (" (quick)" if args.quick else "")
    if args.merge:
        name += f", merged from {', '.join(args.merge)}"
    elif args.report_only:
        name += ", report only" + (f" (only {conditions_text(args.only)})" if args.only else "")
    elif args.only:
        name += f", cells run: only {conditions_text(args.only)} (reported: every cell of the grid done in this folder)"
    meta = {"grid": name, "seeds": seeds, "data": args.data}
    if args.tokenizer_seeds > 1:
        meta["tokenizer_seeds"] = args.tokenizer_seeds
    summary = run_bench(out, cells, meta, args.data_dir, args.cache_dir, args.run, args.device, args.force, args.resume,
                        classifier_epochs=1 if args.quick else 2, classifier_limit=10000 if args.quick else 20000,
                        report_also=grid() if args.only and not args.report_only else (),
                        report_only=args.report_only, merge=args.merge)
    for i, setup in enumerate(summary["setups"], 1):
        print(f"setup {i}:", *setup["verdict"], sep="\n  ")
    print(f"report -> {Path(out) / 'BENCHMARKS.md'}")


__all__ = ["BENCH_KIND", "add_bench_args", "bench_cells", "cell_condition", "cmd_bench", "merge_parts", "run_bench"]
