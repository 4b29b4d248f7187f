"""`ctfgen sample --npz`: many samples into one uint8 .npz in ADM's layout (`arr_0` [N,H,W,C], `labels` [N]).

Images go batch by batch into a memory-mapped .npy beside the output, so memory stays flat whatever N
is; at the end rank 0 stores it uncompressed in the .npz (a streamed copy) and the .npy goes away.
The labels are cut into fixed chunks of `batch_size`, and chunk c is sampled with its own generator
seeded from (seed, c). Under torchrun rank r samples chunks r, r + W, r + 2W, ... and writes their rows,
so every image is computed in the same batch with the same seed whatever the number of processes: the
file is the same on 1 CPU process, N CPU processes (gloo) or N GPUs of one kind (it does depend on
--batch-size).
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from .artifacts import atomic_path
from .data.transforms import to_uint8
from .distributed import DistInfo, barrier


def chunk_seed(seed: int, chunk: int) -> int:
    """A distinct 63-bit seed per (seed, chunk), so neighbouring seeds do not share chunks' streams."""
    return (seed * 0x9E3779B97F4A7C15 + chunk * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63)


def write_sample_npz(pipe: Any, labels: torch.Tensor, path: str | Path, settings: dict[str, Any], batch_size: int,
                     seed: int, dist: DistInfo, progress: bool = True) -> Path:
    """Sample one image per label into `path` (every rank calls this; rank 0 writes the .npz). `pipe` is a
    CTFPipeline or BaselinePipeline (ctfgen.pipeline, which calls this)."""
    path = Path(path)
    n, size, channels = len(labels), pipe.tokenizer.config.image_size, pipe.tokenizer.config.in_channels
    rows = path.parent / f".{path.name}.arr_0.npy"
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        open_memmap(rows, mode="w+", dtype=np.uint8, shape=(n, size, size, channels)).flush()
    barrier(dist)
    images = open_memmap(rows, mode="r+")
    chunks = range(dist.rank, math.ceil(n / batch_size), dist.world_size)
    for c in tqdm(chunks, desc="sampling", unit="batch", disable=not (progress and dist.is_main)):
        part = slice(c * batch_size, min(n, (c + 1) * batch_size))
        out = pipe(labels[part], **settings, batch_size=batch_size, progress=False,
                   generator=torch.Generator(device=pipe.device).manual_seed(chunk_seed(seed, c)))
        images[part] = to_uint8(out.pixels)
    images.flush()
    del images
    barrier(dist)
    if dist.is_main:
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(rows, "arr_0.npy")  # streamed from disk
            buffer = io.BytesIO()
            np.save(buffer, labels.numpy().astype(np.int64))
            zf.writestr("labels.npy", buffer.getvalue())
        rows.unlink()
    barrier(dist)
    return path
