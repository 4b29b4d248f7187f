"""The hierarchy artifact: which coarse cluster every codeword belongs to.

A folder written by `save_hierarchy` holds
- `model.safetensors`: `coarse_of` (long[V], values 0..K-1) and the members of every
  cluster as CSR-style `offsets` (long[K+1]) + `indices` (long[V]): the members of
  cluster k are `indices[offsets[k]:offsets[k+1]]`, in increasing order;
- `config.json`: `"kind": "hierarchy"`, K, V, the method and its parameters, the seed,
  the inertia, the cluster-size histogram, the fingerprint of the tokenizer the codebook
  came from and the hierarchy's own fingerprint (later stages record it).

Later stages call `check_compatible` (or `load_hierarchy(..., tokenizer=...)`) so a
hierarchy is never used with codes from another codebook.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..artifacts import ArtifactError, fingerprint_tensors, load_artifact, save_artifact
from ..errors import CtfgenError
from .cluster import Clustering

log = logging.getLogger(__name__)

HIERARCHY_KIND = "hierarchy"
FORMAT_VERSION = 1


class Hierarchy:
    """A partition of the V codewords into K non-empty coarse clusters."""

    def __init__(self, coarse_of: torch.Tensor, K: int | None = None, *, method: str = "unknown",
                 params: dict[str, Any] | None = None, seed: int | None = None, inertia: float | None = None,
                 iterations: int | None = None, tokenizer_fingerprint: str | None = None):
        coarse_of = torch.as_tensor(coarse_of)
        if coarse_of.dim() != 1 or coarse_of.dtype.is_floating_point or coarse_of.dtype == torch.bool or len(coarse_of) == 0:
            raise CtfgenError(f"coarse_of must be a non-empty 1-D integer tensor, got {tuple(coarse_of.shape)} {coarse_of.dtype}")
        coarse_of = coarse_of.detach().long().cpu().contiguous()
        K = int(coarse_of.max()) + 1 if K is None else int(K)
        if coarse_of.min() < 0 or coarse_of.max() >= K:
            raise CtfgenError(f"coarse labels must lie in [0, {K}), got [{int(coarse_of.min())}, {int(coarse_of.max())}]")
        sizes = torch.bincount(coarse_of, minlength=K)
        if (sizes == 0).any():
            raise CtfgenError(f"{int((sizes == 0).sum())} of the {K} clusters are empty; every coarse label needs a member")
        self.coarse_of = coarse_of
        self.K, self.V = K, len(coarse_of)
        self.sizes = sizes
        self.offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        self.indices = coarse_of.argsort(stable=True)  # members of each cluster, in increasing order
        self.method, self.params, self.seed = method, dict(params or {}), seed
        self.inertia, self.iterations = inertia, iterations
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self._by_device: dict[torch.device, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None

    @classmethod
    def from_clustering(cls, clustering: Clustering, seed: int | None = None,
                        tokenizer_fingerprint: str | None = None) -> "Hierarchy":
        return cls(clustering.labels, clustering.K, method=clustering.method, params=clustering.params, seed=seed,
                   inertia=clustering.inertia, iterations=clustering.iterations,
                   tokenizer_fingerprint=tokenizer_fingerprint)

    def members(self, k: int) -> torch.Tensor:
        """The codewords of cluster k (long, increasing)."""
        if not 0 <= k < self.K:
            raise IndexError(f"cluster {k} out of range [0, {self.K})")
        return self.indices[self.offsets[k]:self.offsets[k + 1]]

    def random_members(self, coarse: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Coarse labels of any shape -> a uniformly random member codeword of each (same shape, on the CPU).
        The draw is made on the generator's device, so a CUDA generator works too."""
        flat = coarse.flatten().long().cpu()
        size = self.sizes[flat]
        device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(len(flat), generator=generator, dtype=torch.float64, device=device).cpu()
        r = (u * size).long().clamp_max(size - 1)
        return self.indices[self.offsets[flat] + r].view(coarse.shape)

    def to_coarse(self, codes: torch.Tensor) -> torch.Tensor:
        """Fine codes of any shape, on any device -> their coarse labels (same shape and device)."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise CtfgenError(f"codes must be an integer tensor, got {codes.dtype}")
        table = self._by_device.get(codes.device)
        if table is None:
            table = self._by_device[codes.device] = self.coarse_of.to(codes.device)
        return table[codes.long()]

    @property
    def member_mask(self) -> torch.Tensor:
        """bool[K, V]: member_mask[k, v] is True iff codeword v belongs to cluster k (for masking logits)."""
        if self._mask is None:
            mask = torch.zeros(self.K, self.V, dtype=torch.bool)
            mask[self.coarse_of, torch.arange(self.V)] = True
            self._mask = mask
        return self._mask

    @property
    def fingerprint(self) -> str:
        """Content hash of the partition, for later stages to record which hierarchy they used."""
        return fingerprint_tensors({"coarse_of": self.coarse_of})

    def size_histogram(self) -> dict[str, int]:
        """{cluster size: number of clusters of that size} (string keys, as stored in JSON)."""
        values, counts = torch.unique(self.sizes, return_counts=True)
        return {str(int(v)): int(c) for v, c in zip(values, counts)}

    def config(self) -> dict[str, Any]:
        return {
            "kind": HIERARCHY_KIND,
            "format_version": FORMAT_VERSION,
            "K": self.K,
            "V": self.V,
            "method": self.method,
            "params": self.params,
            "seed": self.seed,
            "inertia": self.inertia,
            "iterations": self.iterations,
            "cluster_sizes": {"min": int(self.sizes.min()), "max": int(self.sizes.max()),
                              "mean": self.V / self.K, "histogram": self.size_histogram()},
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return (f"Hierarchy(K={self.K}, V={self.V}, method={self.method!r}, "
                f"sizes {int(self.sizes.min())}..{int(self.sizes.max())}, tokenizer={self.tokenizer_fingerprint})")


def check_compatible(h: Hierarchy, fingerprint: str | None = None, codebook_size: int | None = None,
                     source: str = "the tokenizer") -> None:
    """Raise ArtifactError if `h` was not made for this codebook. `source` names the other side in the message."""
    if codebook_size is not None and int(codebook_size) != h.V:
        raise ArtifactError(f"hierarchy has V={h.V} but {source} uses a codebook of {int(codebook_size)}")
    if fingerprint is not None:
        if h.tokenizer_fingerprint is None:
            log.warning("hierarchy records no tokenizer fingerprint; cannot check it against %s (%s)", source, fingerprint)
        elif fingerprint != h.tokenizer_fingerprint:
            raise ArtifactError(f"hierarchy was made from tokenizer {h.tokenizer_fingerprint}, "
                                f"but {source} has fingerprint {fingerprint}")


def save_hierarchy(h: Hierarchy, folder: str | Path) -> None:
    tensors = {"coarse_of": h.coarse_of, "offsets": h.offsets, "indices": h.indices}
    save_artifact(folder, h.config(), tensors)


def load_hierarchy(folder: str | Path, tokenizer: Any = None, codebook_size: int | None = None,
                   fingerprint: str | None = None) -> Hierarchy:
    """Read a hierarchy folder; with a tokenizer (or a codebook size / fingerprint), check it fits."""
    config, tensors = load_artifact(folder, HIERARCHY_KIND)
    missing = {"coarse_of", "offsets", "indices"} - set(tensors)
    if missing:
        raise ArtifactError(f"{folder}: hierarchy tensors {sorted(missing)} are missing")
    try:
        h = Hierarchy(tensors["coarse_of"], config.get("K"), method=config.get("method", "unknown"),
                      params=config.get("params"), seed=config.get("seed"), inertia=config.get("inertia"),
                      iterations=config.get("iterations"), tokenizer_fingerprint=config.get("tokenizer_fingerprint"))
    except ValueError as e:
        raise ArtifactError(f"{folder}: invalid hierarchy: {e}") from None
    if h.V != config.get("V") or not torch.equal(h.offsets, tensors["offsets"]) or not torch.equal(h.indices, tensors["indices"]):
        raise ArtifactError(f"{folder}: the stored members (offsets/indices) or V do not match coarse_of; the folder is corrupt")
    if tokenizer is not None:
        check_compatible(h, fingerprint=tokenizer.fingerprint, codebook_size=tokenizer.config.codebook_size)
    check_compatible(h, fingerprint=fingerprint, codebook_size=codebook_size,
                     source="the code array" if tokenizer is None else "the tokenizer")
    return h
