"""Output folders: every command that writes a folder opens it here, so finished work is never lost.

A folder made by ctfgen holds `status.json`: its kind ("vq-tokenizer", "transformer", "codes", ...)
and whether the stage finished. `plan_output` decides, before any work, what a command may do with
the folder it was given:

| the folder holds                | nothing asked     | --resume               | --force                      |
|---------------------------------|-------------------|------------------------|------------------------------|
| nothing (missing or empty)      | write it          | write it               | write it                     |
| an unfinished one of this kind  | refused if it can | continue it            | start it over                |
|                                 | be resumed, else  |                        |                              |
|                                 | started over      |                        |                              |
| a finished one of this kind     | refused           | continue its training  | replace it: write beside it, |
|                                 |                   | (stages that resume)   | swap in at the end           |
| another kind, or foreign files  | refused           | refused                | refused                      |
| one another process is writing  | refused           | refused                | refused                      |

A replacement is written to `.NAME.replacing` beside the folder and swapped in only when complete,
so an interrupted `--force` run leaves the old artifact as it was (`--force --resume` continues the
interrupted replacement). `status.json` also names the process that writes the folder (pid and host):
while it runs, a second command on the same folder is refused rather than left to write the same files.
Folders written before `status.json` existed are recognised by the kind
in their `config.json` / `meta.json` and count as finished.

`plan_output` writes nothing (except to complete a swap a kill cut short, which tolerates a race), so
every process of a `torchrun` job can call it before the processes meet; `Output.open` and
`Output.finish` write and run in one process.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from .artifacts import CONFIG_NAME, read_json, write_json
from .errors import CtfgenError

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS_NAME = "status.json"
RUN_KIND = "run"  # a run folder: one sub-folder per stage (`ctfgen demo`, `import-llamagen --vq --gpt`)


def folder_state(folder: Path) -> tuple[str | None, bool]:
    """(kind, finished) of a ctfgen folder; (None, False) when it holds no ctfgen marker."""
    status = folder / STATUS_NAME
    if status.is_file():
        record = read_json(status)
        return record.get("kind"), bool(record.get("finished"))
    for marker in (CONFIG_NAME, "meta.json"):  # folders from before status.json: complete once these exist
        if (folder / marker).is_file():
            kind = _kind_in(folder / marker)
            if kind:
                return kind, True
    for marker, kind in _OLD_REPORTS.items():
        if (folder / marker).is_file():
            return kind, True
    if (folder / "tokenizer").is_dir():
        return RUN_KIND, False
    return None, False


# report folders from before status.json, recognised by the file they end with
_OLD_REPORTS = {"bench.json": "bench", "redundancy.json": "redundancy-report"}


def _kind_in(path: Path) -> str | None:
    try:
        kind = read_json(path).get("kind")
    except (CtfgenError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def is_finished(folder: str | Path, kind: str) -> bool:
    found, finished = folder_state(Path(folder)) if Path(folder).is_dir() else (None, False)
    return found == kind and finished


def _is_empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def check_writable(folder: Path, target: Path | None = None) -> None:
    """CtfgenError unless `folder` can be created (if missing) and written; `target` names what will be written."""
    target = target or folder
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CtfgenError(f"cannot write {target}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise CtfgenError(f"cannot write {target}: {probe} is not writable ({e.strerror})") from None


def check_output_file(path: str | Path) -> Path:
    """A file a command will write (a grid PNG, metrics JSON): its folder must be writable, it must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise CtfgenError(f"{path} is a folder; give a file name")
    check_writable(path.parent, path)
    return path


@dataclass
class Output:
    final: Path  # the folder the user named
    path: Path  # where this run writes: `final`, or `.NAME.replacing` beside it
    kind: str
    resumed: bool  # continue the work already at `path`
    clear: bool  # remove what is at `path` first (an abandoned run)

    @property
    def replacing(self) -> bool:
        return self.path != self.final

    def open(self) -> Output:
        """Create the folder, drop what a kill mid-write left (`.NAME.*.tmp`), record the stage as running."""
        if self.clear and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink()
        write_json(self.path / STATUS_NAME, {"kind": self.kind, "finished": False, "command": " ".join(sys.argv),
                                             "started": _now(), "pid": os.getpid(), "host": socket.gethostname()})
        return self

    def write(self, save: Callable[[Path], T]) -> T:
        """Open, write everything with `save(folder)`, finish: for stages that write in one go."""
        result = save(self.open().path)
        self.finish()
        return result

    def finish(self) -> None:
        """Mark the stage complete; a replacement takes the old folder's place only now."""
        status = read_json(self.path / STATUS_NAME)
        write_json(self.path / STATUS_NAME, {**status, "finished": True, "ended": _now()})
        if self.replacing:
            old = _old(self.final)
            os.rename(self.final, old)
            os.rename(self.path, self.final)
            shutil.rmtree(old)
            log.info("%s: the %s it held was replaced (anything made from the old one no longer matches it)",
                     self.final, self.kind)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _staging(final: Path) -> Path:
    return final.parent / f".{final.name}.replacing"


def _old(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def _recover_swap(final: Path) -> None:
    """Complete a swap that a kill cut between its two renames (the replacement was finished by then)."""
    old, staging = _old(final), _staging(final)
    if not old.is_dir():
        return
    try:
        if not final.exists():
            replacement_done = staging.is_dir() and folder_state(staging)[1]
            os.rename(staging if replacement_done else old, final)
        shutil.rmtree(old, ignore_errors=True)
    except FileNotFoundError:  # another process of the same job got there first
        pass


def _writer(folder: Path) -> str | None:
    """Another live process on this machine that opened `folder` and has not finished it, described; else None (a
    killed run's pid is gone, another machine's cannot be checked, and a process may reopen its own folder)."""
    if not (folder / STATUS_NAME).is_file():
        return None
    record = read_json(folder / STATUS_NAME)
    pid, command = record.get("pid"), record.get("command", "")
    here = record.get("host") == socket.gethostname()
    if record.get("finished") or not isinstance(pid, int) or pid == os.getpid() or not here:
        return None
    return f"pid {pid}, `{command}`, started {record.get('started', '?')}" if _running(pid, command) else None


def _running(pid: int, command: str) -> bool:
    """Whether process `pid` exists and, where /proc tells, still runs `command` (a pid can be reused)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists (another user's)
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return True  # no /proc here: the pid alone says it
    return cmdline.endswith(command)


def check_not_busy(folder: Path) -> None:
    """Refuses a folder another running ctfgen process writes (to write it, or to read it whole)."""
    busy = _writer(folder)
    if busy:
        raise CtfgenError(f"{folder} is being written by another running ctfgen process ({busy}); wait for it to end "
                          "or stop it first")


def _describe(kind: str) -> str:
    return "a run folder" if kind == RUN_KIND else f"a {kind} folder"


def plan_output(folder: str | Path, kind: str, *, force: bool = False, resume: bool = False,
                resumable: bool = False) -> Output:
    """Decide what to do with `folder` (see the module's table); raises CtfgenError when it must stay untouched.

    resumable: the stage can continue from what an unfinished run left (it has checkpoints).
    """
    final = Path(folder)
    if final.exists() and not final.is_dir():
        raise CtfgenError(f"{final} is a file; give a folder to write the {kind} to")
    _recover_swap(final)
    found, finished = folder_state(final) if final.is_dir() else (None, False)
    if found is None and not _is_empty(final):
        raise CtfgenError(f"{final} is not empty and holds no ctfgen output; choose a new or empty folder")
    if found not in (None, kind):
        raise CtfgenError(f"{final} holds {_describe(found)}, not {_describe(kind)}; choose another folder "
                          "(--force replaces only a folder of the same kind)")
    if found is None:
        check_writable(final)
        return Output(final, final, kind, resumed=False, clear=False)
    check_not_busy(final)
    if finished and force:
        staging = _staging(final)
        check_not_busy(staging)  # a replacement another process is writing
        check_writable(final.parent, final)
        keep = resume and resumable and staging.is_dir() and not _is_empty(staging)
        return Output(final, staging, kind, resumed=keep, clear=not keep)
    if finished and resume and resumable:  # e.g. train a finished model for more steps
        check_writable(final)
        return Output(final, final, kind, resumed=True, clear=False)
    if finished:
        more = "; --resume continues its training" if resumable else ""
        raise CtfgenError(f"{final} holds a finished {kind} folder; --force replaces it (the old one stays until the "
                          f"new one is complete){more}, or choose another folder")
    # unfinished, of this kind
    check_writable(final)
    has_work = any(p.name != STATUS_NAME for p in final.iterdir())
    if resume and resumable:
        return Output(final, final, kind, resumed=has_work, clear=False)
    if has_work and resumable and not force:
        raise CtfgenError(f"{final} holds an unfinished {kind} run; --resume continues it, --force starts it over")
    if has_work:
        log.info("%s holds an unfinished %s; starting it over", final, kind)
    return Output(final, final, kind, resumed=False, clear=True)


def open_output(folder: str | Path, kind: str, *, force: bool = False, resume: bool = False,
                resumable: bool = False) -> Output:
    """`plan_output` and `Output.open` in one call, for stages that run in one process."""
    return plan_output(folder, kind, force=force, resume=resume, resumable=resumable).open()


def open_run_folder(folder: str | Path) -> Path:
    """A run folder holds one folder per stage; it may exist already (stages decide about their own folders)."""
    run = Path(folder)
    if run.exists() and not run.is_dir():
        raise CtfgenError(f"{run} is a file; give a folder for the run")
    found, _ = folder_state(run) if run.is_dir() else (None, False)
    if found is None and not _is_empty(run):
        raise CtfgenError(f"{run} is not empty and is not a ctfgen run folder; choose a new or empty folder")
    if found not in (None, RUN_KIND):
        raise CtfgenError(f"{run} holds {_describe(found)}, not a run folder; choose another folder")
    check_writable(run)
    run.mkdir(parents=True, exist_ok=True)
    if not (run / STATUS_NAME).is_file():
        write_json(run / STATUS_NAME, {"kind": RUN_KIND, "started": _now()})
    return run


def add_output_flags(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    """--force (and --resume for stages with checkpoints), with the meaning ctfgen.outputs gives them."""
    p.add_argument("--force", action="store_true",
                   help="replace a finished output folder (the old one stays until the new one is complete)")
    if resumable:
        p.add_argument("--resume", action="store_true",
                       help="continue an unfinished run from its checkpoint (or a finished one to more steps)")
