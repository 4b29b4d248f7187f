"""ctfgen.outputs: finished work is never replaced unasked, an interrupted replacement loses nothing,
unfinished work continues only when asked. Plain folders, then a real training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctfgen.artifacts import load_tensors, write_json
from ctfgen.errors import CtfgenError
from ctfgen.outputs import STATUS_NAME, folder_state, is_finished, open_output, plan_output
from ctfgen.training import Trainer, train
from test_cli_errors import tree_digest
from test_training import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def finished(folder: Path, kind: str = "thing", content: str = "old") -> Path:
    open_output(folder, kind).write(lambda f: (f / "payload.txt").write_text(content))
    return folder


def test_a_new_folder_is_written_in_place_and_marked_finished(tmp_path: Path) -> None:
    out = plan_output(tmp_path / "a", "thing")
    assert out.path == tmp_path / "a" and not out.resumed and not (tmp_path / "a").exists()  # planning writes nothing
    out.open()
    assert folder_state(tmp_path / "a") == ("thing", False)
    out.finish()
    assert folder_state(tmp_path / "a") == ("thing", True) and is_finished(tmp_path / "a", "thing")
    assert not is_finished(tmp_path / "a", "other") and not is_finished(tmp_path / "missing", "thing")


def test_a_finished_folder_is_replaced_only_with_force_and_only_when_complete(tmp_path: Path) -> None:
    folder = finished(tmp_path / "a")
    before = tree_digest(tmp_path)
    with pytest.raises(CtfgenError, match="finished thing folder; --force replaces it"):
        plan_output(folder, "thing")
    out = plan_output(folder, "thing", force=True).open()
    assert out.path == tmp_path / ".a.replacing"
    (out.path / "payload.txt").write_text("new")
    assert (folder / "payload.txt").read_text() == "old"  # untouched until the new one is complete
    # killed here: the next --force starts the replacement over, the old folder is still whole
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith(".a.replacing")} == before
    out = plan_output(folder, "thing", force=True).open()
    assert list(out.path.iterdir()) == [out.path / STATUS_NAME]
    (out.path / "payload.txt").write_text("new")
    out.finish()
    assert (folder / "payload.txt").read_text() == "new" and is_finished(folder, "thing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging or old copy left


def test_force_with_resume_continues_an_interrupted_replacement(tmp_path: Path) -> None:
    folder = finished(tmp_path / "a")
    out = plan_output(folder, "thing", force=True, resumable=True).open()
    (out.path / "checkpoint.pt").write_text("step 3")
    again = plan_output(folder, "thing", force=True, resume=True, resumable=True).open()
    assert again.path == out.path and again.resumed and (again.path / "checkpoint.pt").read_text() == "step 3"


def test_a_swap_cut_between_its_renames_is_completed(tmp_path: Path) -> None:
    folder = finished(tmp_path / "a")
    finished(tmp_path / "b", content="new").rename(tmp_path / ".a.replacing")  # a finished replacement ...
    folder.rename(tmp_path / ".a.old")  # ... and a kill after the first rename of the swap
    plan_output(folder, "thing", force=True)
    assert (folder / "payload.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_folder_moved_away_without_a_finished_replacement_comes_back(tmp_path: Path) -> None:
    folder = finished(tmp_path / "a")
    folder.rename(tmp_path / ".a.old")
    with pytest.raises(CtfgenError, match="finished"):  # put back first, then refused as usual
        plan_output(folder, "thing")
    assert (folder / "payload.txt").read_text() == "old" and not (tmp_path / ".a.old").exists()


def test_unfinished_work_continues_only_when_asked(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    open_output(folder, "thing", resumable=True)
    (folder / "checkpoint.pt").write_text("step 3")
    (folder / ".checkpoint.pt.x1y2.tmp").write_text("half a checkpoint")  # a kill mid-write
    with pytest.raises(CtfgenError, match="unfinished thing run; --resume continues it, --force starts it over"):
        plan_output(folder, "thing", resumable=True)
    out = open_output(folder, "thing", resume=True, resumable=True)
    assert out.resumed and (folder / "checkpoint.pt").is_file() and not list(folder.glob(".*.tmp"))
    out = open_output(folder, "thing", force=True, resumable=True)
    assert not out.resumed and [p.name for p in folder.iterdir()] == [STATUS_NAME]
    # a stage that cannot resume simply starts again
    (folder / "part.npy").write_text("half")
    out = open_output(folder, "thing")
    assert not out.resumed and not (folder / "part.npy").exists()


def test_a_folder_another_running_process_writes_is_refused(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        def written_by(folder: Path, pid: int, command: str) -> None:
            status = json.loads((folder / STATUS_NAME).read_text())
            write_json(folder / STATUS_NAME, {**status, "pid": pid, "command": command})

        folder = tmp_path / "a"
        out = open_output(folder, "thing", resumable=True)
        assert json.loads((folder / STATUS_NAME).read_text())["pid"] == os.getpid()
        plan_output(folder, "thing", resume=True, resumable=True)  # a process may reopen its own folder
        written_by(folder, other.pid, " ".join(other.args[1:]))
        for flags in ({"resume": True}, {"force": True}, {}):
            with pytest.raises(CtfgenError, match=rf"being written by another running ctfgen process \(pid {other.pid}"):
                plan_output(folder, "thing", resumable=True, **flags)
        written_by(folder, other.pid, "ctfgen train --out a")  # the pid now runs something else: reused, not busy
        plan_output(folder, "thing", resume=True, resumable=True)
        out.finish()  # finished: --force replaces it, unless another process is writing the replacement
        staging = plan_output(folder, "thing", force=True).open().path
        written_by(staging, other.pid, " ".join(other.args[1:]))
        with pytest.raises(CtfgenError, match="being written by another running"):
            plan_output(folder, "thing", force=True)
    finally:
        other.kill()
        other.wait()
    assert plan_output(folder, "thing", force=True).path == staging  # a killed writer's work is taken over
    assert plan_output(tmp_path / "a", "thing", force=True, resume=True, resumable=True).path == staging


def test_older_folders_are_recognised_by_their_config(tmp_path: Path) -> None:
    write_json(tmp_path / "tok" / "config.json", {"kind": "vq-tokenizer"})
    assert folder_state(tmp_path / "tok") == ("vq-tokenizer", True)
    write_json(tmp_path / "bench" / "bench.json", {})
    assert folder_state(tmp_path / "bench") == ("bench", True)
    (tmp_path / "demo" / "tokenizer").mkdir(parents=True)
    assert folder_state(tmp_path / "demo") == ("run", False)
    with pytest.raises(CtfgenError, match="holds a vq-tokenizer folder, not a transformer folder"):
        plan_output(tmp_path / "tok", "transformer", force=True)


def test_an_interrupted_forced_retraining_keeps_the_finished_model(data, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "model"
    train(make_cfg(data, out, "baseline", steps=3), progress=False)
    before = tree_digest(out)
    plain_step = Trainer.train_step

    def crash_at_step_2(self):
        if self.step == 2:
            raise RuntimeError("power cut")
        return plain_step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_2)
    with pytest.raises(RuntimeError, match="power cut"):
        train(make_cfg(data, out, "baseline", steps=3, seed=1, save_every=1), force=True, progress=False)
    assert tree_digest(out) == before
    monkeypatch.setattr(Trainer, "train_step", plain_step)
    train(make_cfg(data, out, "baseline", steps=3, seed=1), force=True, progress=False)
    fresh = train(make_cfg(data, tmp_path / "fresh", "baseline", steps=3, seed=1), progress=False)
    assert json.loads((out / "train_info.json").read_text())["steps"] == fresh["steps"] == 3
    new, ref = load_tensors(out / "model.safetensors"), load_tensors(tmp_path / "fresh" / "model.safetensors")
    assert all(torch.equal(new[k], ref[k]) for k in ref)  # the replacement is a run of its own, from scratch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "model"]
