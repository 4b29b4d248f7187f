"""CTF ablations at the full bench's budget: the number of clusters K and the refiner's cluster mask.

    python benchmarks/ablate_ctf.py --bench runs/bench --run runs/fm --ks 64 1024

Run after `ctfgen bench --run RUN --out BENCH`. It reuses the bench's tokenizer, codes, classifier
and trained models; for every K in --ks it clusters the codebook (k-means), then trains a coarse AR
model and a refiner exactly as the bench does (same sizes, steps, batch, learning rate, seed). Every
CTF variant (mask on and off) and the bench's two baselines are scored on the same class-balanced
sets (the bench's final size, one set per seed in --seeds) with the domain classifier's features,
so the rows are comparable with each other and the spread between seeds shows the noise.
Writes BENCH/ablate_ctf.json and BENCH/ablate_ctf.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from ctfgen.bench import FULL, Compute, Sides, brief, domain_score, log, machine, prepare_artifacts, train_to
from ctfgen.evaluate import Reference
from ctfgen.hierarchy import build_hierarchy, load_hierarchy, save_hierarchy
from ctfgen.tokenizer.model import load_tokenizer


def train_ctf_for_k(k: int, folder: Path, art, budget) -> tuple[Path, Path, object]:
    """Cluster into k groups and train a coarse model and a refiner on them, as the bench does."""
    if not (folder / "hierarchy" / "config.json").is_file():
        save_hierarchy(build_hierarchy(load_tokenizer(art.tokenizer), "kmeans", k, seed=budget.seed), folder / "hierarchy")
    art_k = replace(art, hierarchy=str(folder / "hierarchy"))
    for role, size in (("coarse", budget.size), ("refiner", budget.refiner_size)):
        log(f"K={k}: training {role} to step {budget.steps}")
        train_to(role, folder / role, budget.steps, art_k, budget, Compute(), size=size)
    return folder / "coarse", folder / "refiner", art_k


def score_seeds(pipe, art, ref: Reference, per_class: int, seeds: list[int], **settings) -> dict:
    runs = [brief(domain_score(pipe, per_class, art, ref, seed, **settings)[0]) for seed in seeds]
    fids = [r["fid"] for r in runs]
    return {"fid_mean": statistics.mean(fids), "fid_per_seed": fids,
            "class_consistency_mean": statistics.mean(r["class_consistency"] for r in runs),
            "precision_mean": statistics.mean(r["precision"] for r in runs),
            "recall_mean": statistics.mean(r["recall"] for r in runs), "per_seed": runs}


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# CTF ablations: K and the refiner mask", "",
             f"Command: `{result['command']}`; {result['date']}; {result['machine']}; "
             f"{result['wall_s'] / 60:.1f} min.", "",
             f"Every row: {result['per_class']} samples per class, seeds {result['seeds']}, domain features "
             f"against the test split; models trained {result['steps']} steps as in the bench.", "",
             "| model | K | refiner mask | FID (domain) mean | FID per seed | precision | recall | class consistency |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        s = row["scores"]
        lines.append(f"| {row['model']} | {row.get('K', '-')} | {row.get('mask', '-')} | {s['fid_mean']:.2f} | "
                     f"{' / '.join(f'{f:.2f}' for f in s['fid_per_seed'])} | {s['precision_mean']:.3f} | "
                     f"{s['recall_mean']:.3f} | {100 * s['class_consistency_mean']:.1f} % |")
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
    sides = Sides(art)
    bench_k = load_hierarchy(art.hierarchy).K

    ctf_models = {bench_k: (bench / "coarse", bench / "refiner", art)}
    for k in args.ks:
        ctf_models[k] = train_ctf_for_k(k, bench / "ablate" / f"k{k}", art, budget)

    rows = []
    for k, (coarse, refiner, art_k) in sorted(ctf_models.items()):
        pipe = Sides(art_k).ctf(coarse, refiner)
        for mask in (True, False):
            log(f"scoring CTF K={k}, mask {'on' if mask else 'off'}")
            rows.append({"model": "CTF", "K": k, "mask": "on" if mask else "off",
                         "scores": score_seeds(pipe, art, ref, budget.per_class, args.seeds, refiner_mask=mask)})
    for name, step in (("baseline, equal steps", budget.steps), ("baseline, CTF's compute", report["matched_steps"])):
        log(f"scoring {name}")
        rows.append({"model": f"{name} ({step} steps)", "scores": score_seeds(
            sides.baseline(bench / f"baseline-step{step}"), art, ref, budget.per_class, args.seeds)})

    result = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": machine(), "steps": budget.steps,
              "per_class": budget.per_class, "seeds": args.seeds, "rows": rows,
              "wall_s": time.perf_counter() - start}
    (bench / "ablate_ctf.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, bench / "ablate_ctf.md")
    log(f"done: {bench / 'ablate_ctf.md'}")


if __name__ == "__main__":
    main()
