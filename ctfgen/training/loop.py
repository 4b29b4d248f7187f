"""One training loop for the three transformers: coarse AR, refiner and baseline AR.

All three train on the extracted code array, never on pixels; coarse labels are computed on the
fly as `hierarchy.to_coarse(codes)`:

| role     | input        | target       | vocab in / head |
|----------|--------------|--------------|-----------------|
| coarse   | coarse codes | coarse codes | K / K           |
| baseline | fine codes   | fine codes   | V / V           |
| refiner  | coarse codes | fine codes   | K / V (optionally masked to each position's cluster) |

The same code runs on CPU, one GPU or N processes under `torchrun` (see ctfgen.distributed).
Batches depend only on (seed, step) through `batch_indices`, and the dropout RNG is re-seeded
from (seed, step, rank) before every step, so a resumed run continues exactly where it stopped.
See docs/training.md.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..artifacts import ArtifactError, fingerprint_tensors, write_json
from ..data.codes import CodeDataset
from ..data.sampler import batch_indices
from ..errors import CtfgenError, Stopped
from ..hierarchy import Hierarchy
from ..outputs import Output, plan_output
from ..runtime import (StopRequest, load_checkpoint, lr_at, rng_state, save_checkpoint, seed_everything,
                       set_rng_state)
from ..transformer.model import (ARTIFACT_KIND, Transformer, TransformerConfig, build_model, cluster_members, load_model,
                                 mask_to_clusters, preset_config, save_model)
from . import checks
from .config import INFO_NAME, TrainConfig
from ..distributed import (DistInfo, all_reduce_sum_, barrier, env_world_size, setup_distributed, single_process,
                           teardown_distributed)
from .preview import Preview

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "train_config.json"
CHECKPOINT_FORMAT = 1


# --- pieces with one job each ------------------------------------------------------------------

def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the dropout RNG for one step of one rank: resuming needs no RNG history."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def role_batch(role: str, fine: torch.Tensor, hierarchy: Hierarchy | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a role from fine codes [B, T]."""
    if role == "baseline":
        return fine, fine
    assert hierarchy is not None
    coarse = hierarchy.to_coarse(fine)
    return (coarse, coarse) if role == "coarse" else (coarse, fine)


def hide_some(fine: torch.Tensor, hidden_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A `reveal` refiner's training input, drawn from the global RNG (seeded per step): in each item a
    share cos(pi/2 * u), u ~ U[0, 1), of the positions is hidden (at least one), the rest show their
    codeword. MaskGIT's schedule: often all or nearly all hidden, as in the first pass of sampling.
    Returns (fine codes with `hidden_id` where hidden, bool hidden)."""
    batch, length = fine.shape
    share = torch.cos(math.pi / 2 * torch.rand(batch, 1, device=fine.device))
    rank = torch.rand(batch, length, device=fine.device).argsort(dim=1).argsort(dim=1)  # a random order per item
    hidden = rank < (share * length).ceil().clamp(min=1)
    return fine.masked_fill(hidden, hidden_id), hidden


def stage1_view(stage1: Transformer, coarse: torch.Tensor, labels: torch.Tensor, corrupt: float,
                features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a refiner reads from stage 1 in training, drawn from the global RNG (seeded per step): the coarse
    grid with a share `corrupt` of its labels redrawn from the coarse model's own teacher-forced predictions
    (t = 1, no guidance: the errors it makes when it samples), and with `features` its hidden states. Both
    come from one pass over the true grid. Returns (coarse codes, features or None)."""
    hidden = stage1.hidden_states(coarse, labels)
    if corrupt > 0:
        probs = stage1.head_logits(hidden).softmax(dim=-1)
        redrawn = torch.multinomial(probs.flatten(0, 1), 1).view(coarse.shape)
        coarse = torch.where(torch.rand(coarse.shape, device=coarse.device) < corrupt, redrawn, coarse)
    return coarse, hidden if features else None


def token_loss(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the tokens `scored` marks (all when None)."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return ce.mean() if scored is None else (ce * scored.flatten()).sum() / scored.sum().clamp(min=1)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (dim >= 2: linear weights, embeddings, head), none on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 is slow and breaks exact resume tests)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class EMA:
    """Exponential moving average of the parameters, in fp32 beside the model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise ArtifactError("the checkpoint's EMA weights do not match the model's parameters")
        for name, t in state.items():
            self.shadow[name].copy_(t)

    def model(self, like: Transformer) -> Transformer:
        """A model with the config of `like` holding the EMA weights."""
        with torch.device(like.head.weight.device):
            out = Transformer(like.config)
        out.load_state_dict(self.shadow)
        return out


@torch.no_grad()
def evaluate(model: Transformer, codes: CodeDataset, role: str, hierarchy: Hierarchy | None, limit: int,
             batch_size: int = 256, stage1: Transformer | None = None) -> dict[str, float]:
    """Mean CE and top-1 accuracy per token on the first `limit` items.

    For the refiner (given the true coarse labels, nothing revealed; `stage1`: the coarse model whose
    hidden states a refiner with `feature_dim` reads), also with logits masked to each position's cluster.
    For the baseline with a hierarchy, also its likelihood split: `loss_coarse` = -log of the probability
    mass of the true token's cluster (the baseline's implied coarse prediction) and `loss_within` =
    loss - loss_coarse (the choice inside the cluster), comparable to CTF's coarse and refiner losses.
    """
    device = model.head.weight.device
    was_training = model.training
    model.eval()
    n = min(limit, len(codes))
    sums: dict[str, float] = {}
    tokens = 0
    for start in range(0, n, batch_size):
        fine, labels = codes.batch(torch.arange(start, min(n, start + batch_size)))
        inputs, targets = role_batch(role, fine.to(device), hierarchy)
        labels = labels.to(device)
        features = None
        if model.config.feature_dim:
            if stage1 is None:
                raise CtfgenError("this refiner reads stage-1 features: give the coarse model it was trained with")
            features = stage1.hidden_states(inputs, labels)
        with autocast(device):
            logits = model(inputs, labels, features=features)
        variants = {"": logits}
        if role == "refiner":
            assert hierarchy is not None
            variants["_masked"] = mask_to_clusters(logits, inputs, hierarchy.member_mask)
        for suffix, lg in variants.items():
            ce = F.cross_entropy(lg.flatten(0, 1), targets.flatten(), reduction="sum").item()
            hits = (lg.argmax(-1) == targets).sum().item()
            sums[f"loss{suffix}"] = sums.get(f"loss{suffix}", 0.0) + ce
            sums[f"accuracy{suffix}"] = sums.get(f"accuracy{suffix}", 0.0) + hits
        if role == "baseline" and hierarchy is not None:
            members = hierarchy.member_mask.to(device)[hierarchy.to_coarse(targets)]  # [B, T, V]
            logits = logits.float()
            cluster_logp = logits.masked_fill(~members, float("-inf")).logsumexp(-1) - logits.logsumexp(-1)
            sums["loss_coarse"] = sums.get("loss_coarse", 0.0) - cluster_logp.sum().item()
        tokens += targets.numel()
    model.train(was_training)
    result = {"items": n, **{k: v / tokens for k, v in sums.items()}}
    if "loss_coarse" in result:
        result["loss_within"] = result["loss"] - result["loss_coarse"]
    return result


class Throughput:
    """Training tokens/s (over all processes) counted from the end of the first step, which allocates and compiles."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.start_step: int | None = None
        self.start_time = 0.0

    def tick(self, step: int) -> None:
        if self.start_step is None:
            self.start_step, self.start_time = step, time.perf_counter()

    def rate(self, step: int) -> float | None:
        """None until a second step has run."""
        if self.start_step is None or step == self.start_step:
            return None
        return self.tokens_per_step * (step - self.start_step) / (time.perf_counter() - self.start_time)


# --- the trainer --------------------------------------------------------------------------------

class Trainer:
    """Holds the model, optimizer, EMA and step; `fit` runs the loop. Every input check runs in __init__.

    `dist_info` comes from `setup_distributed` (what `train` does); None means one process on cfg.device.
    `work_dir` is where it writes (`train` passes the folder ctfgen.outputs chose); None means cfg.out_dir.
    """

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None, work_dir: Path | None = None):
        self.cfg = cfg
        self.dist = dist_info or single_process(cfg.device)
        self.device = self.dist.device
        self.out = work_dir or cfg.out_dir
        checks.check_train_config(cfg, self.dist.world_size)
        self.codes = checks.load_codes(cfg.codes)
        checks.check_batch_fits(self.codes, cfg.batch_size)
        self.hierarchy = checks.load_matching_hierarchy(cfg, self.codes)
        self.val_codes = checks.load_codes(cfg.val_codes, "--val-codes") if cfg.val_codes else None
        self.stage1 = (checks.load_stage1(cfg, self.codes, self.hierarchy, self.device)
                       if cfg.role == "refiner" and cfg.coarse_model else None)
        self.stage1_fingerprint = fingerprint_tensors(self.stage1.state_dict()) if self.stage1 is not None else None

        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model = self._build_model().to(self.device)
        if self.val_codes is not None:
            checks.check_val_codes(self.val_codes, self.codes, self.model.config.num_classes)
        # a refiner trained within clusters scores only its cluster's members (M head rows, not V): targets
        # become each codeword's place among its cluster's members
        self.within = (cluster_members(self.hierarchy.member_mask.to(self.device))
                       if cfg.role == "refiner" and cfg.refiner_mask else None)
        if self.within is not None:
            members, is_member = self.within
            self.member_rank = torch.empty(self.model.config.head_size, dtype=torch.long, device=self.device)
            self.member_rank[members[is_member]] = torch.nonzero(is_member)[:, 1]
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), fused=self.device.type == "cuda")
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.forward_model = self._wrap(self.model)
        self.per_rank_batch = cfg.batch_size // self.dist.world_size
        self.step = 0
        self.recent_losses: deque[float] = deque(maxlen=cfg.log_every)
        self.stop = StopRequest()
        self.preview = (Preview(self.model, cfg.sample_tokenizer, cfg.sample_refiner, self.hierarchy, self.device)
                        if cfg.sample_every > 0 and self.dist.is_main else None)

    # --- set-up -------------------------------------------------------------------------------
    def _build_model(self) -> Transformer:
        cfg = self.cfg
        expected = self._expected_fields()
        dropouts = dict(class_dropout_prob=cfg.class_dropout, token_dropout_p=cfg.dropout,
                        resid_dropout_p=cfg.dropout, ffn_dropout_p=cfg.dropout)
        if cfg.init is None:
            num_classes = checks.resolve_num_classes(cfg.num_classes, self.codes)
            fields = {name: value for name, (value, _) in expected.items()}
            return build_model(preset_config(cfg.size, num_classes=num_classes, **fields, **dropouts))
        init = load_model(cfg.init)
        checks.check_model_fits(init.config, expected, f"--init model {cfg.init}")
        if cfg.num_classes is not None and cfg.num_classes != init.config.num_classes:
            raise ArtifactError(f"--init model {cfg.init} has num_classes={init.config.num_classes}, "
                                f"but --num-classes is {cfg.num_classes}")
        checks.check_labels(self.codes, init.config.num_classes, f"--init model {cfg.init}")
        model = build_model(replace(init.config, **dropouts))
        model.load_state_dict(init.state_dict())
        return model.train()

    def _expected_fields(self) -> dict[str, tuple[Any, str]]:
        cfg = self.cfg
        width = self.stage1.config.dim if self.stage1 is not None and cfg.stage1_features else 0
        return checks.expected_model_fields(cfg.role, self.codes, self.hierarchy, cfg.reveal, width)

    def _wrap(self, model: Transformer) -> torch.nn.Module:
        """The module the training forward goes through: optionally compiled, DDP-wrapped when distributed."""
        wrapped: torch.nn.Module = torch.compile(model) if self.cfg.compile else model
        if self.dist.enabled:
            wrapped = DistributedDataParallel(wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return wrapped

    # --- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def _data_fingerprints(self) -> dict[str, Any]:
        return {"codes_fingerprint": self.codes.fingerprint,
                "hierarchy_fingerprint": self.hierarchy.fingerprint if self.hierarchy else None,
                "stage1_fingerprint": self.stage1_fingerprint}

    def save_checkpoint(self) -> None:
        """Rank 0 writes everything needed to continue exactly (atomic: a crash keeps the last good file)."""
        if not self.dist.is_main:
            return
        cfg = self.cfg
        save_checkpoint(self.checkpoint_path, {
            "format_version": CHECKPOINT_FORMAT,
            "step": self.step,  # also the data position: batch `step` is next
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "schedule": {"base_lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "lr_decay": cfg.lr_decay,
                         "total_steps": cfg.steps, "lr": lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_decay)},
            "rng": rng_state(),
            "recent_losses": list(self.recent_losses),
            "model_config": json.dumps(self.model.config.to_dict()),
            "train_config": json.dumps(asdict(cfg)),
            "data": {**self._data_fingerprints(), "world_size": self.dist.world_size},
        })

    def load_checkpoint(self) -> bool:
        """Every rank restores OUT/checkpoint.pt if there is one; refuses one from other data or another model."""
        path = self.checkpoint_path
        if not path.is_file():
            return False
        state = load_checkpoint(path, "cpu")  # RNG states must stay on the CPU; the rest is copied in place
        self._check_checkpoint(state, path)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ArtifactError(f"{path} was trained without EMA; cannot resume with --ema-decay {self.cfg.ema_decay}")
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.recent_losses.extend(state["recent_losses"])
        self.step = state["step"]
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return True

    def _check_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        if state.get("format_version") != CHECKPOINT_FORMAT:
            raise ArtifactError(f"{path}: unknown checkpoint format {state.get('format_version')!r}")
        stored = TransformerConfig(**json.loads(state["model_config"]))
        checks.check_model_fits(stored, self._expected_fields(), f"checkpoint {path}")
        checks.check_same_architecture(stored, self.model.config, f"checkpoint {path}")
        for key, now in self._data_fingerprints().items():
            if state["data"].get(key) != now:  # checkpoints older than a key hold None for it
                raise ArtifactError(f"{path} was trained with {key} {state['data'].get(key)}, but this run has {now}")
        changed = {k: v for k, v in json.loads(state["train_config"]).items()
                   if asdict(self.cfg).get(k) != v and k not in self._inert_fields()}
        if state["data"]["world_size"] != self.dist.world_size:
            changed["world_size"] = state["data"]["world_size"]  # same batches, other dropout draws
        if changed and self.dist.is_main:
            log.warning("resuming with changed settings (was: %s); the run is no longer the same as one uninterrupted run",
                        changed)

    def _inert_fields(self) -> set[str]:
        """Settings that may change on resume without changing the weights."""
        inert = {"out", "save_every", "keep_every", "log_every", "device", "compile", "val_codes", "val_limit",
                 "sample_every", "sample_tokenizer", "sample_refiner"}
        return inert if self.cfg.lr_decay == "cosine" else inert | {"steps"}  # cosine decay ends at `steps`

    # --- one step -------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, float, float]:
        """One optimizer step over this rank's share of global batch `self.step`: (loss, grad norm, lr)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_decay)
        for group in self.opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(cfg.seed, self.step, self.dist.rank))
        idx = batch_indices(len(self.codes), self.per_rank_batch, cfg.seed, self.step, self.dist.rank, self.dist.world_size)
        views = torch.Generator().manual_seed(step_seed(cfg.seed, self.step, self.dist.rank) + 1)  # a view per item
        fine, labels = self.codes.batch(idx, views)
        inputs, targets = role_batch(cfg.role, fine.to(self.device), self.hierarchy)
        labels = labels.to(self.device)
        features = None
        if self.stage1 is not None:
            with autocast(self.device):
                inputs, features = stage1_view(self.stage1, inputs, labels, cfg.corrupt, cfg.stage1_features)
        shown, scored = hide_some(targets, self.model.config.hidden_id) if self.model.config.reveal else (None, None)
        parts = {"codes": inputs, "targets": targets, "labels": labels, "fine": shown, "scored": scored,
                 "features": features}
        chunks = {name: part.chunk(cfg.grad_accum) for name, part in parts.items() if part is not None}
        loss_sum = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            m = {name: chunk[i] for name, chunk in chunks.items()}
            # DDP all-reduces gradients only on the last micro-batch of the step.
            sync = i == cfg.grad_accum - 1 or not self.dist.enabled
            with nullcontext() if sync else self.forward_model.no_sync():
                with autocast(self.device):
                    logits = self.forward_model(m["codes"], m["labels"], None, m.get("fine"), m.get("features"),
                                                within=self.within)
                targets = m["targets"] if self.within is None else self.member_rank[m["targets"]]
                # Equal micro-batches on every rank: mean / grad_accum, averaged over ranks by DDP,
                # is the mean over the global batch (of the scored tokens, with reveal: nearly so).
                loss = token_loss(logits, targets, m.get("scored")) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return loss_sum, grad_norm, lr

    def _global_loss_and_stop(self, loss: torch.Tensor) -> tuple[float, bool]:
        """Mean loss over ranks, and whether any rank was asked to stop (so all stop at the same step)."""
        stats = torch.stack([loss, torch.tensor(float(self.stop.signum is not None), device=self.device)])
        all_reduce_sum_(stats, self.dist)
        return stats[0].item() / self.dist.world_size, bool(stats[1].item() > 0)

    # --- the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool = False, progress: bool = True, output: Output | None = None) -> dict[str, Any]:
        """Train to `cfg.steps` (continuing OUT/checkpoint.pt with resume) and write the artifacts.

        Returns train_info (see `finish`). SIGTERM / Ctrl-C: saves a checkpoint and raises `Stopped`.
        `output` (from `plan_output`) is opened before the first write and finished after the last.
        """
        cfg = self.cfg
        t_start = time.perf_counter()
        if resume:
            self.load_checkpoint()
        if output is not None and self.dist.is_main:
            output.open()
        first_step = self.step
        writer = self._open_logs() if self.dist.is_main else None
        speed = Throughput(cfg.batch_size * self.model.config.seq_len)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.role}", unit="step",
                   disable=not (progress and self.dist.is_main))
        stopped = False
        self.model.train()
        try:
            with self.stop:
                while self.step < cfg.steps and not stopped:
                    loss_t, grad_norm, lr = self.train_step()
                    loss, stopped = self._global_loss_and_stop(loss_t)
                    self.recent_losses.append(loss)
                    speed.tick(self.step)
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._log(writer, bar, lr, grad_norm, speed.rate(self.step))
                    if self.preview is not None and writer is not None and self.step % cfg.sample_every == 0:
                        writer.add_image("samples", self.preview.grid(), self.step, dataformats="HWC")
                    if self.step % cfg.save_every == 0 or stopped or self.step == cfg.steps:
                        self.save_checkpoint()
                        if bar.disable and self.dist.is_main:  # no bar (a bench, a log file): say how far it is
                            log.info("train %s: step %d/%d, loss %.4f", cfg.role, self.step, cfg.steps,
                                     float(np.mean(self.recent_losses)))
                    if cfg.keep_every and self.step % cfg.keep_every == 0 and self.dist.is_main:
                        save_model(self.final_model(), self.out / "snapshots" / f"step{self.step}")
                        self.model.train()  # final_model() switched it to eval
            bar.close()  # before the held-out evaluation
            if stopped:
                barrier(self.dist)
                raise Stopped(self.stop.signum or signal.SIGTERM, self.step, str(self.checkpoint_path))
            info = self.finish(writer, speed.rate(self.step), time.perf_counter() - t_start, first_step)
            if output is not None and self.dist.is_main:
                output.finish()
            barrier(self.dist)
            return info
        finally:
            bar.close()
            if writer is not None:
                writer.close()

    def _open_logs(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # slow import: only rank 0 needs it

        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / CONFIG_NAME, asdict(self.cfg))
        return SummaryWriter(str(self.out / "logs"))

    def _log(self, writer: Any, bar: tqdm, lr: float, grad_norm: float, tokens_per_s: float | None) -> None:
        loss = float(np.mean(self.recent_losses))
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s or 0:.0f}")
        if writer is None:
            return
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}
        if tokens_per_s is not None:
            scalars["train/tokens_per_s"] = tokens_per_s
        for name, value in scalars.items():
            writer.add_scalar(name, value, self.step)

    def final_model(self) -> Transformer:
        """The weights that become the artifact: EMA when on, else the raw weights."""
        return (self.ema.model(self.model) if self.ema else self.model).eval()

    def finish(self, writer: Any, tokens_per_s: float | None, wall_s: float, first_step: int) -> dict[str, Any]:
        """Rank 0: write the model artifact (config.json + model.safetensors) and train_info.json."""
        if not self.dist.is_main:
            return {}
        cfg = self.cfg
        model = self.final_model()
        save_model(model, self.out)
        held_out = None
        if self.val_codes is not None:
            micro_batch = self.per_rank_batch // cfg.grad_accum  # known to fit in memory (with gradients, even)
            held_out = {"codes": cfg.val_codes, **evaluate(model, self.val_codes, cfg.role, self.hierarchy,
                                                          cfg.val_limit, micro_batch, self.stage1)}
            for k, v in held_out.items():
                if k not in ("codes", "items"):
                    writer.add_scalar(f"val/{k}", v, self.step)
        objective = "loss_masked" if cfg.role == "refiner" and cfg.refiner_mask else "loss"
        info = {
            "role": cfg.role,
            "steps": self.step,
            "resumed_from_step": first_step,
            "global_batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "codes": cfg.codes,
            "codes_fingerprint": self.codes.fingerprint,
            "hierarchy": cfg.hierarchy,
            "hierarchy_fingerprint": self.hierarchy.fingerprint if self.hierarchy else None,
            "K": self.hierarchy.K if self.hierarchy else None,
            "V": self.codes.codebook_size,
            "num_classes": model.config.num_classes,
            "grid": list(self.codes.grid),
            "parameters": model.num_params(),
            "weights": "ema" if self.ema else "raw",
            "ema_decay": cfg.ema_decay,
            "refiner_mask": cfg.refiner_mask if cfg.role == "refiner" else None,
            "reveal": cfg.reveal,
            "stage1": cfg.coarse_model,  # the coarse model a refiner read (features) or learned the errors of
            "stage1_fingerprint": self.stage1_fingerprint,
            "stage1_features": cfg.stage1_features,
            "corrupt": cfg.corrupt,
            "final_train_loss": float(np.mean(self.recent_losses)) if self.recent_losses else None,
            "val_loss": held_out[objective] if held_out else None,
            "held_out": held_out,
            "tokens_per_s": tokens_per_s,
            "wall_s": wall_s,
        }
        write_json(self.out / INFO_NAME, info)
        return info


def train(cfg: TrainConfig, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train one model (1 process, or N under torchrun). Returns train_info on rank 0, {} on other ranks.

    The output folder follows ctfgen.outputs: a finished model is replaced only with `force`, an unfinished
    run continues only with `resume`. SIGTERM / Ctrl-C: saves a checkpoint and raises `Stopped`.
    """
    checks.check_train_config(cfg, env_world_size())  # fail before waiting for the other processes
    # Every process reads the folder before they meet in setup_distributed; only rank 0 writes to it after.
    output = plan_output(cfg.out_dir, ARTIFACT_KIND, force=force, resume=resume, resumable=True)
    dist_info = setup_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, dist_info, work_dir=output.path)
        return trainer.fit(resume=output.resumed, progress=progress, output=output)
    finally:
        teardown_distributed(dist_info)
