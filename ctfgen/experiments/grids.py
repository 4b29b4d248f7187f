"""The bench's grids as data: the cells `ctfgen bench --grid NAME` runs.

- `versus`: the protocol's verdict. At each budget and seed: CTF with each refiner (share of depth,
  share of the steps; trained within clusters, plus the paper's full-head refiner at full size), the
  baseline at equal steps, and the baseline given the compute of each of those CTFs. The report
  compares each side at its own best operating point, over seeds.
- `map`: where CTF helps. CTF and the baseline at equal steps over codebook size V, clusters K
  (and `auto`), model size and training length in epochs.
- `refiner`: the refiner options against the plain CTF and the baselines: one that reads decided
  codes (sampled in 1, 2, 4 and 8 passes), one that reads stage-1 features, one trained on labels
  the coarse model corrupts, one trained on its cluster's members only (as stage 2 samples).
- `precision`: CTF and the baseline with the autoregressive stage sampled at each decode precision.
- `clusters`: how the codewords are grouped into clusters (k-means, agglomerative, balanced, random), CTF
  against the baseline at equal steps at the largest V.
- `stage2`: issue 12's verdict on any dataset: the refiner trained within clusters, full and cheap, against
  the baseline at equal steps and at the cheap CTF's compute, also in EfficientNet-Lite0 features.
Each grid has a full form (what a GPU runs in hours) and a quick one (minutes on a 2-core CPU; it
shows the instrument works, not the verdict). `cpu` is the versus grid cut to what a 2-core CPU
fits in a few hours (tiny models with the whole protocol at 400 steps and at equal steps over 200, 800,
1600 and 3200 steps, small ones at equal steps and with the refiner at full and quarter depth, and the cheapest
refiner at 800 steps against the baseline at its compute); docs/bench.md says what it costs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable

from ..hierarchy import METHODS as CLUSTERINGS
from ..transformer.precision import DECODE_PRECISIONS
from .protocol import Cell, Scoring

QUICK_SCORING = Scoring(point_per_class=10, final_per_class=50, cfg=(1.0, 2.0, 3.0), t1=(1.0, 1.1), t2=(1.1,),
                        floor_per_class=20, nll_items=500)
# minutes, not the verdict: a 100-step tokenizer, and codes of the 6,400 training images (a class-balanced
# share) that the quick budgets' 200 steps at batch 32 read once
QUICK_BASE = dict(size="tiny", refiner_size="tiny", batch_size=32, warmup_steps=20, tokenizer_steps=100,
                  train_items=6400, scoring=QUICK_SCORING)
CPU_SCORING = Scoring(point_per_class=20)  # the protocol's grid and 10,000-image final sets, 200 images a point
FULL_REFINER = (1.0, 1.0)


def versus(base: Cell, budgets: Iterable[int], seeds: int, refiners: Iterable[tuple[float, float]],
           matched: Iterable[tuple[float, float]], within: bool = False) -> list[Cell]:
    """CTF with each refiner (depth share, steps share; `within`: trained within clusters), the baseline at
    equal steps, and the baseline at the FLOPs of each CTF in `matched`, for every budget and seed."""
    cells = []
    for steps in budgets:
        for seed in range(seeds):
            at = replace(base, steps=steps, seed=seed)
            cells += [replace(at, side="ctf", refiner_depth=d, refiner_steps=s, refiner_mask=within)
                      for d, s in refiners]
            cells.append(replace(at, side="baseline"))
            cells += [replace(at, side="baseline", compute_of=(d, s), refiner_mask=within) for d, s in matched]
    return cells


def epochs_to_steps(epochs: float, train_items: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * train_items / batch_size))


def versus_grid(base: Cell, seeds: int, quick: bool, train_items: int) -> list[Cell]:
    if quick:
        return versus(replace(base, **QUICK_BASE), (200,), seeds, (FULL_REFINER, (0.5, 1.0)), (FULL_REFINER,))
    refiners = (FULL_REFINER, (0.5, 1.0), (0.25, 1.0), (1.0, 0.5), (1.0, 0.25), (0.5, 0.5))
    budgets = [epochs_to_steps(e, train_items, base.batch_size) for e in (1, 3)]
    # refiners trained within clusters (ctfgen train's default), and the paper's full-head one beside them
    paper = [replace(base, side="ctf", steps=steps, seed=seed) for steps in budgets for seed in range(seeds)]
    return versus(base, budgets, seeds, refiners, refiners, within=True) + paper


def cpu_grid(base: Cell, seeds: int, quick: bool, train_items: int) -> list[Cell]:
    if quick:
        return versus_grid(base, seeds, quick, train_items)
    base = replace(base, steps=400, scoring=CPU_SCORING)
    tiny = replace(base, size="tiny", refiner_size="tiny")
    # steps-to-FID first (each budget its own run, lr decayed to its end), then what 400 steps add: the
    # half-depth refiner and the baseline at CTF's compute; last the small models at equal steps
    budgets = versus(tiny, (200, 400, 800), seeds, (FULL_REFINER,), ())
    at_400 = [c for c in versus(tiny, (400,), seeds, ((0.5, 1.0),), (FULL_REFINER,)) if c not in budgets]
    small = versus(base, (400,), seeds, (FULL_REFINER,), ())
    # then the refiner trained within clusters (ctfgen train's default since it was measured here)
    within = [replace(c, refiner_mask=True) for c in budgets if c.side == "ctf" and c.steps >= 400]
    # last the stage2 grid's cheap refiner and the baseline given its compute (the other two sides are above)
    cheap = [c for c in stage2_grid(base, seeds, False, train_items) if c.refiner_steps < 1 or c.compute_of]
    # and the budget series two doublings further: does the FID gap close with longer training? (both refiners)
    longer = versus(tiny, (1600, 3200), seeds, (FULL_REFINER,), ())
    longer += [replace(c, refiner_mask=True) for c in longer if c.side == "ctf"]
    # how small a refiner trained within clusters may be: the small models' 4 layers, one (a quarter), and
    # one at half the width (the tiny preset's: about a sixteenth of the full refiner's FLOPs per position)
    depths = [replace(c, refiner_mask=True, refiner_depth=d) for c in small if c.side == "ctf" for d in (1.0, 0.25)]
    depths += [replace(c, refiner_mask=True, refiner_size="tiny", refiner_depth=0.5) for c in small if c.side == "ctf"]
    return budgets + at_400 + small + within + cheap + longer + depths


LITE0 = ("effnet-lite0",)  # the second feature space (ImageNet features, shipped in a PyPI package)
CHEAP_REFINER = (1.0, 0.25)  # full depth, a quarter of stage 1's steps
SHALLOW_REFINER = (0.5, 0.5)  # about the same compute spent on steps instead of depth (depth hardly mattered)


def stage2_grid(base: Cell, seeds: int, quick: bool, train_items: int) -> list[Cell]:
    """Issue 12's verdict on any dataset (`--data`): CTF with the refiner trained within clusters, at full
    size, at a quarter of the steps (the cheapest that kept FID) and at half the depth for half the steps
    (about the same compute), against the baseline at equal steps and the baseline given each cheap CTF's
    compute; final sets also scored in EfficientNet-Lite0 features. Tiny models at 800 steps (the quick
    form: 200, without the half-depth refiner)."""
    if quick:
        scoring, steps = replace(QUICK_SCORING, also_features=LITE0, also_per_class=10), 200
        base = replace(base, **{**QUICK_BASE, "scoring": scoring})
    else:
        scoring, steps = replace(CPU_SCORING, also_features=LITE0), 800
        base = replace(base, size="tiny", refiner_size="tiny", scoring=scoring)
    cheap, context = [], []
    for seed in range(seeds):
        at = replace(base, steps=steps, seed=seed)
        within = replace(at, side="ctf", refiner_mask=True)
        cheap += [replace(within, refiner_depth=CHEAP_REFINER[0], refiner_steps=CHEAP_REFINER[1]),
                  replace(at, side="baseline", compute_of=CHEAP_REFINER, refiner_mask=True)]
        context += [within, replace(at, side="baseline")]
        if not quick:  # the quick form keeps to its 10 minutes
            context += [replace(within, refiner_depth=SHALLOW_REFINER[0], refiner_steps=SHALLOW_REFINER[1]),
                        replace(at, side="baseline", compute_of=SHALLOW_REFINER, refiner_mask=True)]
    return cheap + context  # the verdict's pair first, for every seed


# the refiner options of issue 12 (docs/bench.md): each against the plain CTF and the baselines of one setup
REFINER_OPTIONS = ({"refiner_reveal": True}, {"refiner_reveal": True, "refine_steps": 4}, {"refiner_features": True},
                   {"refiner_corrupt": 0.2}, {"refiner_mask": True})
MORE_PASSES = ({"refiner_reveal": True, "refine_steps": 2}, {"refiner_reveal": True, "refine_steps": 8})
# stage 2 over all V codewords: may a refiner trained on stage 1's errors overrule them? (against the plain full head)
OVER_ALL_V = ({"stage2_mask": False}, {"refiner_corrupt": 0.2, "stage2_mask": False})


def refiner_grid(base: Cell, seeds: int, quick: bool, train_items: int) -> list[Cell]:
    """The `cpu` grid's tiny setup (CTF, the baseline at equal steps and at CTF's compute) and CTF with each
    refiner option; the extra pass counts and stage 2 over all V come last, so the main options finish first."""
    if quick:
        base, steps, groups = replace(base, **QUICK_BASE), 200, (REFINER_OPTIONS[1:3],)
    else:
        base, steps = replace(base, size="tiny", refiner_size="tiny", scoring=CPU_SCORING), 400
        groups = (REFINER_OPTIONS, MORE_PASSES, OVER_ALL_V)
    cells = versus(base, (steps,), seeds, (FULL_REFINER,), (FULL_REFINER,))
    for group in groups:
        cells += [replace(base, side="ctf", steps=steps, seed=seed, **o) for seed in range(seeds) for o in group]
    return cells


# sampling-only: scored at the points where fp32 CTF and the baseline did best in the cpu grid (docs/bench.md)
PRECISION_SCORING = Scoring(point_per_class=20, cfg=(1.0, 2.0, 3.0), t1=(1.0,), t2=(1.0,), floor_per_class=0)


def precision_grid(base: Cell, seeds: int, quick: bool, train_items: int) -> list[Cell]:
    """CTF and the baseline at equal steps, each sampled with its AR stage at each decode precision: what a
    faster decode costs in FID, against the spread over training seeds. The models are trained
    once per seed (the precision only changes sampling)."""
    if quick:
        base, steps = replace(base, **{**QUICK_BASE, "scoring": replace(QUICK_SCORING, t1=(1.0,), floor_per_class=0)}), 200
    else:
        base, steps = replace(base, size="tiny", refiner_size="tiny", scoring=PRECISION_SCORING), 400
    return [replace(base, side=side, steps=steps, seed=seed, decode_precision=p)
            for seed in range(seeds) for side in ("ctf", "baseline") for p in DECODE_PRECISIONS]


def map_grid(base: Cell, seeds: int, quick: bool, train_items: int) -> list[Cell]:
    """CTF against the baseline at equal steps; one baseline per (V, size, budget, seed): K does not touch it.
    The full grid's refiners train within clusters (ctfgen train's default); the quick grid keeps the paper's
    full head, as it was measured (docs/bench.md)."""
    if quick:
        base = replace(base, **QUICK_BASE)
        codebooks, ks, sizes, budgets = (1024, 4096), (64, 256), ("tiny",), (100,)
    else:
        codebooks, ks, sizes = (1024, 4096, 16384), (32, 64, 128, 256, "auto"), ("tiny", "small", "medium")
        budgets = tuple(epochs_to_steps(e, train_items, base.batch_size) for e in (1, 3, 10))
    split_ks = tuple(k for k in ks[1:] if k != "auto")  # the baseline's likelihood split at every K of the CTF cells
    cells = []
    for v in codebooks:
        for size in sizes:
            for steps in budgets:
                for seed in range(seeds):
                    at = replace(base, codebook=v, size=size, refiner_size=size, steps=steps, seed=seed)
                    cells += [replace(at, side="ctf", k=k, refiner_mask=not quick) for k in ks]
                    cells.append(replace(at, side="baseline", k=ks[0], scoring=replace(at.scoring, split_ks=split_ks)))
    return cells


def clusters_grid(base: Cell, seeds: int, quick: bool, train_items: int) -> list[Cell]:
    """CTF with the codewords grouped by each clustering method (k-means, the paper's; agglomerative on
    member-to-member distances, as DCPE and MASC propose; balanced k-means; random, the paper's ablation)
    against the baseline at equal steps, at the largest V (where CTF gains most), K = 64 (the map's best there)
    and 512 (the paper's)."""
    if quick:
        base, codebook, ks, sizes, steps = replace(base, **QUICK_BASE), 1024, (64,), ("tiny",), 100
    else:
        base, codebook, ks, sizes = replace(base, refiner_mask=True), 16384, (64, 512), ("tiny", "small")
        steps = epochs_to_steps(1, train_items, base.batch_size)
    cells = []
    for size in sizes:
        for seed in range(seeds):
            at = replace(base, codebook=codebook, size=size, refiner_size=size, steps=steps, seed=seed)
            cells += [replace(at, side="ctf", k=k, clustering=method) for k in ks for method in CLUSTERINGS]
            cells.append(replace(at, side="baseline", k=ks[0], refiner_mask=False,
                                 scoring=replace(at.scoring, split_ks=ks[1:])))
    return cells


GRIDS: dict[str, Callable[[Cell, int, bool, int], list[Cell]]] = {
    "versus": versus_grid, "cpu": cpu_grid, "map": map_grid, "refiner": refiner_grid, "precision": precision_grid,
    "stage2": stage2_grid, "clusters": clusters_grid}
