"""The extracted-code artifact: a memory-mapped integer array of token grids plus labels.

Folder layout: `codes.npy` [views x items, h, w] (int16 when the codebook fits, else int32),
`labels.npy` [views x items] int64, `meta.json` (codebook size, grid, tokenizer fingerprint,
dataset, split, views). View v of item i is row v * items + i; view 0 is the plain image (or the
centre crop). The dataset has `items` entries; training draws one view of each (`batch` with a generator).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..artifacts import ArtifactError, read_json

CODES_KIND = "codes"


def code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32)


class CodeDataset(Dataset):
    """Token grids for training the transformers: items are (long[h*w], label)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise ArtifactError(f"{folder} is not a codes folder (no meta.json; `ctfgen extract` writes one)")
        self.meta = read_json(folder / "meta.json")
        if self.meta.get("kind") != CODES_KIND:
            raise ArtifactError(f"{folder} is not a codes folder (meta.json kind={self.meta.get('kind')!r})")
        try:
            self.codes = np.load(folder / "codes.npy", mmap_mode="r")
            self.labels = np.load(folder / "labels.npy")
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{folder}: cannot read the code arrays ({e})") from None
        if len(self.codes) != len(self.labels) or list(self.codes.shape[1:]) != self.meta["grid"]:
            raise ArtifactError(f"{folder}: codes {self.codes.shape} and labels {self.labels.shape} do not match meta.json")
        self.views = len(self.meta.get("views") or ["original"])
        if len(self.codes) % self.views:
            raise ArtifactError(f"{folder}: {len(self.codes)} code grids are not {self.views} views of each item")
        self.items = len(self.codes) // self.views
        self.folder = folder

    @property
    def codebook_size(self) -> int:
        return self.meta["codebook_size"]

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer_fingerprint"]

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Item i's view 0."""
        if not 0 <= i < self.items:
            raise IndexError(i)
        return torch.from_numpy(self.codes[i].astype(np.int64).reshape(-1)), int(self.labels[i])

    def batch(self, indices: torch.Tensor,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fancy-indexed batch of items without a DataLoader: (long[B, h*w], long[B]); each item's view is
        drawn from `generator` when there are several, else view 0."""
        rows = indices.numpy().astype(np.int64)
        if generator is not None and self.views > 1:
            rows = rows + self.items * torch.randint(self.views, (len(rows),), generator=generator).numpy()
        rows = np.sort(rows)  # sorted reads are faster on a memmap; order within a batch is irrelevant
        codes = torch.from_numpy(self.codes[rows].astype(np.int64)).flatten(1)
        return codes, torch.from_numpy(self.labels[rows].astype(np.int64))
