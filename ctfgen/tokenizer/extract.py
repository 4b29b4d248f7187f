"""Encode a dataset once with a frozen tokenizer into the code artifact (see ctfgen.data.codes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..artifacts import write_json
from ..data.codes import CODES_KIND, code_dtype
from ..data.datasets import dataset_labels
from ..data.transforms import VIEWS
from ..errors import CtfgenError
from ..outputs import plan_output
from ..distributed import DistInfo, barrier
from .model import VQTokenizer


@torch.no_grad()
def extract_codes(tokenizer: VQTokenizer, dataset: Dataset, out: str | Path, *, views: str = "none",
                  batch_size: int = 256, num_workers: int = 0, dataset_name: str = "", split: str = "",
                  device: str | torch.device = "cpu", progress: bool = True, force: bool = False,
                  dist: DistInfo | None = None) -> dict:
    """Write codes.npy / labels.npy / meta.json to `out`; returns the meta dict (on rank 0; {} elsewhere).

    With `views` ("flip", "ten-crop"; the dataset built with the same `views`, its items float[views, C, H, W])
    view v of item i is stored at row v * items + i; training draws one view per item. Under torchrun every
    rank calls this: rank 0 creates the memory-mapped array, each rank encodes its contiguous share of the
    items and writes their rows, and after a barrier rank 0 writes the labels and meta.json (the result
    does not depend on the number of processes). A finished codes folder is replaced only with `force` (see ctfgen.outputs); an
    interrupted one is redone.
    """
    dist = dist or DistInfo(0, 1, 0, torch.device(device), owns_group=False)
    n = len(dataset)
    if n == 0:
        raise CtfgenError("the dataset is empty: nothing to extract")
    output = plan_output(out, CODES_KIND, force=force)
    barrier(dist)  # every process reads the folder before rank 0 writes to it
    cfg = tokenizer.config
    if views not in VIEWS:
        raise CtfgenError(f"views must be one of {sorted(VIEWS)}, got {views!r}")
    names = VIEWS[views]
    grid = [cfg.grid_size, cfg.grid_size]
    tmp = output.path / ".codes.npy.tmp"
    if dist.is_main:
        output.open()
        np.lib.format.open_memmap(tmp, mode="w+", dtype=code_dtype(cfg.codebook_size),
                                  shape=(len(names) * n, *grid)).flush()
    barrier(dist)
    codes = np.lib.format.open_memmap(tmp, mode="r+")
    share = range(n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size)
    tokenizer = tokenizer.to(device).eval()
    loader = DataLoader(Subset(dataset, share), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    start = share.start
    for x, _ in tqdm(loader, desc="extract", disable=not (progress and dist.is_main), unit="batch"):
        x = x.to(device, non_blocking=True)
        if list(x.shape[-2:]) != [cfg.image_size, cfg.image_size]:
            raise CtfgenError(f"images are {tuple(x.shape[-2:])} but the tokenizer was trained at {cfg.image_size} px")
        if x.dim() != (4 if views == "none" else 5) or (views != "none" and x.shape[1] != len(names)):
            raise CtfgenError(f"the dataset's items are {tuple(x.shape[1:])}; with views={views!r} build it with the "
                              "same views (build_dataset(..., views=...))")
        x = x.view(len(x), len(names), *x.shape[-3:])  # a plain item is one view
        for v in range(len(names)):
            codes[v * n + start:v * n + start + len(x)] = tokenizer.encode(x[:, v]).cpu().numpy()
        start += len(x)
    codes.flush()
    del codes
    barrier(dist)
    if not dist.is_main:
        return {}
    os.replace(tmp, output.path / "codes.npy")
    labels = dataset_labels(dataset)
    np.save(output.path / "labels.npy", np.tile(labels, len(names)))
    classes = getattr(dataset, "classes", None)
    meta = {"kind": CODES_KIND, "count": len(names) * n, "items": n, "grid": grid, "codebook_size": cfg.codebook_size,
            "tokenizer_fingerprint": tokenizer.fingerprint, "dataset": dataset_name, "split": split,
            "views": names, "holdout": getattr(dataset, "holdout", None),
            "num_classes": len(classes) if classes else int(labels.max()) + 1,
            "classes": list(classes) if classes else None}
    write_json(output.path / "meta.json", meta)
    output.finish()
    return meta
