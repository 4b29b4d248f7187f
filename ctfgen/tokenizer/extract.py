"""Encode a dataset once with a frozen tokenizer into the code artifact (see ctfgen.data.codes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..artifacts import write_json
from ..outputs import open_output
from ..data.codes import CODES_KIND, code_dtype
from ..errors import CtfgenError
from .model import VQTokenizer


@torch.no_grad()
def extract_codes(tokenizer: VQTokenizer, dataset: Dataset, out: str | Path, *, hflip_copies: bool = False,
                  batch_size: int = 256, num_workers: int = 0, dataset_name: str = "", split: str = "",
                  device: str | torch.device = "cpu", progress: bool = True, force: bool = False) -> dict:
    """Write codes.npy / labels.npy / meta.json to `out`; returns the meta dict.

    A finished codes folder is replaced only with `force` (see ctfgen.outputs); an interrupted one is redone.
    """
    if len(dataset) == 0:
        raise CtfgenError("the dataset is empty: nothing to extract")
    output = open_output(out, CODES_KIND, force=force)
    out = output.path
    cfg = tokenizer.config
    views = ["original", "hflip"] if hflip_copies else ["original"]
    n = len(dataset)
    grid = [cfg.grid_size, cfg.grid_size]
    tmp = out / ".codes.npy.tmp"
    codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=code_dtype(cfg.codebook_size), shape=(len(views) * n, *grid))
    labels = np.empty(len(views) * n, dtype=np.int64)
    tokenizer = tokenizer.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    start = 0
    for x, y in tqdm(loader, desc="extract", disable=not progress, unit="batch"):
        x = x.to(device)
        if list(x.shape[-2:]) != [cfg.image_size, cfg.image_size]:
            raise CtfgenError(f"images are {tuple(x.shape[-2:])} but the tokenizer was trained at {cfg.image_size} px")
        for v, view in enumerate(views):
            rows = slice(v * n + start, v * n + start + len(x))
            codes[rows] = tokenizer.encode(x.flip(-1) if view == "hflip" else x).cpu().numpy()
            labels[rows] = y.numpy()
        start += len(x)
    codes.flush()
    del codes
    os.replace(tmp, out / "codes.npy")
    np.save(out / "labels.npy", labels)
    classes = getattr(dataset, "classes", None)
    meta = {"kind": CODES_KIND, "count": int(len(labels)), "grid": grid, "codebook_size": cfg.codebook_size,
            "tokenizer_fingerprint": tokenizer.fingerprint, "dataset": dataset_name, "split": split,
            "views": views, "holdout": getattr(dataset, "holdout", None),
            "num_classes": len(classes) if classes else int(labels.max()) + 1,
            "classes": list(classes) if classes else None}
    write_json(out / "meta.json", meta)
    output.finish()
    return meta
