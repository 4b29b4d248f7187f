"""Choosing K automatically (`k="auto"`), which the paper leaves open.

Criterion (the tokenizer's noise floor): encode a set of held-out images; for a candidate K,
cluster the codebook and replace every token by a random other member of its cluster, then
decode. `auto` picks the smallest K among the powers of two 2, 4, ..., V/2 for which

    MSE(decode(within-cluster swap), plain reconstruction) <= tolerance * MSE(plain reconstruction, image)

i.e. the coarsest labels for which a refiner that knew only the cluster and guessed blindly
inside it would change the image by no more than the tokenizer already does (tolerance 1:
the swap's PSNR against the reconstruction is at least the tokenizer's reconstruction PSNR).
Small K keeps stage 1's softmax small; the criterion bounds what stage 2 has to recover by
the error the pipeline already accepts. It needs a trained tokenizer: an untrained one
reconstructs nothing, so every K passes and the smallest is returned (see docs/hierarchy.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CtfgenError
from ..tokenizer.model import VQTokenizer
from .artifact import Hierarchy
from .cluster import Clustering, cluster_codebook
from .redundancy import psnr, swap_random, swap_within_cluster

DEFAULT_TOLERANCE = 1.0


@dataclass
class AutoK:
    K: int
    tolerance: float
    recon_mse: float  # the tokenizer's noise floor: MSE(plain reconstruction, image), images in [-1, 1]
    random_mse: float  # MSE(decode(random swap), plain), for scale
    curve: list[dict[str, float]]  # one row per K tried, increasing K
    met: bool  # False when no candidate met the tolerance (K is then the largest candidate)
    clustering: Clustering | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": "noise-floor", "K": self.K, "tolerance": self.tolerance, "met": self.met,
                "recon_mse": self.recon_mse, "random_mse": self.random_mse, "curve": self.curve}


def candidate_ks(vocab: int) -> list[int]:
    """Powers of two from 2 to V/2."""
    ks, k = [], 2
    while k <= vocab // 2:
        ks.append(k)
        k *= 2
    return ks


def _decode_all(tokenizer: VQTokenizer, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([tokenizer.decode(part) for part in codes.split(batch_size)])


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).flatten(1).mean(1).mean().item()


@torch.no_grad()
def noise_floor_curve(tokenizer: VQTokenizer, images: torch.Tensor, ks: list[int], method: str = "kmeans",
                      seed: int = 0, tolerance: float | None = None, batch_size: int = 64,
                      **params: Any) -> tuple[list[dict[str, float]], list[Clustering], float, float]:
    """Within-cluster swap damage for each K in `ks` (in the order given), plus the tokenizer's
    reconstruction MSE and the random-swap MSE. With `tolerance`, stops at the first K that meets it."""
    if images.dim() != 4 or len(images) == 0:
        raise CtfgenError(f"expected a non-empty image batch [N,C,H,W], got {tuple(images.shape)}")
    tokenizer = tokenizer.eval()
    images = images.to(next(tokenizer.parameters()).device)
    codes = torch.cat([tokenizer.encode(part) for part in images.split(batch_size)])
    plain = _decode_all(tokenizer, codes, batch_size)
    recon_mse = _mse(plain, images)
    random_codes = swap_random(codes, tokenizer.config.codebook_size, torch.Generator().manual_seed(seed))
    random_mse = _mse(_decode_all(tokenizer, random_codes, batch_size), plain)
    codebook = tokenizer.codebook.detach().float().cpu()
    curve, clusterings = [], []
    for k in ks:
        c = cluster_codebook(codebook, method, k, seed=seed, **params)
        within = _decode_all(tokenizer, swap_within_cluster(codes, Hierarchy(c.labels, k), torch.Generator().manual_seed(seed + 1)), batch_size)
        mse = _mse(within, plain)
        curve.append({"K": k, "within_mse": mse, "within_psnr_vs_plain": psnr(within, plain).mean().item(),
                      "ratio_to_noise_floor": mse / max(recon_mse, 1e-12),
                      "ratio_to_random": mse / max(random_mse, 1e-12), "inertia": c.inertia})
        clusterings.append(c)
        if tolerance is not None and mse <= tolerance * recon_mse:
            break
    return curve, clusterings, recon_mse, random_mse


def choose_k(tokenizer: VQTokenizer, images: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE, method: str = "kmeans",
             seed: int = 0, candidates: list[int] | None = None, **params: Any) -> AutoK:
    """The smallest candidate K (default: powers of two up to V/2) meeting the noise-floor criterion.

    Tries candidates in increasing order and stops at the first that passes, so it clusters and
    decodes only as often as needed. If none passes, returns the largest candidate with met=False.
    """
    if tolerance <= 0:
        raise CtfgenError(f"tolerance must be positive, got {tolerance}")
    ks = sorted(candidates or candidate_ks(tokenizer.config.codebook_size))
    if not ks:
        raise CtfgenError(f"no candidate K for a codebook of {tokenizer.config.codebook_size}")
    curve, clusterings, recon_mse, random_mse = noise_floor_curve(tokenizer, images, ks, method, seed, tolerance, **params)
    met = curve[-1]["within_mse"] <= tolerance * recon_mse
    return AutoK(curve[-1]["K"], tolerance, recon_mse, random_mse, curve, met, clusterings[-1])
