"""What every training loop needs: device choice, learning-rate schedule, checkpoints, RNG state."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import pickle
import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .artifacts import ArtifactError, atomic_path
from .errors import CtfgenError

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CtfgenError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CtfgenError("--device cuda was asked for but CUDA is not available")
    return device


def device_arg(name: str) -> torch.device:
    """`pick_device` as an argparse `type=` (the scripts' --device): a bad name is the parser's one error line."""
    try:
        return pick_device(name)
    except CtfgenError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def wall_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), the work it queued on a GPU included (the benchmarks' one timer)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, base: float, warmup: int, total: int, decay: str = "cosine", final_ratio: float = 0.0) -> float:
    """Linear warmup, then constant or cosine decay to `final_ratio * base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return base
    if decay != "cosine":
        raise CtfgenError(f"unknown lr decay {decay!r} (use 'none' or 'cosine')")
    t = min(1.0, (step - warmup) / (total - warmup))
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.astype(np.int64).tolist(), pos, has_gauss, gauss],
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():  # this process's device only: a run may resume on another number of GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)  # older checkpoints: all devices


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint of tensors and plain Python values (loadable with weights_only),
    straight to the file: no copy of the whole checkpoint in memory."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, memory-mapped rather than read whole."""
    return load_torch_file(path, device, mmap=True)


def load_torch_file(path: str | Path, device: str | torch.device = "cpu", allowed: tuple[type, ...] = (),
                    mmap: bool = False) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, plus the classes in `allowed`;
    a file that would run any other pickled code is refused with a one-line ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found")
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with safe(list(allowed)) if safe and allowed else contextlib.nullcontext():
            return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ArtifactError(f"{path} holds the Python object {found.group(1)}; refusing to unpickle it (ctfgen "
                                "loads weights only, with weights_only=True; save the state dict alone)") from None
        raise ArtifactError(f"{path} is not a torch checkpoint (its pickle data cannot be read)") from None
    except Exception as e:  # a truncated or foreign file: torch raises several types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path} cannot be read as a torch checkpoint: {first_line}") from None


class StopRequest:
    """SIGTERM or Ctrl-C asks a training loop to stop after its current step; a second one stops at once.

    Use it around the loop (`with StopRequest() as stop:`) and look at `stop.signum` after each step.
    Handlers can only be installed in the main thread; elsewhere nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object = None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once, without one)",
                    signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
