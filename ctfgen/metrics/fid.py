"""FID, Inception Score, precision/recall, and reference statistics of a dataset split cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import ArtifactError, atomic_path, load_tensors, read_json, read_npz, save_tensors, write_json
from ..data.transforms import uint8_to_float
from ..errors import CtfgenError
from .features import FeatureExtractor, extract_features, metric_label

log = logging.getLogger(__name__)

CACHE_ENV = "CTFGEN_CACHE"
DEFAULT_CACHE = Path("~/.cache/ctfgen/ref-stats")
REF_STATS_VERSION = 2  # 2: a class-balanced random subset when n is given (1: the first n); streamed


# --- Frechet distance ---------------------------------------------------------------------------

def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features [N,F]."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise CtfgenError(f"need at least 2 feature vectors [N,F], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues
    from rounding are clipped to 0 (that is what keeps near-singular covariances stable)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64.

    tr((S1 S2)^1/2) equals tr((A S2 A)^1/2) with A = S1^1/2, and A S2 A is symmetric PSD, so
    the trace is the sum of square roots of its eigenvalues: no complex sqrtm, no eps retries.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise CtfgenError(f"statistics do not match: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigen = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigen, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


class RunningMoments:
    """Mean and covariance of feature batches as they stream past (Chan et al.'s pairwise update, float64):
    memory is one F x F matrix whatever the number of features."""

    def __init__(self, dim: int):
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, features: torch.Tensor | np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        if not len(x):
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        n_a, n_b = self.n, len(x)
        delta = mean_b - self.mean
        self.n = n_a + n_b
        self.mean = self.mean + delta * (n_b / self.n)
        self.m2 += centred.T @ centred + np.outer(delta, delta) * (n_a * n_b / self.n)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise CtfgenError(f"need at least 2 feature vectors, got {self.n}")
        return self.mean, self.m2 / (self.n - 1)


# --- Inception Score -------------------------------------------------------------------------------

def inception_score(probs: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over `splits` random chunks of exp(E_x[KL(p(y|x) || p(y))]), from class probabilities [N,C]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise CtfgenError(f"need probabilities [N,C] with N >= splits={splits}, got shape {p.shape}")
    # Splits must be random subsets: sample sets are often ordered by class, and a split holding one
    # class has a peaked marginal, which drives IS to 1. A fixed permutation keeps the score deterministic.
    p = p[np.random.default_rng(0).permutation(len(p))]
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log(0) terms contribute nothing, so clip only inside the log
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --- precision and recall (Kynkaanniemi et al. 2019) -------------------------------------------------

def _map_row_chunks(a: torch.Tensor, b: torch.Tensor, fn, chunk: int) -> list[torch.Tensor]:
    """Apply `fn` to the distance matrix between `chunk` rows of `a` and all of `b` at a time."""
    return [fn(torch.cdist(a[i:i + chunk], b)) for i in range(0, len(a), chunk)]


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise CtfgenError(f"need more than k={k} points for k-NN radii, got {len(features)}")
    parts = _map_row_chunks(features, features, lambda d: d.kthvalue(k + 1, dim=1).values, chunk)
    return torch.cat(parts)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int) -> float:
    """Fraction of `queries` inside at least one ball (manifold point, its k-NN radius)."""
    inside = _map_row_chunks(queries, manifold, lambda d: (d <= radii[None, :]).any(dim=1), chunk)
    return torch.cat(inside).float().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Precision: share of generated samples on the real manifold; recall: share of real samples on
    the generated manifold; each manifold is the union of k-NN balls around its points."""
    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    precision = _coverage(real, knn_radii(real, k, chunk), fake, chunk)
    recall = _coverage(fake, knn_radii(fake, k, chunk), real, chunk)
    return precision, recall


# --- reference statistics cache ------------------------------------------------------------------------

@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor  # a capped subset, for precision/recall
    meta: dict


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def ref_stats_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[-40:]


def reference_stats(extractor: FeatureExtractor, dataset: str = "fashion-mnist", split: str = "test",
                    resolution: int = 32, channels: int = 1, n: int | None = None, pr_cap: int = 10000,
                    cache_dir: str | Path | None = None, batch_size: int = 64, seed: int = 0,
                    data_dir: str | Path | None = None) -> RefStats:
    """Statistics of a dataset split in `extractor`'s feature space, computed once and cached.

    With `n`, the images are a class-balanced random subset of the split (drawn with `seed`).

    The cache entry is keyed by everything that changes the numbers: dataset, split, image
    preprocessing, sample count, the extractor's name and weights fingerprint, the PR cap.
    """
    meta = {"version": REF_STATS_VERSION, "dataset": str(dataset), "split": split, "resolution": resolution,
            "channels": channels, "n": n, "pr_cap": pr_cap, "seed": seed, "extractor": extractor.describe()}
    folder = cache_root(cache_dir) / f"{_slug(str(dataset))}-{split}-{extractor.name}-{ref_stats_key(meta)}"
    if (folder / "meta.json").is_file():
        try:
            return _load_ref_stats(folder, meta)
        except ArtifactError as e:
            log.warning("recomputing reference statistics: %s", e)
    stats = _compute_ref_stats(extractor, meta, batch_size, data_dir)
    save_tensors(folder / "stats.safetensors", {"mu": torch.from_numpy(stats.mu), "sigma": torch.from_numpy(stats.sigma),
                                                "features": stats.features})
    write_json(folder / "meta.json", stats.meta)  # written last: a folder with meta.json is complete
    return stats


def _compute_ref_stats(extractor: FeatureExtractor, meta: dict, batch_size: int,
                       data_dir: str | Path | None) -> RefStats:
    """Streams the split batch by batch: memory holds one batch of images, the running moments and the
    `pr_cap` features kept for precision/recall, whatever the split's size."""
    from torch.utils.data import DataLoader

    from ..data.datasets import Subset, balanced_subset, build_dataset, dataset_labels

    ds = build_dataset(meta["dataset"], meta["split"], resolution=meta["resolution"], channels=meta["channels"],
                       data_dir=data_dir)
    if meta["n"] is not None and meta["n"] < len(ds):
        ds = Subset(ds, balanced_subset(dataset_labels(ds), meta["n"], meta["seed"]))
    keep = torch.zeros(len(ds), dtype=torch.bool)
    keep[torch.randperm(len(ds), generator=torch.Generator().manual_seed(meta["seed"]))[:meta["pr_cap"]]] = True
    moments, kept, start = RunningMoments(extractor.feature_dim), [], 0
    for images, _ in DataLoader(ds, batch_size=batch_size):
        features, _ = extract_features(extractor, images, batch_size)
        moments.add(features)
        kept.append(features[keep[start:start + len(features)]])
        start += len(features)
    mu, sigma = moments.stats()
    return RefStats(mu, sigma, torch.cat(kept), {**meta, "count": moments.n})


def _load_ref_stats(folder: Path, meta: dict) -> RefStats:
    stored = read_json(folder / "meta.json")
    if {k: stored.get(k) for k in meta} != meta:
        raise ArtifactError(f"{folder}: cached statistics were made with other settings")
    t = load_tensors(folder / "stats.safetensors")
    return RefStats(t["mu"].numpy(), t["sigma"].numpy(), t["features"], stored)


# --- statistics files: ADM's reference batches, pytorch-fid's, ours ------------------------------------

def load_stats_file(path: str | Path, extractor: FeatureExtractor, pr_cap: int = 10000, batch_size: int = 64) -> RefStats:
    """Precomputed reference statistics in an .npz: `mu` and `sigma` (pytorch-fid's layout), plus ADM's
    `arr_0` reference images (features for precision/recall are extracted from them) or ctfgen's
    `features` and `extractor` (written by `save_stats_file`). The feature size must be the extractor's."""
    with read_npz(path, "--ref-stats ") as f:
        arrays = {k: f[k] for k in f.files if k in ("mu", "sigma", "arr_0", "features", "extractor")}
    if "mu" not in arrays or "sigma" not in arrays:
        raise CtfgenError(f"--ref-stats {path} has no 'mu' and 'sigma' arrays")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.shape != (extractor.feature_dim,) or sigma.shape != (extractor.feature_dim,) * 2:
        raise CtfgenError(f"--ref-stats {path} holds {mu.shape[0]}-dimensional statistics, but the {extractor.name} "
                          f"extractor makes {extractor.feature_dim} features (ADM's and pytorch-fid's files need "
                          "--extractor inception)")
    if "extractor" in arrays and str(arrays["extractor"]) != extractor.name:
        raise CtfgenError(f"--ref-stats {path} was made with the {arrays['extractor']} extractor, not {extractor.name}")
    if "features" in arrays:
        features = torch.from_numpy(arrays["features"]).float()
    elif "arr_0" in arrays:
        images = arrays["arr_0"][:pr_cap]
        features = torch.cat([extract_features(extractor, uint8_to_float(images[i:i + batch_size]), batch_size)[0]
                              for i in range(0, len(images), batch_size)])
    else:
        features = torch.zeros(0, extractor.feature_dim)
    return RefStats(mu, sigma, features, {"stats_file": str(path), "count": None, "pr_features": len(features)})


def save_stats_file(path: str | Path, stats: RefStats, extractor: FeatureExtractor) -> None:
    """Write `mu`, `sigma` (the layout ADM's and pytorch-fid's tools read), `features` and `extractor`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, features=stats.features.numpy(), extractor=np.array(extractor.name))


# --- everything at once ------------------------------------------------------------------------------------

def evaluate_features(features: torch.Tensor, logits: torch.Tensor | None, ref: RefStats, extractor_name: str,
                      k: int = 3, is_splits: int = 10) -> dict:
    """FID / IS / precision / recall of generated features against reference statistics, labelled."""
    mu, sigma = feature_stats(features)
    # precision and recall depend on the set sizes (k-NN radii): compare equal-size sets
    n = min(len(ref.features), len(features))
    precision = recall = None  # statistics from a file without reference images or features have none
    if n > k:
        pick = torch.Generator().manual_seed(0)
        real = ref.features[torch.randperm(len(ref.features), generator=pick)[:n]]
        fake = torch.as_tensor(features)[torch.randperm(len(features), generator=pick)[:n]]
        precision, recall = precision_recall(real, fake, k)
    result = {"extractor": extractor_name, "fid_label": metric_label(extractor_name), "n": len(features),
              "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma), "precision": precision, "recall": recall,
              "pr_n": n}
    if logits is not None and len(features) >= is_splits:
        result["is_mean"], result["is_std"] = inception_score(logits.double().softmax(dim=1), is_splits)
        result["is_label"] = metric_label(extractor_name, "IS")
    return result


def evaluate_images(images: torch.Tensor, extractor: FeatureExtractor, ref: RefStats, batch_size: int = 64,
                    k: int = 3) -> dict:
    features, logits = extract_features(extractor, images, batch_size)
    return evaluate_features(features, logits, ref, extractor.name, k)
