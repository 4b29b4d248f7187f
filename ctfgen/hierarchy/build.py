"""Library entry point: a tokenizer (folder or model) -> a Hierarchy of its codebook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CtfgenError
from ..tokenizer.model import VQTokenizer, load_tokenizer
from .artifact import Hierarchy
from .auto_k import DEFAULT_TOLERANCE, choose_k
from .cluster import cluster_codebook


def build_hierarchy(tokenizer_dir_or_model: str | Path | VQTokenizer, method: str = "kmeans", k: int | str = 512,
                    seed: int = 0, images: torch.Tensor | None = None, tolerance: float = DEFAULT_TOLERANCE,
                    **params: Any) -> Hierarchy:
    """Cluster the tokenizer's l2-normalised codebook into k coarse groups.

    `k="auto"` chooses K by the noise-floor criterion (`auto_k.choose_k`) measured on `images`
    (required then; a few hundred held-out images are enough); the choice and its curve are
    recorded in the hierarchy's params under "k_selection".
    `params` go to the clustering method (e.g. max_iter, metric).
    """
    tokenizer = tokenizer_dir_or_model
    if not isinstance(tokenizer, VQTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if k == "auto":
        if images is None:
            raise CtfgenError("k='auto' measures swap damage on images: pass images=float[N,C,H,W] in [-1,1]")
        auto = choose_k(tokenizer, images, tolerance, method, seed, **params)
        assert auto.clustering is not None
        h = Hierarchy.from_clustering(auto.clustering, seed, tokenizer.fingerprint)
        h.params["k_selection"] = auto.to_dict()
        return h
    if isinstance(k, str):
        raise CtfgenError(f"k must be an integer or 'auto', got {k!r}")
    clustering = cluster_codebook(tokenizer.codebook.detach().float().cpu(), method, k, seed=seed, **params)
    return Hierarchy.from_clustering(clustering, seed, tokenizer.fingerprint)
