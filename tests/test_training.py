"""Tests for ctfgen.training: learning, DDP, exact resume, interruption, EMA, accumulation, bad input.

Tiny models on synthetic code folders (4x4 grid, V=32, K=8, 4 classes), all on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ctfgen.artifacts import ArtifactError, load_tensors
from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.runtime import load_checkpoint
from ctfgen.training import CHECKPOINT_NAME, INFO_NAME, Trainer, TrainConfig, train
from ctfgen.errors import Stopped
from ctfgen.distributed import setup_distributed, teardown_distributed
from ctfgen.transformer import load_model, preset_config, save_model, build_model

V, K, GRID, CLASSES = 32, 8, 4, 4
NO_DROPOUT = dict(dropout=0.0, class_dropout=0.0)


def write_codes(folder: Path, n: int = 64, fingerprint: str = "tok-a", seed: int = 0,
                num_classes: int = CLASSES, max_label: int = CLASSES - 1) -> Path:
    """A learnable code set in the CodeDataset format: each class draws a fixed pattern, 20% of tokens random."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max_label + 1, n)
    t = np.arange(GRID * GRID)
    codes = (7 * labels[:, None] + 3 * t[None, :]) % V
    noise = rng.random(codes.shape) < 0.2
    codes = np.where(noise, rng.integers(0, V, codes.shape), codes)
    folder.mkdir(parents=True)
    np.save(folder / "codes.npy", codes.reshape(n, GRID, GRID).astype(np.int16))
    np.save(folder / "labels.npy", labels.astype(np.int64))
    meta = {"kind": "codes", "count": n, "grid": [GRID, GRID], "codebook_size": V, "tokenizer_fingerprint": fingerprint,
            "dataset": "synthetic", "split": "train", "views": ["original"], "num_classes": num_classes, "classes": None}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def write_hierarchy(folder: Path, k: int = K, fingerprint: str = "tok-a") -> Path:
    save_hierarchy(Hierarchy(torch.arange(V) % k, k, tokenizer_fingerprint=fingerprint), folder)
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_cfg(data: dict[str, Path], out: Path, role: str = "coarse", **kw) -> TrainConfig:
    base = dict(role=role, size="tiny", codes=str(data["codes"]), hierarchy=str(data["hierarchy"]), out=str(out),
                steps=4, batch_size=8, lr=3e-3, save_every=100, log_every=2, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_tensors(out / "model.safetensors")


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------- learning

@pytest.mark.parametrize("role", ["coarse", "baseline", "refiner"])
def test_loss_decreases_and_artifacts_are_written(data, tmp_path, role):
    cfg = make_cfg(data, tmp_path, role, steps=40, batch_size=16, log_every=5, val_codes=str(data["val"]), val_limit=20)
    info = train(cfg, progress=False)
    head = {"coarse": K, "baseline": V, "refiner": V // K}[role]  # the refiner: its cluster's members (the default)
    # The head starts at zero, so the first loss is exactly log(head size); the refiner's choice among 4
    # members has less to learn in 40 steps than a choice among K or V.
    assert info["final_train_loss"] < (0.85 if role == "refiner" else 0.75) * math.log(head)
    assert info["held_out"]["items"] == 20 and info["val_loss"] < math.log(head)
    saved = json.loads((tmp_path / INFO_NAME).read_text())
    assert saved["role"] == role and saved["codes_fingerprint"] == "tok-a" and saved["V"] == V
    assert saved["K"] == K and saved["hierarchy_fingerprint"] is not None and saved["tokens_per_s"] > 0
    model = load_model(tmp_path)
    assert (model.config.vocab_size, model.config.head_size) == {"coarse": (K, K), "baseline": (V, V), "refiner": (K, V)}[role]
    assert list((tmp_path / "logs").iterdir()), "TensorBoard event file"
    if role == "refiner":
        held = info["held_out"]
        # The mask can only remove wrong candidates.
        assert held["accuracy_masked"] >= held["accuracy"] and held["loss_masked"] <= held["loss"]
    if role == "baseline":  # trained with --hierarchy: the held-out loss comes split by stage
        held = info["held_out"]
        assert 0 < held["loss_coarse"] < held["loss"]
        assert held["loss_coarse"] + held["loss_within"] == pytest.approx(held["loss"])


def test_refiner_mask_trains_with_the_masked_objective(data, tmp_path):
    info = train(make_cfg(data, tmp_path, "refiner", steps=2, refiner_mask=True, val_codes=str(data["val"])), progress=False)
    assert info["refiner_mask"] is True and info["val_loss"] == info["held_out"]["loss_masked"]
    # With the mask, only the 4 members of a cluster compete: the first loss is log(4), not log(32).
    assert info["final_train_loss"] < math.log(V // K) + 0.1


@pytest.mark.parametrize("per_cluster", [False, True])
def test_training_within_clusters_scores_only_the_members(data, tmp_path, monkeypatch, per_cluster):
    """The refiner trained within clusters computes logits for its cluster's members only (M head rows, not
    V): the same loss and gradients as masking all V logits, in clusters of unequal size, whether the rows
    are gathered for each position or multiplied once per cluster."""
    import torch.nn.functional as F
    from ctfgen.transformer import cluster_members, mask_to_clusters
    from ctfgen.transformer import model as transformer_model

    monkeypatch.setattr(transformer_model, "GROUPED_WORK", 0 if per_cluster else 2 ** 62)

    torch.manual_seed(0)
    sizes = torch.tensor([5, 2, 9, 12, 1, 1, 1, 1])
    hierarchy = Hierarchy(torch.repeat_interleave(torch.arange(K), sizes)[torch.randperm(V)], K)
    model = build_model(preset_config("tiny", role="refiner", vocab_size=K, head_size=V, num_classes=CLASSES,
                                      grid_h=GRID, grid_w=GRID))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would hide a wrong member order
    model.eval()  # no class dropout: both passes see the same labels
    fine = torch.randint(V, (6, GRID * GRID))
    coarse, labels = hierarchy.to_coarse(fine), torch.arange(6) % CLASSES
    within = cluster_members(hierarchy.member_mask)
    rank = torch.empty(V, dtype=torch.long)
    rank[within[0][within[1]]] = torch.nonzero(within[1])[:, 1]
    losses, grads = [], []
    for scored in (lambda: (mask_to_clusters(model(coarse, labels), coarse, hierarchy.member_mask), fine),
                   lambda: (model(coarse, labels, within=within), rank[fine])):
        logits, targets = scored()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    assert within[0].shape == (K, 12) and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    trainer = Trainer(make_cfg(data, tmp_path, "refiner", refiner_mask=True))  # the loop's own table: v's place
    members, codewords = trainer.within[0], torch.arange(V)  # among its cluster's members
    assert torch.equal(members[trainer.hierarchy.to_coarse(codewords), trainer.member_rank], codewords)


# ------------------------------------------------------------------------------------------ DDP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cfg: TrainConfig, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    try:
        trainer = Trainer(cfg, info)
        trainer.fit(progress=False)
        torch.save(trainer.model.state_dict(), Path(result_dir) / f"rank{rank}.pt")
    finally:
        teardown_distributed(info)


def test_ddp_two_processes_match_single_process(data, tmp_path):
    cfg = make_cfg(data, tmp_path / "ddp", "baseline", steps=3, grad_accum=2, **NO_DROPOUT)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_state_equal(rank0, rank1)
    assert_state_equal(rank0, weights(tmp_path / "ddp"))  # only rank 0 writes, and it wrote its weights
    assert json.loads((tmp_path / "ddp" / INFO_NAME).read_text())["world_size"] == 2

    train(replace(cfg, out=str(tmp_path / "single"), grad_accum=1), progress=False)
    single = weights(tmp_path / "single")
    for k in single:
        assert torch.allclose(rank0[k], single[k], atol=1e-5), k


def test_a_run_from_two_processes_resumes_in_one(data, tmp_path):
    cfg = make_cfg(data, tmp_path / "run", "baseline", steps=2, **NO_DROPOUT)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    info = train(replace(cfg, steps=4), resume=True, progress=False)
    assert info["resumed_from_step"] == 2 and info["world_size"] == 1
    train(replace(cfg, out=str(tmp_path / "single"), steps=4), progress=False)
    resumed, single = weights(tmp_path / "run"), weights(tmp_path / "single")
    for k in single:  # same batches in the same order; only the reduction order differs
        assert torch.allclose(resumed[k], single[k], atol=1e-5), k


def test_keep_every_keeps_model_snapshots(data, tmp_path):
    train(make_cfg(data, tmp_path, "coarse", steps=4, keep_every=2), progress=False)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["step2", "step4"]
    assert_state_equal(weights(tmp_path / "snapshots" / "step4"), weights(tmp_path))
    assert load_model(tmp_path / "snapshots" / "step2").config.role == "coarse"


def test_without_a_progress_bar_each_checkpoint_logs_the_step(data, tmp_path, caplog):
    with caplog.at_level("INFO", logger="ctfgen.training.loop"):
        train(make_cfg(data, tmp_path, "coarse", steps=4, save_every=2), progress=False)
    steps = [r.getMessage().split(",")[0] for r in caplog.records if r.getMessage().startswith("train coarse: step")]
    assert steps == ["train coarse: step 2/4", "train coarse: step 4/4"]


# ------------------------------------------------------------------------------ resume and stop

def test_resume_is_bit_identical(data, tmp_path):
    # Dropout, class dropout, EMA, accumulation and warmup all on: every piece of state must be restored.
    kw = dict(steps=6, dropout=0.1, class_dropout=0.1, ema_decay=0.9, grad_accum=2, warmup_steps=4)
    train(make_cfg(data, tmp_path / "once", "refiner", **kw), progress=False)
    train(make_cfg(data, tmp_path / "twice", "refiner", **{**kw, "steps": 3}), progress=False)
    info = train(make_cfg(data, tmp_path / "twice", "refiner", **kw), resume=True, progress=False)
    assert info["resumed_from_step"] == 3 and info["steps"] == 6
    once, twice = (load_checkpoint(tmp_path / d / CHECKPOINT_NAME) for d in ("once", "twice"))
    assert once["step"] == twice["step"] == 6
    assert_state_equal(once["model"], twice["model"])
    assert_state_equal(once["ema"], twice["ema"])
    assert_state_equal(weights(tmp_path / "once"), weights(tmp_path / "twice"))


def test_sigterm_saves_a_checkpoint_and_stops(data, tmp_path, monkeypatch):
    cfg = make_cfg(data, tmp_path, steps=6)
    plain_step = Trainer.train_step

    def step_then_sigterm(self):
        out = plain_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped:
        train(cfg, progress=False)
    assert (stopped.value.signum, stopped.value.step) == (signal.SIGTERM, 3)
    assert stopped.value.exit_code == 143 and stopped.value.checkpoint == str(tmp_path / CHECKPOINT_NAME)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 3
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / INFO_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is uninstalled

    monkeypatch.setattr(Trainer, "train_step", plain_step)
    info = train(cfg, resume=True, progress=False)
    assert info["resumed_from_step"] == 3 and info["steps"] == 6


def test_a_failed_checkpoint_write_keeps_the_last_good_one(data, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(data, tmp_path, steps=2))
    trainer.fit(progress=False)
    trainer.step = 99

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("ctfgen.artifacts.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 2
    assert [p.name for p in tmp_path.glob(".checkpoint*")] == []  # no half-written file left behind


# -------------------------------------------------------------------------- EMA and accumulation

def test_ema_is_kept_apart_and_is_what_gets_saved(data, tmp_path):
    trainer = Trainer(make_cfg(data, tmp_path, "baseline", steps=5, ema_decay=0.8))
    info = trainer.fit(progress=False)
    raw, ema = trainer.model.state_dict(), trainer.ema.state_dict()
    assert info["weights"] == "ema"
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert_state_equal(weights(tmp_path), ema)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert_state_equal(ckpt["model"], raw) and assert_state_equal(ckpt["ema"], ema)


def test_grad_accumulation_matches_one_big_batch(data, tmp_path):
    kw = dict(steps=3, batch_size=16, **NO_DROPOUT)
    train(make_cfg(data, tmp_path / "one", "coarse", grad_accum=1, **kw), progress=False)
    train(make_cfg(data, tmp_path / "two", "coarse", grad_accum=2, **kw), progress=False)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k


# ------------------------------------------------------------------------------------ bad input

def test_codes_and_hierarchy_from_different_tokenizers(data, tmp_path):
    other = write_hierarchy(tmp_path / "h", fingerprint="tok-b")
    with pytest.raises(ArtifactError, match="tokenizer tok-b.*tok-a"):
        Trainer(make_cfg(data, tmp_path / "out", hierarchy=str(other)))


def test_val_codes_from_another_tokenizer(data, tmp_path):
    val = write_codes(tmp_path / "val", fingerprint="tok-b")
    with pytest.raises(ArtifactError, match="--val-codes"):
        Trainer(make_cfg(data, tmp_path / "out", val_codes=str(val)))


def test_resumed_checkpoint_with_another_k(data, tmp_path):
    train(make_cfg(data, tmp_path / "out", steps=1), progress=False)
    k4 = write_hierarchy(tmp_path / "h4", k=4)
    trainer = Trainer(make_cfg(data, tmp_path / "out", steps=2, hierarchy=str(k4)))
    with pytest.raises(ArtifactError, match="vocab_size=8 but this run needs 4 \\(K of the hierarchy\\)"):
        trainer.fit(resume=True, progress=False)


def test_init_model_with_another_vocabulary(data, tmp_path):
    cfg = preset_config("tiny", role="baseline", vocab_size=16, num_classes=CLASSES, grid_h=GRID, grid_w=GRID)
    save_model(build_model(cfg), tmp_path / "init")
    with pytest.raises(ArtifactError, match="vocab_size=16 but this run needs 32 \\(V of the codes"):
        Trainer(make_cfg(data, tmp_path / "out", "baseline", init=str(tmp_path / "init")))


def test_init_model_that_fits_is_used(data, tmp_path):
    cfg = preset_config("tiny", role="coarse", vocab_size=K, num_classes=CLASSES, grid_h=GRID, grid_w=GRID)
    torch.manual_seed(1)
    init = build_model(cfg)
    save_model(init, tmp_path / "init")
    trainer = Trainer(make_cfg(data, tmp_path / "out", init=str(tmp_path / "init"), class_dropout=0.0))
    assert_state_equal(trainer.model.state_dict(), init.state_dict())
    assert trainer.model.config.class_dropout_prob == 0.0  # regularisation comes from this run


def test_labels_beyond_the_models_classes(data, tmp_path):
    with pytest.raises(ValueError, match="labels go up to 3.*num_classes=2 \\(from --num-classes\\)"):
        Trainer(make_cfg(data, tmp_path, num_classes=2))


def test_empty_dataset(tmp_path, data):
    empty = write_codes(tmp_path / "empty", n=0)
    with pytest.raises(ValueError, match="holds no code grids"):
        Trainer(make_cfg(data, tmp_path / "out", codes=str(empty)))


@pytest.mark.parametrize("role", ["coarse", "refiner"])
def test_missing_hierarchy(data, tmp_path, role):
    with pytest.raises(ValueError, match="give --hierarchy"):
        Trainer(make_cfg(data, tmp_path, role, hierarchy=None))


def test_refiner_mask_is_the_refiners_default_and_only_the_refiners(data, tmp_path):
    assert TrainConfig(codes="c").refiner_mask  # the refiner trains within clusters unless told otherwise
    info = train(make_cfg(data, tmp_path, "coarse", steps=1), progress=False)
    assert info["refiner_mask"] is None  # other roles have no such objective
    with pytest.raises(ValueError, match="add --no-refiner-mask"):
        Trainer(make_cfg(data, tmp_path / "r", "refiner", corrupt=0.2, coarse_model=str(tmp_path)))


def test_batch_not_divisible_by_world_size_times_accumulation(data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--batch-size 8 is not divisible by world size 1 x grad accumulation 3"):
        Trainer(make_cfg(data, tmp_path, grad_accum=3))
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is started
    with pytest.raises(ValueError, match="world size 3 x grad accumulation 1"):
        train(make_cfg(data, tmp_path), progress=False)
