"""The extracted-code artifact: a memory-mapped integer array of token grids plus labels.

Folder layout: `codes.npy` [N, h, w] (int16 when the codebook fits, else int32),
`labels.npy` [N] int64, `meta.json` (codebook size, grid, tokenizer fingerprint,
dataset, split, views). With flip copies the originals come first, then their mirrors.
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
        return len(self.codes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.codes[i].astype(np.int64).reshape(-1)), int(self.labels[i])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fancy-indexed batch without a DataLoader: (long[B, h*w], long[B])."""
        idx = np.sort(indices.numpy())  # sorted reads are faster on a memmap; order within a batch is irrelevant
        codes = torch.from_numpy(self.codes[idx].astype(np.int64)).flatten(1)
        return codes, torch.from_numpy(self.labels[idx].astype(np.int64))
