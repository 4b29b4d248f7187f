"""The user-facing pipelines: class labels in, images out.

    pipe = CTFPipeline.from_pretrained("runs/demo")        # tokenizer + hierarchy + coarse + refiner
    out = pipe([0, 3, 7], cfg1=2.0, generator=torch.Generator().manual_seed(0))
    out.images[0].save("sample.png"); out.tokens  # long[B, h, w]; out.coarse for CTF

`BaselinePipeline` (tokenizer + baseline AR model) has the same interface; its stage-2 settings
are ignored. A run folder holds `tokenizer/`, `hierarchy/`, `coarse/`, `refiner/` and `baseline/`.
`add_sample_args` / `cmd_sample` are the `ctfgen sample` command. See docs/sampling.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .artifacts import CONFIG_NAME, ArtifactError, read_json
from .data.transforms import image_grid, to_uint8
from .hierarchy import Hierarchy, check_compatible, load_hierarchy, save_hierarchy
from .runtime import pick_device
from .sampling import StageSettings, check_class_labels, in_batches, sample_baseline, sample_ctf
from .tokenizer.model import VQTokenizer, load_tokenizer, save_tokenizer
from .transformer.model import Transformer, load_model, save_model

TRAIN_INFO_NAME = "train_info.json"  # written by ctfgen.training next to each model

# ctfgen's defaults: the paper's best settings for the B model (CFG 2.0, t1 = t2 = 1.1, no top-k);
# the paper leaves stage-2 guidance open, so it is off by default.
DEFAULTS = dict(cfg1=2.0, cfg2=1.0, t1=1.1, t2=1.1, top_k1=0, top_k2=0, top_p1=1.0, top_p2=1.0)


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    tokens: torch.Tensor  # long [B, h, w]: fine codes, what the tokenizer decoded
    class_labels: torch.Tensor  # long [B]
    pixels: torch.Tensor  # float [B, C, H, W] in [-1, 1], the decoder's output
    coarse: torch.Tensor | None = None  # long [B, h, w]: CTF's stage-1 coarse labels


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded generator on the device the models run on (torch.multinomial needs them to agree)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def as_labels(class_labels: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class labels must be integers, got {labels.dtype}")
    return labels.long().cpu().view(-1)


def check_grid(model: Transformer, tokenizer: VQTokenizer, name: str) -> None:
    g = tokenizer.config.grid_size
    if (model.config.grid_h, model.config.grid_w) != (g, g):
        raise ArtifactError(f"the {name} model works on a {model.config.grid_h}x{model.config.grid_w} grid, "
                            f"but the tokenizer makes {g}x{g} code grids")


def check_role(model: Transformer, role: str, name: str) -> None:
    if model.config.role != role:
        raise ArtifactError(f"{name}/ holds a {model.config.role!r} model, expected a {role!r} model")


def check_trained_on(folder: Path, hierarchy: Hierarchy) -> None:
    """If the model folder records the hierarchy it was trained with, it must be this one."""
    info_path = folder / TRAIN_INFO_NAME
    if not info_path.is_file():
        return
    trained = read_json(info_path).get("hierarchy_fingerprint")
    if trained is not None and trained != hierarchy.fingerprint:
        raise ArtifactError(f"{folder} was trained with hierarchy {trained}, but the run's hierarchy is {hierarchy.fingerprint}")


class _Pipeline:
    """What both pipelines share: the tokenizer, label checks and decoding to PIL images."""

    tokenizer: VQTokenizer
    num_classes: int

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    def _labels(self, class_labels: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        labels = as_labels(class_labels)
        check_class_labels(labels, self.num_classes)
        return labels

    def _grid(self, codes: torch.Tensor) -> torch.Tensor:
        g = self.tokenizer.config.grid_size
        return codes.view(-1, g, g).cpu()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Fine codes long[B, h, w] -> pixels float[B, C, H, W] in [-1, 1] (on the CPU)."""
        return torch.cat([self.tokenizer.decode(chunk.to(self.device)).cpu() for chunk in tokens.split(batch_size)])

    def _output(self, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int,
                coarse: torch.Tensor | None = None) -> PipelineOutput:
        pixels = self.decode(tokens, batch_size)
        images = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in to_uint8(pixels)]
        return PipelineOutput(images, tokens, labels, pixels, coarse)


class CTFPipeline(_Pipeline):
    """Two-stage sampling: coarse AR over K labels, one refiner pass over V codewords, decoder."""

    def __init__(self, tokenizer: VQTokenizer, hierarchy: Hierarchy, coarse: Transformer, refiner: Transformer) -> None:
        check_compatible(hierarchy, fingerprint=tokenizer.fingerprint, codebook_size=tokenizer.config.codebook_size)
        check_role(coarse, "coarse", "coarse")
        check_role(refiner, "refiner", "refiner")
        if coarse.config.vocab_size != hierarchy.K:
            raise ArtifactError(f"the coarse model has vocabulary {coarse.config.vocab_size}, but the hierarchy has K={hierarchy.K}")
        if refiner.config.vocab_size != hierarchy.K:
            raise ArtifactError(f"the refiner reads vocabulary {refiner.config.vocab_size}, but the hierarchy has K={hierarchy.K}")
        if refiner.config.head_size != hierarchy.V:
            raise ArtifactError(f"the refiner predicts {refiner.config.head_size} codewords, but the codebook has V={hierarchy.V}")
        if coarse.config.num_classes != refiner.config.num_classes:
            raise ArtifactError(f"the coarse model knows {coarse.config.num_classes} classes, the refiner {refiner.config.num_classes}")
        check_grid(coarse, tokenizer, "coarse")
        check_grid(refiner, tokenizer, "refiner")
        self.tokenizer, self.hierarchy, self.coarse, self.refiner = tokenizer, hierarchy, coarse, refiner
        self.num_classes = coarse.config.num_classes

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> "CTFPipeline":
        run = Path(run_dir)
        tokenizer = load_tokenizer(run / "tokenizer", device)
        hierarchy = load_hierarchy(run / "hierarchy", tokenizer=tokenizer)
        for name in ("coarse", "refiner"):
            check_trained_on(run / name, hierarchy)
        return cls(tokenizer, hierarchy, load_model(run / "coarse", device), load_model(run / "refiner", device))

    def save_pretrained(self, run_dir: str | Path) -> None:
        run = Path(run_dir)
        save_tokenizer(self.tokenizer, run / "tokenizer")
        save_hierarchy(self.hierarchy, run / "hierarchy")
        save_model(self.coarse, run / "coarse")
        save_model(self.refiner, run / "refiner")

    def __call__(self, class_labels: int | Sequence[int] | torch.Tensor, *, cfg1: float = DEFAULTS["cfg1"],
                 cfg2: float = DEFAULTS["cfg2"], t1: float = DEFAULTS["t1"], t2: float = DEFAULTS["t2"],
                 top_k1: int = DEFAULTS["top_k1"], top_k2: int = DEFAULTS["top_k2"], top_p1: float = DEFAULTS["top_p1"],
                 top_p2: float = DEFAULTS["top_p2"], refiner_mask: bool = True, batch_size: int = 64,
                 generator: torch.Generator | None = None, progress: bool = True,
                 guidance_scale: float | None = None) -> PipelineOutput:
        """Sample one image per label. refiner_mask: keep each fine code inside its coarse cluster.
        guidance_scale: another name for cfg1 (the stage-1 guidance the paper uses)."""
        labels = self._labels(class_labels)
        cfg1 = cfg1 if guidance_scale is None else guidance_scale
        stage1, stage2 = StageSettings(cfg1, t1, top_k1, top_p1), StageSettings(cfg2, t2, top_k2, top_p2)
        stage1.validate(self.coarse, 1)
        stage2.validate(self.refiner, 2)
        mask = self.hierarchy.member_mask if refiner_mask else None
        coarse, fine = in_batches(lambda y: sample_ctf(self.coarse, self.refiner, y, stage1, stage2, generator, mask),
                                  labels, batch_size, progress, desc="CTF sampling")
        return self._output(self._grid(fine), labels, batch_size, self._grid(coarse))


class BaselinePipeline(_Pipeline):
    """One AR model over the V codewords (LlamaGen), then the decoder. Stage-2 settings are ignored."""

    def __init__(self, tokenizer: VQTokenizer, model: Transformer) -> None:
        check_role(model, "baseline", "baseline")
        if model.config.vocab_size != tokenizer.config.codebook_size:
            raise ArtifactError(f"the baseline has vocabulary {model.config.vocab_size}, "
                                f"but the tokenizer's codebook has {tokenizer.config.codebook_size} codewords")
        check_grid(model, tokenizer, "baseline")
        self.tokenizer, self.model = tokenizer, model
        self.num_classes = model.config.num_classes

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> "BaselinePipeline":
        run = Path(run_dir)
        return cls(load_tokenizer(run / "tokenizer", device), load_model(run / "baseline", device))

    def save_pretrained(self, run_dir: str | Path) -> None:
        run = Path(run_dir)
        save_tokenizer(self.tokenizer, run / "tokenizer")
        save_model(self.model, run / "baseline")

    def __call__(self, class_labels: int | Sequence[int] | torch.Tensor, *, cfg1: float = DEFAULTS["cfg1"],
                 t1: float = DEFAULTS["t1"], top_k1: int = DEFAULTS["top_k1"], top_p1: float = DEFAULTS["top_p1"],
                 batch_size: int = 64, generator: torch.Generator | None = None, progress: bool = True,
                 guidance_scale: float | None = None, **stage2_settings: object) -> PipelineOutput:
        """Sample one image per label; cfg2/t2/top_k2/top_p2/refiner_mask are accepted and ignored.
        guidance_scale: another name for cfg1."""
        unknown = set(stage2_settings) - {"cfg2", "t2", "top_k2", "top_p2", "refiner_mask"}
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        labels = self._labels(class_labels)
        cfg1 = cfg1 if guidance_scale is None else guidance_scale
        stage1 = StageSettings(cfg1, t1, top_k1, top_p1)
        stage1.validate(self.model, 1)
        (fine,) = in_batches(lambda y: (sample_baseline(self.model, y, stage1, generator),),
                             labels, batch_size, progress, desc="baseline sampling")
        return self._output(self._grid(fine), labels, batch_size)


PIPELINES: dict[str, type[CTFPipeline] | type[BaselinePipeline]] = {"ctf": CTFPipeline, "baseline": BaselinePipeline}


def load_pipeline(run_dir: str | Path, kind: str = "ctf", device: str | torch.device = "cpu") -> CTFPipeline | BaselinePipeline:
    if kind not in PIPELINES:
        raise ValueError(f"--kind must be one of {sorted(PIPELINES)}, got {kind!r}")
    if not (Path(run_dir) / "tokenizer" / CONFIG_NAME).is_file():
        raise ArtifactError(f"{run_dir} has no tokenizer/ folder; is it a ctfgen run folder?")
    return PIPELINES[kind].from_pretrained(run_dir, device)


# --- sample grids while training (ctfgen.training's --sample-every) --------------------------------

def training_preview(role: str, model: Transformer, tokenizer_dir: str | None, refiner_dir: str | None,
                     hierarchy: Hierarchy | None, device: torch.device) -> CTFPipeline | BaselinePipeline:
    """A pipeline around the model being trained (coarse or baseline), checked once before training starts."""
    if role == "refiner":
        raise ValueError("--sample-every: sample grids are for the coarse and baseline roles (the refiner needs a coarse model)")
    if not tokenizer_dir:
        raise ValueError("--sample-every needs --sample-tokenizer DIR to turn tokens into pixels")
    tokenizer = load_tokenizer(tokenizer_dir, device)
    if role == "baseline":
        return BaselinePipeline(tokenizer, model)
    if not refiner_dir or hierarchy is None:
        raise ValueError("--sample-every for the coarse role needs --sample-refiner DIR (and the run's --hierarchy)")
    return CTFPipeline(tokenizer, hierarchy, model, load_model(refiner_dir, device))


def preview_grid(pipe: CTFPipeline | BaselinePipeline, per_class: int = 4, max_classes: int = 8, seed: int = 0) -> Image.Image:
    """One row per class, a fixed seed (so rows are comparable across steps), no guidance, t = 1."""
    labels = torch.arange(min(pipe.num_classes, max_classes)).repeat_interleave(per_class)
    out = pipe(labels, cfg1=1.0, cfg2=1.0, t1=1.0, t2=1.0, generator=make_generator(seed, pipe.device), progress=False)
    return image_grid(out.pixels, nrow=per_class)


# --- the `ctfgen sample` command ----------------------------------------------------------------

def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (tokenizer/, hierarchy/, coarse/, refiner/, baseline/)")
    p.add_argument("--kind", choices=sorted(PIPELINES), default="ctf")
    p.add_argument("--classes", type=int, nargs="+", default=[0], help="class ids (default: 0)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (default: 8)")
    p.add_argument("--out", default=None, help="grid PNG, one row per class (default: RUN/samples-KIND.png)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image here")
    p.add_argument("--tokens", default=None, help="also write the tokens (and coarse labels, class labels) to this .npz")
    for stage, what in ((1, "stage 1 (coarse AR / baseline)"), (2, "stage 2 (refiner)")):
        p.add_argument(f"--cfg{stage}", type=float, default=DEFAULTS[f"cfg{stage}"],
                       help=f"{what} guidance scale, 1 = off (default: {DEFAULTS[f'cfg{stage}']})")
        p.add_argument(f"--t{stage}", type=float, default=DEFAULTS[f"t{stage}"],
                       help=f"{what} temperature (default: {DEFAULTS[f't{stage}']})")
        p.add_argument(f"--top-k{stage}", type=int, default=DEFAULTS[f"top_k{stage}"], help=f"{what} top-k, 0 = off")
        p.add_argument(f"--top-p{stage}", type=float, default=DEFAULTS[f"top_p{stage}"], help=f"{what} top-p, 1 = off")
    p.add_argument("--refiner-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each fine code inside its coarse cluster (default: on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_sample(args: argparse.Namespace) -> None:
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    device = pick_device(args.device)
    pipe = load_pipeline(args.run, args.kind, device)
    labels = torch.tensor(args.classes).repeat_interleave(args.per_class)
    out = pipe(labels, cfg1=args.cfg1, cfg2=args.cfg2, t1=args.t1, t2=args.t2, top_k1=args.top_k1,
               top_k2=args.top_k2, top_p1=args.top_p1, top_p2=args.top_p2, refiner_mask=args.refiner_mask,
               batch_size=args.batch_size, generator=make_generator(args.seed, device), progress=not args.quiet)
    grid_path = Path(args.out or Path(args.run) / f"samples-{args.kind}.png")
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(out.pixels, nrow=args.per_class).save(grid_path)
    print(f"{len(out.images)} samples ({args.kind}) -> {grid_path}")
    if args.out_dir:
        folder = Path(args.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (im, y) in enumerate(zip(out.images, out.class_labels.tolist())):
            im.save(folder / f"{i:05d}_class{y}.png")
        print(f"one PNG per image -> {folder}")
    if args.tokens:
        arrays = {"tokens": out.tokens.numpy(), "class_labels": out.class_labels.numpy()}
        if out.coarse is not None:
            arrays["coarse"] = out.coarse.numpy()
        Path(args.tokens).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.tokens, **arrays)
        print(f"tokens -> {args.tokens}")


__all__ = ["BaselinePipeline", "CTFPipeline", "DEFAULTS", "PipelineOutput", "add_sample_args", "cmd_sample",
           "load_pipeline", "make_generator", "preview_grid", "training_preview"]
