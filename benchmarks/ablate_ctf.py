"""CTF ablations at the full bench's budget: the number of clusters K and the refiner's cluster mask.

    python benchmarks/ablate_ctf.py --bench runs/bench --run runs/fm --ks 64 1024

Run after `ctfgen bench --run RUN --out BENCH`. It reuses the bench's tokenizer, codes, classifier
and trained models; for every K in --ks it clusters the codebook (k-means), then trains a coarse AR
model and a refiner exactly as the bench does (same sizes, steps, batch, learning rate, seed). Every
CTF variant (mask on and off) and the bench's two baselines are scored on the same class-balanced
sets (the bench's final size, one set per seed in --seeds) with the domain classifier's features,
so the rows are comparable with each other and the spread between seeds shows the noise.
Each scored set is a cell of ctfgen.experiments' engine: results go to BENCH/ablate_ctf.jsonl as they
finish, so an interrupted run resumes and a second run only recomputes what is new. The report is
BENCH/ablate_ctf.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from ctfgen.bench import FULL, Compute, Sides, brief, domain_score, log, machine, prepare_artifacts, train_to
from ctfgen.evaluate import Reference
from ctfgen.experiments import Results, by_seeds, run_grid
from ctfgen.hierarchy import build_hierarchy, load_hierarchy, save_hierarchy
from ctfgen.hierarchy.artifact import HIERARCHY_KIND
from ctfgen.outputs import is_finished, open_output
from ctfgen.tokenizer.model import load_tokenizer


@dataclass(frozen=True)
class Cell:
    """One scored set: a model (CTF at some K with the mask on or off, or a bench baseline) and a sampling seed."""

    model: str  # "CTF", "baseline, equal steps" or "baseline, CTF's compute"
    k: int | None  # CTF's number of clusters
    mask: bool | None  # CTF's refiner mask
    steps: int  # training steps of the model
    per_class: int
    seed: int


def train_ctf_for_k(k: int, folder: Path, art, budget) -> tuple[Path, Path, object]:
    """Cluster into k groups and train a coarse model and a refiner on them, as the bench does."""
    if not is_finished(folder / "hierarchy", HIERARCHY_KIND):
        h = build_hierarchy(load_tokenizer(art.tokenizer), "kmeans", k, seed=budget.seed)
        open_output(folder / "hierarchy", HIERARCHY_KIND).write(lambda path: save_hierarchy(h, path))
    art_k = replace(art, hierarchy=str(folder / "hierarchy"))
    for role, size in (("coarse", budget.size), ("refiner", budget.refiner_size)):
        log(f"K={k}: training {role} to step {budget.steps}")
        train_to(role, folder / role, budget.steps, art_k, budget, Compute(), size=size)
    return folder / "coarse", folder / "refiner", art_k


def write_markdown(records: list[dict], meta: dict, path: Path) -> None:
    lines = ["# CTF ablations: K and the refiner mask", "",
             f"Command: `{meta['command']}`; {meta['date']}; {meta['machine']}.", "",
             f"Every row: {meta['per_class']} samples per class, sampling seeds {meta['seeds']} (mean +- sd over them), "
             f"domain features against the test split; models trained {meta['steps']} steps as in the bench "
             "(one training seed).", "",
             "| model | K | refiner mask | FID (domain) | precision | recall | class consistency |",
             "|---|---|---|---|---|---|---|"]
    columns = [by_seeds(records, lambda r, m=m: r[m]) for m in ("fid", "precision", "recall", "class_consistency")]
    for (cell, fid), (_, precision), (_, recall), (_, consistency) in zip(*columns):
        mask = "-" if cell["mask"] is None else ("on" if cell["mask"] else "off")
        lines.append(f"| {cell['model']} ({cell['steps']} steps) | {cell['k'] or '-'} | {mask} | {fid} | "
                     f"{precision.mean:.3f} | {recall.mean:.3f} | {100 * consistency.mean:.1f} % |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="runs/bench", help="a finished `ctfgen bench` output folder")
    ap.add_argument("--run", default=None, help="the --run the bench reused")
    ap.add_argument("--ks", type=int, nargs="*", default=[64, 1024], help="other K to train and score")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=None, help="the bench's --steps, if it was given one")
    args = ap.parse_args()

    start, bench = time.perf_counter(), Path(args.bench)
    report = json.loads((bench / "bench.json").read_text())
    budget = FULL if args.steps is None else replace(FULL, steps=args.steps)
    art = prepare_artifacts(args.run, bench, budget, None)
    ref = Reference("fashion-mnist", "test")
    bench_k = load_hierarchy(art.hierarchy).K

    @lru_cache(maxsize=None)
    def pipeline(model: str, k: int | None, steps: int):
        if model != "CTF":
            return Sides(art).baseline(bench / f"baseline-step{steps}")
        coarse, refiner, art_k = ((bench / "coarse", bench / "refiner", art) if k == bench_k
                                  else train_ctf_for_k(k, bench / "ablate" / f"k{k}", art, budget))
        return Sides(art_k).ctf(coarse, refiner)

    def run(cell: Cell) -> dict:
        log(f"scoring {cell}")
        settings = {} if cell.mask is None else {"refiner_mask": cell.mask}
        pipe = pipeline(cell.model, cell.k, cell.steps)
        return brief(domain_score(pipe, cell.per_class, art, ref, cell.seed, **settings)[0])

    n = budget.per_class
    grid = [Cell("CTF", k, mask, budget.steps, n, seed) for k in sorted({bench_k, *args.ks})
            for mask in (True, False) for seed in args.seeds]
    grid += [Cell(name, None, None, steps, n, seed) for name, steps in
             (("baseline, equal steps", budget.steps), ("baseline, CTF's compute", report["matched_steps"]))
             for seed in args.seeds]
    records = run_grid(grid, run, Results(bench / "ablate_ctf.jsonl"))
    meta = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "steps": budget.steps, "per_class": n, "seeds": args.seeds}
    write_markdown(records, meta, bench / "ablate_ctf.md")
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min: {bench / 'ablate_ctf.md'}")


if __name__ == "__main__":
    main()
