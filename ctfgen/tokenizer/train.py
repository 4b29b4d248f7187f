"""Train a VQ tokenizer on images, with checkpoints, resume, TensorBoard logs and a final report."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..arguments import AtLeast, Between, Count, NonNegative, OneOf, Positive, check_fields
from ..artifacts import write_json
from ..data.datasets import DataError, build_dataset
from ..data.sampler import StepBatches
from ..data.transforms import image_grid
from ..errors import CtfgenError, Stopped
from ..outputs import Output, plan_output
from ..runtime import (StopRequest, load_checkpoint, lr_at, pick_device, rng_state, save_checkpoint, seed_everything,
                       set_rng_state)
from .losses import PatchDiscriminator, PerceptualLoss, generator_adv_loss, hinge_d_loss
from .model import TOKENIZER_KIND, VQTokenizer, save_tokenizer
from .presets import PRESETS, preset_config

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TokenizerTrainConfig:
    out: str = "runs/default/tokenizer"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    preset: Annotated[str, OneOf(*PRESETS)] = "small"
    image_size: Annotated[int | None, AtLeast(8)] = None  # override the preset's resolution
    codebook_size: Annotated[int | None, AtLeast(2)] = None  # override the preset's codebook size
    steps: Count = 900
    batch_size: Count = 128
    lr: Positive = 3e-3
    warmup_steps: NonNegative = 50
    lr_decay: Annotated[str, OneOf("none", "cosine")] = "cosine"
    weight_decay: Annotated[float, AtLeast(0.0)] = 0.0
    recon_loss: Annotated[str, OneOf("l1", "l2", "l1+l2")] = "l2"
    reseed_dead: bool = True
    reseed_every: Count = 50  # steps of usage counted before unused codewords are moved
    reseed_until: Annotated[float, Between(0.0, 1.0)] = 0.8  # fraction of training after which codewords stay put
    disc_weight: Annotated[float, AtLeast(0.0)] = 0.0  # 0 turns the PatchGAN loss off
    disc_start: NonNegative = 0
    perceptual_weights: str | None = None  # a local VGG16 (+LPIPS heads) safetensors file
    perceptual_weight: Annotated[float, AtLeast(0.0)] = 1.0
    hflip: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: NonNegative = 0
    save_every: Count = 500
    log_every: Count = 25
    image_every: Count = 500
    report_limit: Annotated[int | None, AtLeast(1)] = None  # test images in the final report (None = the whole split)

    def __post_init__(self) -> None:
        check_fields(self)


def reconstruction_loss(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    losses = {"l1": lambda: F.l1_loss(x, y), "l2": lambda: F.mse_loss(x, y),
              "l1+l2": lambda: F.l1_loss(x, y) + F.mse_loss(x, y)}
    if kind not in losses:
        raise CtfgenError(f"unknown reconstruction loss {kind!r}; choose from {sorted(losses)}")
    return losses[kind]()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1,1] (peak-to-peak range 2)."""
    mse = ((x - y) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def code_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code histogram: the number of equally used codewords it is worth."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def evaluate_tokenizer(model: VQTokenizer, dataset: Dataset, batch_size: int = 256, limit: int | None = None,
                       device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Reconstruction PSNR, codebook usage (% of codewords used) and code perplexity on a dataset."""
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    psnrs = []
    for x, _ in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        x = x.to(device)
        codes = model.encode(x)
        psnrs.append(psnr(model.decode(codes), x).cpu())
        counts += torch.bincount(codes.flatten().cpu(), minlength=len(counts))
    model.train(was_training)
    return {"images": n, "psnr_db": torch.cat(psnrs).mean().item(), "codebook_usage_pct": 100.0 * (counts > 0).float().mean().item(),
            "perplexity": code_perplexity(counts), "codebook_size": len(counts)}


class TokenizerTrainer:
    """`work_dir` is where it writes (`train_tokenizer` passes the folder ctfgen.outputs chose); None means cfg.out."""

    def __init__(self, cfg: TokenizerTrainConfig, work_dir: Path | None = None):
        self.cfg = cfg
        self.out = work_dir or Path(cfg.out)
        self.device = pick_device(cfg.device)
        seed_everything(cfg.seed)
        self.model_cfg = preset_config(cfg.preset, image_size=cfg.image_size, codebook_size=cfg.codebook_size)
        ds_args = dict(resolution=self.model_cfg.image_size, channels=self.model_cfg.in_channels, data_dir=cfg.data_dir)
        self.train_set = build_dataset(cfg.data, "train", hflip=cfg.hflip, **ds_args)
        self.test_set = build_dataset(cfg.data, "test", **ds_args)
        if len(self.train_set) < cfg.batch_size:  # before the first step, not at it
            raise DataError(f"{cfg.data}: {len(self.train_set)} training images, fewer than one batch of "
                            f"{cfg.batch_size} (--batch-size)")
        self.model = VQTokenizer(self.model_cfg).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        self.disc = self.disc_opt = None
        if cfg.disc_weight > 0:
            self.disc = PatchDiscriminator(self.model_cfg.in_channels).to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        self.perceptual = PerceptualLoss(cfg.perceptual_weights).to(self.device) if cfg.perceptual_weights else None
        self.usage = torch.zeros(self.model_cfg.codebook_size, dtype=torch.long, device=self.device)
        self.reseed_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.writer = None

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        state = {"step": self.step, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                 "usage": self.usage, "rng": rng_state(), "reseed_gen": self.reseed_gen.get_state(),
                 "config": json.dumps(asdict(self.cfg))}
        if self.disc is not None:
            state |= {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}
        save_checkpoint(self.out / CHECKPOINT_NAME, state)

    def resume(self) -> bool:
        path = self.out / CHECKPOINT_NAME
        if not path.is_file():
            return False
        state = load_checkpoint(path, self.device)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        self.usage.copy_(state["usage"])
        set_rng_state(state["rng"])
        self.reseed_gen.set_state(state["reseed_gen"].cpu())
        self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # --- one step -----------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_decay)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            rec, vq = self.model(x)
        rec = rec.float()
        rec_loss = reconstruction_loss(cfg.recon_loss, rec, x)
        loss = rec_loss + vq.loss
        stats = {"loss/reconstruction": rec_loss.item(), "loss/codebook": vq.codebook_loss.item(),
                 "loss/commitment": vq.commitment_loss.item(), "lr": lr}
        if self.perceptual is not None:
            p_loss = self.perceptual(rec, x)
            loss = loss + cfg.perceptual_weight * p_loss
            stats["loss/perceptual"] = p_loss.item()
        gan_on = self.disc is not None and self.step >= cfg.disc_start
        if gan_on:
            g_loss = generator_adv_loss(self.disc(rec))
            loss = loss + cfg.disc_weight * g_loss
            stats["loss/generator"] = g_loss.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if gan_on:
            d_loss = hinge_d_loss(self.disc(x), self.disc(rec.detach()))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            stats["loss/discriminator"] = d_loss.item()
        self.usage += torch.bincount(vq.codes.flatten(), minlength=len(self.usage))
        self._maybe_reseed(vq.latents, stats)
        stats["psnr_db"] = psnr(rec.detach(), x).mean().item()
        return stats

    def _maybe_reseed(self, latents: torch.Tensor, stats: dict) -> None:
        cfg = self.cfg
        if (self.step + 1) % cfg.reseed_every:
            return
        stats["codebook/usage_pct"] = 100.0 * (self.usage > 0).float().mean().item()
        stats["codebook/perplexity"] = code_perplexity(self.usage)
        if cfg.reseed_dead and self.step < cfg.reseed_until * cfg.steps:
            stats["codebook/reseeded"] = self.model.quantizer.reseed(self.usage == 0, latents, self.reseed_gen)
        self.usage.zero_()

    # --- the loop -----------------------------------------------------------------------------
    def _log(self, stats: dict) -> None:
        for k, v in stats.items():
            self.writer.add_scalar(k, v, self.step)

    def _log_images(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.model.eval()
            rec = self.model.decode(self.model.encode(x))
            self.model.train()
        arr = np.asarray(image_grid(torch.cat([x, rec]).cpu(), nrow=len(x)))
        self.writer.add_image("reconstructions", arr if arr.ndim == 3 else arr[..., None], self.step, dataformats="HWC")

    def fit(self, resume: bool = False, progress: bool = True, output: Output | None = None) -> dict:
        """Train to cfg.steps and write the artifact. SIGTERM / Ctrl-C: saves a checkpoint and raises `Stopped`."""
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg
        if output is not None:
            output.open()
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "train_config.json", asdict(cfg))
        if resume:
            self.resume()
        self.writer = SummaryWriter(str(self.out / "logs"))
        loader = DataLoader(self.train_set, num_workers=cfg.num_workers,
                            batch_sampler=StepBatches(len(self.train_set), cfg.batch_size, cfg.seed, self.step, cfg.steps))
        preview = torch.stack([self.test_set[i][0] for i in range(min(8, len(self.test_set)))]).to(self.device)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train tokenizer", disable=not progress, unit="step")
        t0, images = time.perf_counter(), 0
        with StopRequest() as stop:
            for x, _ in loader:
                x = x.to(self.device, non_blocking=True)
                stats = self.train_step(x)
                self.step += 1
                images += len(x)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    stats["throughput/images_per_s"] = images / (time.perf_counter() - t0)
                    self._log(stats)
                    bar.set_postfix(loss=f"{stats['loss/reconstruction']:.4f}", psnr=f"{stats['psnr_db']:.1f}",
                                    img_s=f"{stats['throughput/images_per_s']:.0f}")
                if self.step % cfg.image_every == 0:
                    self._log_images(preview)
                if self.step % cfg.save_every == 0 or stop.signum is not None:
                    self.save_checkpoint()
                if stop.signum is not None:
                    bar.close()
                    self.writer.close()
                    raise Stopped(stop.signum, self.step, str(self.out / CHECKPOINT_NAME))
        bar.close()
        self.save_checkpoint()
        report = self.finish(progress)
        if output is not None:
            output.finish()
        return report

    def finish(self, progress: bool = True) -> dict:
        """Write the tokenizer artifact, a reconstruction grid and the test-split report."""
        self.model.eval()
        fingerprint = save_tokenizer(self.model, self.out)
        report = evaluate_tokenizer(self.model, self.test_set, limit=self.cfg.report_limit, device=self.device, progress=progress)
        report |= {"split": "test", "data": self.cfg.data, "holdout": getattr(self.test_set, "holdout", None),
                   "steps": self.step, "fingerprint": fingerprint}
        write_json(self.out / "report.json", report)
        x = torch.stack([self.test_set[i][0] for i in range(min(16, len(self.test_set)))]).to(self.device)
        image_grid(torch.cat([x, self.model.decode(self.model.encode(x))]).cpu(), nrow=16).save(self.out / "reconstructions.png")
        if self.writer is not None:
            for k in ("psnr_db", "codebook_usage_pct", "perplexity"):
                self.writer.add_scalar(f"test/{k}", report[k], self.step)
            self.writer.close()
        return report


def train_tokenizer(cfg: TokenizerTrainConfig, resume: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Train and write a tokenizer folder; a finished one is replaced only with `force`, an unfinished
    one continues only with `resume` (see ctfgen.outputs)."""
    output = plan_output(cfg.out, TOKENIZER_KIND, force=force, resume=resume, resumable=True)
    return TokenizerTrainer(cfg, work_dir=output.path).fit(resume=output.resumed, progress=progress, output=output)
