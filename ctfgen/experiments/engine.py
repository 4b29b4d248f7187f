"""Experiments as data: cells, a grid of them, and one small engine that runs what is not done yet.

A cell is a frozen dataclass holding everything that changes its numbers (data, sizes, budget, seed, ...);
its key is a hash of those values. `run_grid` appends one JSON line per finished cell to a results file
and skips every cell whose key is already there (read again before each cell, so a cell that another
process on the same file finished meanwhile is skipped too), so an interrupted grid resumes where it
stopped and a finished cell is never recomputed. Reports read the file (`Results.load`) and run nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar


log = logging.getLogger(__name__)
C = TypeVar("C")


LATE = {"late": True}  # metadata of a nested dataclass's field added after cells were recorded (see cell_key)


def cell_key(cell: Any) -> str:
    """A stable hash of the cell's type and of its values that differ from the field defaults, so that a
    field added later with a default leaves the keys of earlier cells (and their results) as they were.
    Inside a nested dataclass (a cell's scoring) every field counts, except those marked `LATE` that hold
    their default: they were added after cells that spelled out all the others."""
    text = json.dumps({"type": type(cell).__name__, **_key_values(cell, top=True)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key_values(obj: Any, top: bool) -> dict[str, Any]:
    values, plain = {}, dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if (top or f.metadata.get("late")) and f.default is not dataclasses.MISSING and value == f.default:
            continue
        values[f.name] = _key_values(value, top=False) if dataclasses.is_dataclass(value) else plain[f.name]
    return values


class Results:
    """A JSON-lines file of finished cells: {"key", "cell", "result", "wall_s", "date"} per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self, quiet: bool = False) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write: that cell runs again
                if not quiet:
                    log.warning("%s: skipping an incomplete line", self.path)
        return records

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # the line a kill cut short stays alone on its line
                    f.write(b"\n")
            f.write((json.dumps(record, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def run_grid(cells: Iterable[C], run: Callable[[C], dict[str, Any]], results: Results) -> list[dict[str, Any]]:
    """Run every cell not yet in `results` (in order), appending each as it finishes; returns the records
    of all the given cells, old and new."""
    cells = list(cells)
    done = {r["key"]: r for r in results.load()}
    for i, cell in enumerate(cells, 1):
        key = cell_key(cell)
        if key not in done:  # another process on the same folder may have finished it since
            done.update((r["key"], r) for r in results.load(quiet=True))
        if key in done:
            log.info("[%d/%d] %s: done earlier", i, len(cells), key)
            continue
        log.info("[%d/%d] %s: %s", i, len(cells), key, cell)
        start = time.perf_counter()
        record = {"key": key, "cell": dataclasses.asdict(cell), "result": run(cell),
                  "wall_s": round(time.perf_counter() - start, 1),
                  "date": datetime.datetime.now().isoformat(timespec="seconds")}
        results.append(record)
        done[key] = record
    return [done[cell_key(c)] for c in cells]

