"""The redundancy test: how much does a token change the image if swapped within its cluster?

On test images: encode, then replace every token by
- `within`: a random *other* member of its coarse cluster (a token alone in its cluster
  has no other member and stays unchanged; so with K = V nothing changes),
- `random`: a random other codeword (uniform over the V - 1 others),
- `nearest`: its nearest other codeword on the unit sphere,
and decode. Each variant is compared with the original image and with the plain
reconstruction (decode of the unchanged codes): mean per-image PSNR, mean pixel MSE and
mean squared distance in a feature space. The paper's claim (Fig. 1b) is that `within`
changes only fine detail: close to `nearest`, far from `random`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from ..artifacts import write_json
from ..data.transforms import image_grid
from ..errors import CtfgenError
from ..tokenizer.model import VQTokenizer
from .artifact import Hierarchy, check_compatible

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # images float[B,C,H,W] in [-1,1] -> features [B, ...]

PSNR_CAP_DB = 100.0  # identical images would give +inf; JSON has no inf, so PSNR is capped here
REPORT_KIND = "redundancy-report"  # the kind of the folder `ctfgen analyze-redundancy` writes (ctfgen.outputs)
REPORT_NAME = "redundancy.json"
PANEL_NAME = "redundancy.png"


def encoder_features(tokenizer: VQTokenizer) -> FeatureFn:
    """The tokenizer's own pre-quantization features, quant_conv(encoder(x)).

    A placeholder-free default that needs no extra weights; pass a pretrained extractor
    (e.g. Inception or DINO features) as `feature_fn` for a perceptual distance instead.
    """
    def features(images: torch.Tensor) -> torch.Tensor:
        return tokenizer.quant_conv(tokenizer.encoder(images))
    return features


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2), capped at PSNR_CAP_DB."""
    mse = (a - b).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(4.0 * 10 ** (-PSNR_CAP_DB / 10)))).clamp_max(PSNR_CAP_DB)


# --- the three swaps -----------------------------------------------------------------------------

def swap_within_cluster(codes: torch.Tensor, h: Hierarchy, generator: torch.Generator) -> torch.Tensor:
    """Every token -> a uniformly random other member of its cluster (unchanged in a singleton cluster)."""
    flat = codes.flatten().long().cpu()
    cluster = h.coarse_of[flat]
    start, size = h.offsets[cluster], h.sizes[cluster]
    # position of each token inside its cluster's sorted member list
    pos = torch.empty(h.V, dtype=torch.long)
    pos[h.indices] = torch.arange(h.V) - h.offsets[h.coarse_of[h.indices]]
    own = pos[flat]
    r = (torch.rand(len(flat), generator=generator) * (size - 1)).long()
    r = r + (r >= own)  # skip the token itself
    new = torch.where(size > 1, h.indices[start + r.clamp_max(size - 1)], flat)
    return new.view(codes.shape).to(codes.device)


def swap_random(codes: torch.Tensor, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Every token -> a uniformly random other codeword."""
    flat = codes.flatten().long().cpu()
    r = torch.randint(vocab - 1, (len(flat),), generator=generator)
    return (r + (r >= flat)).view(codes.shape).to(codes.device)


def nearest_other(codebook: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """long[V]: for every codeword, the index of the most similar other codeword."""
    out = []
    for s in range(0, len(codebook), chunk):
        sims = codebook[s:s + chunk] @ codebook.T
        sims[torch.arange(len(sims)), torch.arange(s, s + len(sims))] = -math.inf
        out.append(sims.argmax(1))
    return torch.cat(out)


def make_variants(tokenizer: VQTokenizer, codes: torch.Tensor, hierarchies: list[Hierarchy], seed: int = 0) -> dict[str, torch.Tensor]:
    """The swapped code grids, keyed 'random', 'nearest' and 'within:<i>' (one per hierarchy).

    Deterministic for a seed; every hierarchy draws from the same seed, so comparisons between
    hierarchies are paired as far as their cluster sizes allow.
    """
    vocab = tokenizer.config.codebook_size
    nn = nearest_other(tokenizer.codebook.detach().float().cpu()).to(codes.device)
    variants = {"random": swap_random(codes, vocab, torch.Generator().manual_seed(seed)), "nearest": nn[codes]}
    for i, h in enumerate(hierarchies):
        variants[f"within:{i}"] = swap_within_cluster(codes, h, torch.Generator().manual_seed(seed + 1))
    return variants


# --- the analysis --------------------------------------------------------------------------------

def _encode(tokenizer: VQTokenizer, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([tokenizer.encode(part) for part in images.split(batch_size)])


def _decode(tokenizer: VQTokenizer, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([tokenizer.decode(part) for part in codes.split(batch_size)])


@torch.no_grad()
def _compare(tokenizer: VQTokenizer, codes: torch.Tensor, images: torch.Tensor, plain: torch.Tensor,
             plain_features: torch.Tensor, feature_fn: FeatureFn, batch_size: int) -> dict[str, float]:
    psnr_orig, psnr_plain, mse, feat = [], [], [], []
    for s in range(0, len(codes), batch_size):
        rec = tokenizer.decode(codes[s:s + batch_size])
        ref = plain[s:s + batch_size]
        psnr_orig.append(psnr(rec, images[s:s + batch_size]))
        psnr_plain.append(psnr(rec, ref))
        mse.append((rec - ref).pow(2).flatten(1).mean(1))
        feat.append((feature_fn(rec) - plain_features[s:s + batch_size]).pow(2).flatten(1).mean(1))
    return {
        "psnr_vs_original": torch.cat(psnr_orig).mean().item(),
        "psnr_vs_plain": torch.cat(psnr_plain).mean().item(),
        "mse_vs_plain": torch.cat(mse).mean().item(),
        "feature_distance": torch.cat(feat).mean().item(),
    }


@torch.no_grad()
def analyze_redundancy(tokenizer: VQTokenizer, images: torch.Tensor, hierarchies: list[Hierarchy], seed: int = 0,
                       feature_fn: FeatureFn | None = None, feature_name: str | None = None,
                       batch_size: int = 128) -> dict[str, Any]:
    """Swap every token three ways and measure the damage; returns a JSON-ready dict.

    `feature_fn` maps images to features (default: the tokenizer's encoder features,
    `encoder_features`); `feature_distance` is the mean squared feature difference to the
    plain reconstruction. `damage_ratio` of a hierarchy = its within-cluster MSE / the random
    swap's MSE (0: swaps inside clusters are free, 1: as bad as random).
    """
    if images.dim() != 4 or len(images) == 0:
        raise CtfgenError(f"expected a non-empty image batch [N,C,H,W], got {tuple(images.shape)}")
    for h in hierarchies:
        check_compatible(h, fingerprint=tokenizer.fingerprint, codebook_size=tokenizer.config.codebook_size)
    tokenizer = tokenizer.eval()
    images = images.to(next(tokenizer.parameters()).device)
    if feature_fn is None:
        feature_fn, feature_name = encoder_features(tokenizer), "tokenizer-encoder"
    feature_name = feature_name or getattr(feature_fn, "__name__", "custom")
    codes = _encode(tokenizer, images, batch_size)
    plain = _decode(tokenizer, codes, batch_size)
    plain_features = torch.cat([feature_fn(part) for part in plain.split(batch_size)])
    variants = make_variants(tokenizer, codes, hierarchies, seed)

    def measure(name: str) -> dict[str, float]:
        stats = _compare(tokenizer, variants[name], images, plain, plain_features, feature_fn, batch_size)
        stats["tokens_changed"] = (variants[name] != codes).float().mean().item()
        return stats

    baselines = {name: measure(name) for name in ("random", "nearest")}
    rows = []
    for i, h in enumerate(hierarchies):
        within = measure(f"within:{i}")
        rows.append({
            "method": h.method, "K": h.K, "hierarchy_fingerprint": h.fingerprint, "within": within,
            "damage_ratio": within["mse_vs_plain"] / max(baselines["random"]["mse_vs_plain"], 1e-12),
            "feature_ratio": within["feature_distance"] / max(baselines["random"]["feature_distance"], 1e-12),
        })
    return {
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "codebook_size": tokenizer.config.codebook_size,
        "num_images": len(images),
        "seed": seed,
        "feature": feature_name,
        "psnr_cap_db": PSNR_CAP_DB,
        "plain": {"psnr_vs_original": psnr(plain, images).mean().item()},
        "random": baselines["random"],
        "nearest": baselines["nearest"],
        "hierarchies": rows,
    }


@torch.no_grad()
def redundancy_panel(tokenizer: VQTokenizer, images: torch.Tensor, hierarchies: list[Hierarchy], seed: int = 0,
                     n_show: int = 8):
    """A PIL image, one row each: originals, plain reconstructions, random swap, nearest swap,
    then the within-cluster swap of every hierarchy in order (same draws as `analyze_redundancy`)."""
    images = images.to(next(tokenizer.parameters()).device)
    codes = _encode(tokenizer, images, 128)  # all images, so the draws match the analysis
    variants = make_variants(tokenizer, codes, hierarchies, seed)
    show = slice(0, min(n_show, len(images)))
    rows = [images[show], tokenizer.decode(codes[show]), tokenizer.decode(variants["random"][show]),
            tokenizer.decode(variants["nearest"][show])]
    rows += [tokenizer.decode(variants[f"within:{i}"][show]) for i in range(len(hierarchies))]
    return image_grid(torch.cat(rows).cpu(), nrow=len(images[show]))


def write_redundancy_report(folder: str | Path, tokenizer: VQTokenizer, images: torch.Tensor,
                            hierarchies: list[Hierarchy], seed: int = 0, n_show: int = 8,
                            feature_fn: FeatureFn | None = None, feature_name: str | None = None) -> dict[str, Any]:
    """Run `analyze_redundancy` and write redundancy.json and the redundancy.png panel into `folder`."""
    folder = Path(folder)
    report = analyze_redundancy(tokenizer, images, hierarchies, seed, feature_fn, feature_name)
    report["panel_rows"] = ["original", "reconstruction", "random", "nearest"] + [
        f"within {h.method} K={h.K}" for h in hierarchies]
    write_json(folder / REPORT_NAME, report)
    redundancy_panel(tokenizer, images, hierarchies, seed, n_show).save(folder / PANEL_NAME)
    return report
