"""Sample grids of the model being trained, shown in TensorBoard (`--sample-every`).

Built on the samplers in ctfgen.sampling, not on the pipelines, so training does not depend on the
floor above it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..artifacts import ArtifactError
from ..data.transforms import image_grid
from ..hierarchy import Hierarchy, check_compatible
from ..sampling import StageSettings, check_stages_fit, sample_baseline, sample_ctf
from ..tokenizer.model import load_tokenizer
from ..transformer.model import Transformer, load_model


class Preview:
    """One row per class (at most `max_classes`), a fixed seed so rows compare across steps, no guidance, t = 1."""

    def __init__(self, model: Transformer, tokenizer_dir: str, refiner_dir: str | None, hierarchy: Hierarchy | None,
                 device: torch.device, per_class: int = 4, max_classes: int = 8, seed: int = 0):
        self.model, self.device, self.per_class, self.seed = model, device, per_class, seed
        self.tokenizer = load_tokenizer(tokenizer_dir, device)
        grid = self.tokenizer.config.grid_size
        if (model.config.grid_h, model.config.grid_w) != (grid, grid):
            raise ArtifactError(f"--sample-tokenizer {tokenizer_dir} makes {grid}x{grid} code grids, but the model "
                                f"works on {model.config.grid_h}x{model.config.grid_w}")
        self.refiner = self.hierarchy = None
        if model.config.role == "coarse":
            assert refiner_dir is not None and hierarchy is not None  # checked with the train config
            check_compatible(hierarchy, fingerprint=self.tokenizer.fingerprint,
                             codebook_size=self.tokenizer.config.codebook_size, source=f"--sample-tokenizer {tokenizer_dir}")
            self.refiner, self.hierarchy = load_model(refiner_dir, device), hierarchy
            check_stages_fit(model, self.refiner)
        self.labels = torch.arange(min(model.config.num_classes, max_classes)).repeat_interleave(per_class).to(device)

    def grid(self) -> np.ndarray:
        """The sample grid as an RGB uint8 array [H, W, 3]."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        plain = StageSettings()
        if self.refiner is None:
            fine = sample_baseline(self.model, self.labels, plain, generator)
        else:
            _, fine = sample_ctf(self.model, self.refiner, self.labels, plain, plain, generator, self.hierarchy.member_mask)
        g = self.tokenizer.config.grid_size
        pixels = self.tokenizer.decode(fine.view(-1, g, g)).cpu()
        return np.asarray(image_grid(pixels, nrow=self.per_class).convert("RGB"))
