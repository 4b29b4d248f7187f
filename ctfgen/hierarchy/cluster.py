"""Clustering a codebook into K coarse groups.

Every method takes an (N, D) float tensor and returns a `Clustering` whose labels put
every one of the N points into exactly one of K non-empty clusters:

- `kmeans` (default): k-means++ seeding, Lloyd iterations, Euclidean distance on the
  l2-normalised points (the codebook's own geometry: lookup is by nearest unit vector).
- `balanced`: k-means whose assignment step fills every cluster to exactly N/K points
  (IAR's balanced clustering).
- `agglomerative`: bottom-up merging with average linkage over member-to-member
  distances (DCPE / MASC).
- `random`: a random balanced partition, the paper's ablation ("random clusters break stage 2").

All are deterministic for a seed on a given device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CtfgenError

# chunk of the (points x centres) distance matrix held at once: 4M floats = 16 MiB
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class Clustering:
    labels: torch.Tensor  # long[N], values in 0..K-1, every value used
    K: int
    inertia: float  # sum of squared Euclidean distances of the points to their cluster means
    iterations: int
    method: str
    params: dict[str, Any]
    inertia_history: list[float] = field(default_factory=list)  # per iteration, where the method iterates

    @property
    def sizes(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.K)


# --- shared helpers ------------------------------------------------------------------------------

def _check_input(x: torch.Tensor, k: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise CtfgenError(f"expected an (N, D) tensor of points, got {shape}")
    if not x.is_floating_point():
        raise CtfgenError(f"expected floating-point points, got {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise CtfgenError(f"K must be an integer, got {k!r}")
    n = x.shape[0]
    if k < 1:
        raise CtfgenError(f"K must be at least 1, got {k}")
    if k > n:
        raise CtfgenError(f"K={k} is larger than the number of points V={n}")
    if not torch.isfinite(x).all():
        raise CtfgenError("the points contain NaN or infinite values")
    return x if x.dtype == torch.float64 else x.float()


def _prepare(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return (F.normalize(x, dim=1) if normalize else x).contiguous()


def _chunk_rows(k: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(k, 1))


def partition_inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Sum of squared distances of the points to the mean of their cluster (same definition for every method)."""
    means = _means(x, labels, k)
    return _sq_dist_to(x, means, labels).sum(dtype=torch.float64).item()


def _means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels, x.double())
    counts = torch.bincount(labels, minlength=k).clamp_min(1)
    return (sums / counts[:, None]).to(x.dtype)


def _sq_dist_to(x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact squared distance of every point to its own centre, computed in chunks."""
    step = _chunk_rows(x.shape[1])
    return torch.cat([(part - centres[lab]).pow(2).sum(1) for part, lab in zip(x.split(step), labels.split(step))])


def _assign(x: torch.Tensor, centres: torch.Tensor, prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every point and the exact squared distance to it.

    The search uses ||c||^2 - 2 x.c (one matmul per chunk, the argmin does not need ||x||^2);
    the returned distance is recomputed directly so the inertia is accurate. A point keeps its
    previous label on a tie, so Lloyd's inertia cannot go up through rounding and labels
    cannot flip-flop.
    """
    c_sq = centres.pow(2).sum(1)
    step = _chunk_rows(len(centres))
    labels, dists = [], []
    for s in range(0, len(x), step):
        part = x[s:s + step]
        lab = torch.addmm(c_sq, part, centres.T, alpha=-2.0).argmin(1)
        d = (part - centres[lab]).pow(2).sum(1)
        if prev is not None:
            old = prev[s:s + step]
            d_old = (part - centres[old]).pow(2).sum(1)
            keep = d_old <= d
            lab, d = torch.where(keep, old, lab), torch.where(keep, d_old, d)
        labels.append(lab)
        dists.append(d)
    return torch.cat(labels), torch.cat(dists)


def _lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, list[float], int]:
    """Lloyd iterations from the given centres; returns labels, the inertia per iteration, iterations run.

    The inertia recorded at each assignment step never increases: the assignment can only lower
    it, the mean update can only lower it, and re-seeding an empty cluster with a far point lowers it.
    """
    k = len(centres)
    labels: torch.Tensor | None = None
    history: list[float] = []
    iterations = 0
    for iterations in range(1, max_iter + 1):
        new_labels, dists = _assign(x, centres, labels)
        _reseed_empty(x, centres, new_labels, dists)
        history.append(dists.sum(dtype=torch.float64).item())
        unchanged = labels is not None and torch.equal(new_labels, labels)
        labels = new_labels
        if unchanged or (len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]):
            break
        centres = _means(x, labels, k)
    assert labels is not None
    return labels, history, iterations


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding: indices of k distinct starting points.

    Each step draws `trials` candidates with probability proportional to the squared
    distance to the nearest chosen centre and keeps the one that lowers the potential most
    (the variant scikit-learn uses; 2 + log k trials by default).
    """
    n = len(x)
    trials = trials or 2 + int(math.log(k))
    x_sq = x.pow(2).sum(1)

    def sq_dists(idx: torch.Tensor) -> torch.Tensor:  # [len(idx), n]
        return torch.addmm(x_sq[None] + x_sq[idx, None], x[idx], x.T, alpha=-2.0).clamp_min_(0)

    first = torch.randint(n, (1,), generator=generator, device=x.device)
    chosen = [int(first)]
    d_min = sq_dists(first)[0]
    for _ in range(1, k):
        weights = d_min
        if not d_min.sum() > 0:  # every point coincides with a centre: draw uniformly among the others
            weights = torch.ones_like(d_min).index_fill_(0, torch.tensor(chosen, device=x.device), 0)
        cand = torch.multinomial(weights, trials, replacement=True, generator=generator)
        d_new = torch.minimum(d_min[None], sq_dists(cand))
        best = int(d_new.sum(1).argmin())
        chosen.append(int(cand[best]))
        d_min = d_new[best]
    return torch.tensor(chosen, device=x.device)


def _initial_centres(x: torch.Tensor, k: int, generator: torch.Generator, init_sample: int | None) -> torch.Tensor:
    """k-means++ on at most `init_sample` random points: seeding is sequential over k, so on large
    inputs it runs on a subsample (16 points per centre by default) and stops growing with N."""
    limit = init_sample or 16 * k
    pool = x
    if len(x) > limit:
        pool = x[torch.randperm(len(x), generator=generator, device=x.device)[:limit]]
    return pool[kmeans_plus_plus(pool, k, generator)].clone()


def _reseed_empty(x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, dists: torch.Tensor) -> int:
    """Give every empty cluster the farthest point from its centre (taken only from a cluster
    that keeps at least one member). Moving it lowers the inertia. Returns the count re-seeded."""
    k = len(centres)
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    order = dists.argsort(descending=True, stable=True).tolist()
    pos = 0
    for e in empty:
        while counts[labels[order[pos]]] <= 1:
            pos += 1
        p = order[pos]
        pos += 1
        counts[labels[p]] -= 1
        counts[e] += 1
        labels[p] = e
        centres[e] = x[p]
        dists[p] = 0
    return len(empty)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


# --- k-means -------------------------------------------------------------------------------------

def kmeans(x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4, normalize: bool = True,
           init_sample: int | None = None, backend: str = "torch") -> Clustering:
    """k-means (Lloyd) with greedy k-means++ seeding.

    Stops when no label changes, when the inertia drops by less than `tol` (relative), or
    after `max_iter` assignment steps. `backend="faiss"` uses faiss.Kmeans when faiss is
    installed (faster on large inputs; the result has the same form, not the same labels).
    """
    x = _check_input(x, k)
    params = dict(max_iter=max_iter, tol=tol, normalize=normalize, init_sample=init_sample, backend=backend)
    if backend not in ("torch", "faiss"):
        raise CtfgenError(f"unknown k-means backend {backend!r} (use 'torch' or 'faiss')")
    x = _prepare(x, normalize)
    centres = _initial_centres(x, k, _generator(seed, x.device), init_sample)
    if backend == "faiss":
        return _kmeans_faiss(x, centres, seed, params)
    labels, history, iterations = _lloyd(x, centres, max_iter, tol)
    return Clustering(labels, k, partition_inertia(x, labels, k), iterations, "kmeans", params, history)


def _kmeans_faiss(x: torch.Tensor, centres: torch.Tensor, seed: int, params: dict) -> Clustering:
    """faiss's Lloyd iterations from the same k-means++ centres (its own random start finds far worse optima:
    planted, well-separated groups merged)."""
    try:
        import faiss  # optional: pip install ctfgen[faiss]
    except ImportError:
        raise CtfgenError("backend='faiss' needs faiss (pip install faiss-cpu); the default backend is 'torch'") from None
    xs = x.detach().float().cpu().numpy()
    k = len(centres)
    km = faiss.Kmeans(xs.shape[1], k, niter=params["max_iter"], seed=int(seed), verbose=False)  # (its subsample)
    km.train(xs, init_centroids=centres.detach().float().cpu().numpy())
    _, idx = km.index.search(xs, 1)
    labels = torch.from_numpy(idx[:, 0].astype(np.int64)).to(x.device)
    centres = torch.from_numpy(km.centroids).to(x)
    _reseed_empty(x, centres, labels, _sq_dist_to(x, centres, labels))
    history = [float(v) for v in getattr(km, "obj", [])]
    return Clustering(labels, k, partition_inertia(x, labels, k), len(history) or params["max_iter"], "kmeans", params, history)


# --- balanced k-means ----------------------------------------------------------------------------

def _capacity_assign(d: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign every row of d [N, K] to a column, each column taking exactly `capacity` rows.

    Rounds of proposals: every unassigned point proposes to its nearest cluster that still
    has room; each cluster accepts its closest proposers up to its room. Every round fills
    at least one slot, so it ends, and the result is exactly balanced when N = K * capacity.
    """
    n, k = d.shape
    labels = torch.full((n,), -1, dtype=torch.long, device=d.device)
    room = torch.full((k,), capacity, dtype=torch.long, device=d.device)
    todo = torch.arange(n, device=d.device)
    while len(todo):
        dd = d[todo].masked_fill((room == 0)[None], float("inf"))
        cost, choice = dd.min(1)
        # sort proposals by cluster, closest first within a cluster
        by_cost = cost.argsort(stable=True)
        order = by_cost[choice[by_cost].argsort(stable=True)]
        ch = choice[order]
        counts = torch.bincount(ch, minlength=k)
        rank = torch.arange(len(ch), device=d.device) - (counts.cumsum(0) - counts)[ch]
        accept = rank < room[ch]
        labels[todo[order[accept]]] = ch[accept]
        room -= torch.bincount(ch[accept], minlength=k)
        todo = todo[order[~accept]].sort().values
    return labels


def _all_sq_dists(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    c_sq = centres.pow(2).sum(1)
    step = _chunk_rows(len(centres))
    d = [torch.addmm(c_sq, part, centres.T, alpha=-2.0) + part.pow(2).sum(1, keepdim=True) for part in x.split(step)]
    return torch.cat(d).clamp_min_(0)


def balanced(x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 50, tol: float = 1e-4, patience: int = 5,
             normalize: bool = True, init_sample: int | None = None) -> Clustering:
    """k-means with every cluster holding exactly N/K points (K must divide N).

    Lloyd iterations whose assignment step is `_capacity_assign`. The capacity constraint can
    make the inertia wobble, so the best assignment seen is kept; it stops when labels repeat,
    after `patience` iterations without a relative improvement of `tol`, or at `max_iter`.
    Holds the full N x K distance matrix (N * K * 4 bytes: 32 MiB for 16384 x 512).
    """
    x = _check_input(x, k)
    n = len(x)
    if n % k:
        raise CtfgenError(f"balanced clustering needs K to divide V: {n} codewords do not split into {k} equal clusters")
    x = _prepare(x, normalize)
    gen = _generator(seed, x.device)
    centres = _initial_centres(x, k, gen, init_sample)
    labels: torch.Tensor | None = None
    best_labels, best, since_best = None, math.inf, 0
    history: list[float] = []
    iterations = 0
    for iterations in range(1, max_iter + 1):
        new_labels = _capacity_assign(_all_sq_dists(x, centres), n // k)
        history.append(_sq_dist_to(x, centres, new_labels).sum(dtype=torch.float64).item())
        unchanged = labels is not None and torch.equal(new_labels, labels)
        labels = new_labels
        if history[-1] < best * (1 - tol):
            since_best = 0
        else:
            since_best += 1
        if history[-1] < best:
            best, best_labels = history[-1], labels
        if unchanged or since_best >= patience:
            break
        centres = _means(x, labels, k)
    assert best_labels is not None
    params = dict(max_iter=max_iter, tol=tol, patience=patience, normalize=normalize, init_sample=init_sample)
    return Clustering(best_labels, k, partition_inertia(x, best_labels, k), iterations, "balanced", params, history)


# --- agglomerative -------------------------------------------------------------------------------

def _nearest(means: torch.Tensor, alive: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each slot in `rows`: the most similar other live slot and that similarity (ties: lowest slot)."""
    live = alive.nonzero().flatten()
    target = means[live]
    step = _chunk_rows(len(live))
    best, nn = [], []
    for part in rows.split(step):
        sims = means[part] @ target.T
        sims[part[:, None] == live[None]] = -math.inf
        b, j = sims.max(1)
        best.append(b)
        nn.append(live[j])
    return torch.cat(best), torch.cat(nn)


def _average_linkage_cosine(x: torch.Tensor) -> list[tuple[float, int, int]]:
    """All n-1 merges of exact average linkage on cosine distance.

    For unit vectors the mean of all member-to-member cosine distances between clusters A
    and B is exactly 1 - mean(A) . mean(B) (the dot product is bilinear), so keeping each
    cluster's mean vector gives the exact average linkage with O(N * D) memory and no N x N
    matrix. Merges are found by reciprocal nearest neighbours: every pair of clusters that are
    each other's nearest neighbour is merged at once. Average linkage is reducible (a merged
    cluster is never closer to a third one than the nearer of its parts), so this builds the
    same tree as merging one closest pair at a time, and a cluster's cached nearest neighbour
    stays valid until that neighbour itself is merged. Returns (height, slot_a, slot_b) in the
    order found; the merged cluster lives in slot_a (the smaller index).
    """
    n = len(x)
    means = x.double().clone()
    size = torch.ones(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    best, nn = _nearest(means, alive, torch.arange(n))
    merges: list[tuple[float, int, int]] = []
    while len(merges) < n - 1:
        live = alive.nonzero().flatten()
        mutual = live[(nn[nn[live]] == live) & (live < nn[live])]
        if len(mutual) == 0:  # only possible through rounding: merge the single closest pair
            mutual = live[best[live].argmax()].view(1)
        a, b = mutual, nn[mutual]
        keep, gone = torch.minimum(a, b), torch.maximum(a, b)
        merges.extend(zip((1.0 - best[a]).tolist(), keep.tolist(), gone.tolist()))
        w_a, w_b = size[a, None], size[b, None]
        means[keep] = (w_a * means[a] + w_b * means[b]) / (w_a + w_b)
        size[keep] = (w_a + w_b).squeeze(1)
        alive[gone] = False
        if len(merges) == n - 1:
            break
        merged = torch.zeros(n, dtype=torch.bool)
        merged[keep] = True
        merged[gone] = True
        stale = (alive & merged[nn]) | (alive & merged)
        rows = stale.nonzero().flatten()
        best[rows], nn[rows] = _nearest(means, alive, rows)
    return merges


def _cut(merges: list[tuple[float, int, int]], n: int, k: int) -> torch.Tensor:
    """Labels of the k clusters left after the n-k lowest merges (union-find; ties keep the found order,
    which puts every merge after the merges that built its two sides)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = sorted(range(len(merges)), key=lambda m: merges[m][0])
    for m in order[:n - k]:
        _, a, b = merges[m]
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    roots = [root(i) for i in range(n)]
    ids: dict[int, int] = {}
    return torch.tensor([ids.setdefault(r, len(ids)) for r in roots], dtype=torch.long)


def _scipy_linkage_merges(x: np.ndarray, metric: str) -> list[tuple[float, int, int]]:
    try:
        from scipy.cluster.hierarchy import linkage
    except ImportError:
        raise CtfgenError(f"agglomerative clustering with metric={metric!r} needs scipy (pip install scipy); "
                          "metric='cosine' needs nothing extra") from None
    z = linkage(x.astype(np.float64), method="average", metric=metric)
    # scipy names a merged cluster n+i; map it to the smallest original index it holds (its slot)
    n = len(x)
    slot = list(range(n)) + [0] * (n - 1)
    merges = []
    for i, (a, b, h, _) in enumerate(z):
        sa, sb = slot[int(a)], slot[int(b)]
        slot[n + i] = min(sa, sb)
        merges.append((float(h), min(sa, sb), max(sa, sb)))
    return merges


def agglomerative(x: torch.Tensor, k: int, seed: int = 0, metric: str = "cosine", normalize: bool = True) -> Clustering:
    """Average-linkage agglomerative clustering on member-to-member distances.

    metric='cosine' (default, pure torch, O(N * D) memory): exact average linkage of the
    cosine distance 1 - a.b, which for unit codewords is half their squared Euclidean distance.
    metric='euclidean' (or any scipy metric): scipy's exact average linkage on the condensed
    distance matrix (needs scipy and about N^2 * 8 bytes: 2 GiB at N = 16384).
    Deterministic; `seed` is accepted for a uniform signature and unused.
    """
    x = _check_input(x, k)
    pts = _prepare(x, normalize)
    if metric == "cosine":
        if not normalize:
            raise CtfgenError("metric='cosine' works on unit vectors; keep normalize=True")
        merges = _average_linkage_cosine(F.normalize(x.detach().double().cpu(), dim=1))  # unit in float64: exact cosines
    else:
        merges = _scipy_linkage_merges(pts.detach().double().cpu().numpy(), metric)
    labels = _cut(merges, len(pts), k).to(x.device)
    return Clustering(labels, k, partition_inertia(pts, labels, k), len(pts) - k, "agglomerative",
                      dict(metric=metric, linkage="average", normalize=normalize))


# --- random --------------------------------------------------------------------------------------

def random_partition(x: torch.Tensor, k: int, seed: int = 0, normalize: bool = True) -> Clustering:
    """A random balanced partition: cluster sizes differ by at most one (equal when K divides N)."""
    x = _check_input(x, k)
    n = len(x)
    perm = torch.randperm(n, generator=_generator(seed, torch.device("cpu"))).to(x.device)
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    labels[perm] = torch.arange(n, device=x.device) % k
    return Clustering(labels, k, partition_inertia(_prepare(x, normalize), labels, k), 0, "random", dict(normalize=normalize))


# --- dispatch ------------------------------------------------------------------------------------

METHODS: dict[str, Callable[..., Clustering]] = {
    "kmeans": kmeans,
    "balanced": balanced,
    "agglomerative": agglomerative,
    "random": random_partition,
}


def cluster_codebook(codebook: torch.Tensor, method: str = "kmeans", k: int = 512, seed: int = 0, **params: Any) -> Clustering:
    """Cluster the V codewords (V x D) into k groups with the named method."""
    if method not in METHODS:
        raise CtfgenError(f"unknown clustering method {method!r}; choose from {sorted(METHODS)}")
    return METHODS[method](codebook.detach(), k, seed=seed, **params)
