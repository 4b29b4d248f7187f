"""Artifact folders: a `config.json` that rebuilds a module plus safetensors weights.

Every stage of the pipeline writes one folder through these helpers, so every
folder is readable without pickle and every write is atomic (a crash during a
save leaves the previous file intact).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import CtfgenError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ArtifactError(CtfgenError):
    """An artifact folder is missing, malformed or does not fit with another one."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file `.NAME.*.tmp` beside `path` for the block to write; it replaces `path` only when the
    block ends without error, so a crash mid-write leaves the previous file intact (and ctfgen.outputs
    removes the leftover the next time the folder is opened)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None


@contextmanager
def read_npz(path: str | Path, what: str = "", error: type[CtfgenError] = CtfgenError) -> Iterator[Any]:
    """An .npz opened without pickles. A missing, foreign or damaged file, or an array that fails to read inside
    the block, is one `error` naming the file (`what` names the flag); the block's own CtfgenErrors pass."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}{path} not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            yield f
    except CtfgenError:
        raise
    except Exception as e:  # zipfile, numpy and pickle-refusal errors of several types
        why = f"{type(e).__name__}: {e}" if zipfile.is_zipfile(path) else "not a zip archive of arrays"
        raise error(f"{what}{path} is not a readable .npz ({why})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically save a flat dict of tensors as safetensors."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types on a damaged header
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None


def fingerprint_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_artifact(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write weights first, then the config: a folder with a config.json is complete."""
    folder = Path(folder)
    save_tensors(folder / WEIGHTS_NAME, tensors)
    write_json(folder / CONFIG_NAME, config)


def load_artifact(folder: str | Path, kind: str, device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a folder written by `save_artifact`, checking that it holds a `kind` artifact."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder (expected a ctfgen {kind} folder)")
    config = read_json(folder / CONFIG_NAME)
    if config.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {config.get('kind')!r} artifact, expected {kind!r}")
    return config, load_tensors(folder / WEIGHTS_NAME, device)
