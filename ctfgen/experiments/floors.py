"""Floors: image sets that bound what a metric can say about CTF.

(a) `reconstruction`: the tokenizer's reconstructions of real images, the best any generator on
    these tokens can do; (b) `true-coarse+refiner`: the true coarse grids of real images refined and
    decoded, what a perfect stage 1 would give; (c) `true-coarse+uniform`: the true coarse grids with
    a uniformly random member of each cluster, what stage 2 adds over no model at all.
"""

from __future__ import annotations

import torch

from ..hierarchy import Hierarchy
from ..sampling import StageSettings, refine
from ..tokenizer.model import VQTokenizer
from ..transformer.model import Transformer


@torch.no_grad()
def floor_sets(tokenizer: VQTokenizer, hierarchy: Hierarchy, images: torch.Tensor, labels: torch.Tensor,
               refiner: Transformer | None = None, settings: StageSettings = StageSettings(temperature=1.1),
               refiner_mask: bool = True, seed: int = 0, batch_size: int = 64,
               coarse_model: Transformer | None = None) -> dict[str, torch.Tensor]:
    """Real images float[N, C, H, W] in [-1, 1] (and their labels) -> {floor name: decoded images, on the CPU}.
    coarse_model: the one whose hidden states a refiner with `feature_dim` reads (teacher-forced on the true grid)."""
    generator = torch.Generator(device=tokenizer.codebook.device).manual_seed(seed)
    cpu_generator = torch.Generator().manual_seed(seed)
    device = tokenizer.codebook.device
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size].to(device), labels[start:start + batch_size]
        fine = tokenizer.encode(x)
        coarse = hierarchy.to_coarse(fine)
        grids = {"reconstruction": fine, "true-coarse+uniform": hierarchy.random_members(coarse, cpu_generator).to(device)}
        if refiner is not None:
            mask = hierarchy.member_mask if refiner_mask else None
            grid, y = coarse.flatten(1), y.to(device)
            features = coarse_model.hidden_states(grid, y) if refiner.config.feature_dim else None
            refined = refine(refiner, grid, y, settings, generator, mask, features=features)
            grids["true-coarse+refiner"] = refined.view(fine.shape)
        for name, grid in grids.items():
            parts.setdefault(name, []).append(tokenizer.decode(grid).cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
