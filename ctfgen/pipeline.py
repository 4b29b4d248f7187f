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
from typing import Annotated, Any, Sequence

import numpy as np
import torch
from PIL import Image

from .arguments import AtLeast, Between, Count, NonNegative, Positive, arg_type
from .artifacts import CONFIG_NAME, ArtifactError, fingerprint_tensors, read_json
from .count_draft import CountDraft, load_draft
from .data.transforms import image_grid, to_uint8, uint8_to_float
from .errors import CtfgenError
from .hierarchy import Hierarchy, check_compatible, load_hierarchy, save_hierarchy
from .outputs import add_output_flags, check_output_file, plan_output
from .runtime import pick_device
from .sampling import (StageSettings, check_class_labels, check_draft, in_batches, sample_baseline, sample_causal,
                       sample_ctf)
from .tokenizer.model import VQTokenizer, load_tokenizer, save_tokenizer
from .transformer.model import Transformer, compile_freezes, load_model, save_model
from .transformer.precision import DECODE_PRECISIONS, for_decoding, refiner_precision

TRAIN_INFO_NAME = "train_info.json"  # written by ctfgen.training next to each model

# ctfgen's defaults: the paper's best settings for the B model (CFG 2.0, t1 = t2 = 1.1, no top-k);
# the paper leaves stage-2 guidance open, so it is off by default.
DEFAULTS = dict(cfg1=2.0, cfg2=1.0, t1=1.1, t2=1.1, top_k1=0, top_k2=0, top_p1=1.0, top_p2=1.0)
# what each setting may be (the model-dependent bounds, such as top-k <= vocabulary, are checked on loading)
_SETTING_KINDS = {"cfg": Annotated[float, AtLeast(0.0)], "t": Positive, "top_k": NonNegative,
                  "top_p": Annotated[float, Between(0.0, 1.0, lo_open=True)]}
SETTING_TYPES = {name: _SETTING_KINDS[name.rstrip("12")] for name in DEFAULTS}


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    tokens: torch.Tensor  # long [B, h, w]: fine codes, what the tokenizer decoded
    class_labels: torch.Tensor  # long [B]
    pixels: torch.Tensor  # float [B, C, H, W] in [-1, 1], the decoder's output
    coarse: torch.Tensor | None = None  # long [B, h, w]: CTF's stage-1 coarse labels


def pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """float [B, C, H, W] in [-1, 1] -> PIL images (greyscale for one channel)."""
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in to_uint8(pixels)]


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded generator on the device the models run on (torch.multinomial needs them to agree)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def as_labels(class_labels: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise CtfgenError(f"class labels must be integers, got {labels.dtype}")
    return labels.long().cpu().view(-1)


def check_grid(model: Transformer, tokenizer: VQTokenizer, name: str) -> None:
    g = tokenizer.config.grid_size
    if (model.config.grid_h, model.config.grid_w) != (g, g):
        raise ArtifactError(f"the {name} model works on a {model.config.grid_h}x{model.config.grid_w} grid, "
                            f"but the tokenizer makes {g}x{g} code grids")


def check_role(model: Transformer, role: str, name: str) -> None:
    if model.config.role != role:
        raise ArtifactError(f"{name}/ holds a {model.config.role!r} model, expected a {role!r} model")


def check_trained_on(folder: Path, hierarchy: Hierarchy, coarse: Transformer | None = None) -> dict[str, Any]:
    """If the model folder records the hierarchy it was trained with, it must be this one; a refiner that
    read a coarse model in training (features, corrupted labels) must be sampled with that model. Returns
    what the folder records of its training ({} for a model that records nothing, e.g. an imported one)."""
    info_path = folder / TRAIN_INFO_NAME
    if not info_path.is_file():
        return {}
    info = read_json(info_path)
    trained = info.get("hierarchy_fingerprint")
    if trained is not None and trained != hierarchy.fingerprint:
        raise ArtifactError(f"{folder} was trained with hierarchy {trained}, but the run's hierarchy is {hierarchy.fingerprint}")
    stage1 = info.get("stage1_fingerprint")
    if stage1 is not None and coarse is not None and info.get("stage1_features") and stage1 != fingerprint_tensors(coarse.state_dict()):
        raise ArtifactError(f"{folder} reads the hidden states of the coarse model {info.get('stage1')} "
                            f"(weights {stage1}), not of this run's coarse model")
    return info


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

    ar_name: str  # the attribute holding the autoregressive model: "coarse" or "model"
    draft: Transformer | CountDraft | None = None  # a smaller model of the same role, or counts: stage 1 speculative
    lookahead: int = 4

    def prepare_decode(self, precision: str = "fp32", compile: bool = False,
                       draft: Transformer | CountDraft | None = None, lookahead: int = 4,
                       **compile_options: Any) -> None:
        """Sample the autoregressive stage (and CTF's refiner) at `precision` (fp32, exact; fp32-packed; bf16;
        int8 weight-only: see ctfgen.transformer.precision), with its decode step compiled
        (`Transformer.compile_step`), and/or speculatively with `draft` proposing `lookahead` tokens a pass
        (the same distribution; docs/sampling.md)."""
        if compile and precision == "fp32-packed" and compile_freezes(self.device, **compile_options):
            raise CtfgenError("--compile does not take --decode-precision fp32-packed (inductor cannot compile its "
                              "packed weights); --compile alone freezes the fp32 weights and picks their kernels on "
                              "the CPU")
        model = for_decoding(getattr(self, self.ar_name), precision)
        if draft is not None:
            check_draft(model, draft, StageSettings(), lookahead)
            if isinstance(draft, Transformer):
                draft = for_decoding(draft.to(self.device), precision)
            self.draft, self.lookahead = draft, lookahead
        if compile:
            model.compile_step(**compile_options)
        setattr(self, self.ar_name, model)

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
        return PipelineOutput(pil_images(pixels), tokens, labels, pixels, coarse)


class CTFPipeline(_Pipeline):
    """Two-stage sampling: coarse AR over K labels, one refiner pass over V codewords, decoder."""

    def __init__(self, tokenizer: VQTokenizer, hierarchy: Hierarchy, coarse: Transformer,
                 refiner: Transformer | None, refiner_within: bool = False) -> None:
        """refiner=None: stage 2 draws a uniformly random member of each cluster (the bench's floor (c)),
        which shows what a trained refiner adds. refiner_within: the refiner was trained on its cluster's
        members only (`train_info.json`'s refiner_mask), so it is sampled with the cluster mask only."""
        check_compatible(hierarchy, fingerprint=tokenizer.fingerprint, codebook_size=tokenizer.config.codebook_size)
        check_role(coarse, "coarse", "coarse")
        if coarse.config.vocab_size != hierarchy.K:
            raise ArtifactError(f"the coarse model has vocabulary {coarse.config.vocab_size}, but the hierarchy has K={hierarchy.K}")
        check_grid(coarse, tokenizer, "coarse")
        if refiner is not None:
            check_role(refiner, "refiner", "refiner")
            if refiner.config.vocab_size != hierarchy.K:
                raise ArtifactError(f"the refiner reads vocabulary {refiner.config.vocab_size}, but the hierarchy has K={hierarchy.K}")
            if refiner.config.head_size != hierarchy.V:
                raise ArtifactError(f"the refiner predicts {refiner.config.head_size} codewords, but the codebook has V={hierarchy.V}")
            if coarse.config.num_classes != refiner.config.num_classes:
                raise ArtifactError(f"the coarse model knows {coarse.config.num_classes} classes, the refiner {refiner.config.num_classes}")
            check_grid(refiner, tokenizer, "refiner")
        self.tokenizer, self.hierarchy, self.coarse, self.refiner = tokenizer, hierarchy, coarse, refiner
        self.refiner_within = refiner_within
        self.ar_name = "coarse"
        self.num_classes = coarse.config.num_classes

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> "CTFPipeline":
        run = Path(run_dir)
        tokenizer = load_tokenizer(run / "tokenizer", device)
        hierarchy = load_hierarchy(run / "hierarchy", tokenizer=tokenizer)
        coarse = load_model(run / "coarse", device)
        check_trained_on(run / "coarse", hierarchy)
        within = check_trained_on(run / "refiner", hierarchy, coarse).get("refiner_mask")
        return cls(tokenizer, hierarchy, coarse, load_model(run / "refiner", device), bool(within))

    def save_pretrained(self, run_dir: str | Path) -> None:
        run = Path(run_dir)
        save_tokenizer(self.tokenizer, run / "tokenizer")
        save_hierarchy(self.hierarchy, run / "hierarchy")
        save_model(self.coarse, run / "coarse")
        if self.refiner is not None:
            save_model(self.refiner, run / "refiner")

    def prepare_decode(self, precision: str = "fp32", compile: bool = False, **options: Any) -> None:
        super().prepare_decode(precision, compile=compile, **options)
        if self.refiner is None:
            return
        self.refiner = for_decoding(self.refiner, refiner_precision(precision, compile, self.device, **options))

    def __call__(self, class_labels: int | Sequence[int] | torch.Tensor, *, cfg1: float = DEFAULTS["cfg1"],
                 cfg2: float = DEFAULTS["cfg2"], t1: float = DEFAULTS["t1"], t2: float = DEFAULTS["t2"],
                 top_k1: int = DEFAULTS["top_k1"], top_k2: int = DEFAULTS["top_k2"], top_p1: float = DEFAULTS["top_p1"],
                 top_p2: float = DEFAULTS["top_p2"], refiner_mask: bool = True, refine_steps: int = 1,
                 batch_size: int = 64, generator: torch.Generator | None = None, progress: bool = True,
                 guidance_scale: float | None = None) -> PipelineOutput:
        """Sample one image per label. refiner_mask: keep each fine code inside its coarse cluster.
        refine_steps: stage 2 in this many passes (> 1 needs a refiner trained with --reveal).
        guidance_scale: another name for cfg1 (the stage-1 guidance the paper uses)."""
        labels = self._labels(class_labels)
        cfg1 = cfg1 if guidance_scale is None else guidance_scale
        stage1, stage2 = StageSettings(cfg1, t1, top_k1, top_p1), StageSettings(cfg2, t2, top_k2, top_p2)
        stage1.validate(self.coarse, 1)
        if self.refiner is None:
            def sample(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                coarse = sample_causal(self.coarse, y, stage1, generator, draft=self.draft, lookahead=self.lookahead)
                return coarse, self.hierarchy.random_members(coarse, generator).to(coarse.device)
        else:
            stage2.validate(self.refiner, 2)
            if not refiner_mask and self.refiner_within:
                raise CtfgenError("--no-refiner-mask: this refiner was trained within clusters (ctfgen train's default), "
                                  "so its scores outside a position's cluster mean nothing; sample it with the mask")
            mask = self.hierarchy.member_mask if refiner_mask else None

            def sample(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return sample_ctf(self.coarse, self.refiner, y, stage1, stage2, generator, mask, refine_steps,
                                  self.draft, self.lookahead)
        coarse, fine = in_batches(sample, labels, batch_size, progress, desc="CTF sampling")
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
        self.ar_name = "model"
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
        """Sample one image per label; cfg2/t2/top_k2/top_p2/refiner_mask/refine_steps are accepted and ignored.
        guidance_scale: another name for cfg1."""
        unknown = set(stage2_settings) - {"cfg2", "t2", "top_k2", "top_p2", "refiner_mask", "refine_steps"}
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        labels = self._labels(class_labels)
        cfg1 = cfg1 if guidance_scale is None else guidance_scale
        stage1 = StageSettings(cfg1, t1, top_k1, top_p1)
        stage1.validate(self.model, 1)
        (fine,) = in_batches(lambda y: (sample_baseline(self.model, y, stage1, generator, self.draft, self.lookahead),),
                             labels, batch_size, progress, desc="baseline sampling")
        return self._output(self._grid(fine), labels, batch_size)


PIPELINES: dict[str, type[CTFPipeline] | type[BaselinePipeline]] = {"ctf": CTFPipeline, "baseline": BaselinePipeline}


def load_pipeline(run_dir: str | Path, kind: str = "ctf", device: str | torch.device = "cpu") -> CTFPipeline | BaselinePipeline:
    if kind not in PIPELINES:
        raise CtfgenError(f"--kind must be one of {sorted(PIPELINES)}, got {kind!r}")
    if not (Path(run_dir) / "tokenizer" / CONFIG_NAME).is_file():
        raise ArtifactError(f"{run_dir} has no tokenizer/ folder; is it a ctfgen run folder?")
    return PIPELINES[kind].from_pretrained(run_dir, device)


# --- the `ctfgen sample` command ----------------------------------------------------------------

SAMPLES_KIND = "samples"  # the kind of the folder `ctfgen sample --out-dir` writes (ctfgen.outputs)


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (tokenizer/, hierarchy/, coarse/, refiner/, baseline/)")
    p.add_argument("--kind", choices=sorted(PIPELINES), default="ctf")
    p.add_argument("--classes", type=arg_type(NonNegative), nargs="+", default=[0], help="class ids (default: 0)")
    p.add_argument("--all-classes", action="store_true", help="every class the models know (instead of --classes)")
    p.add_argument("--per-class", type=arg_type(Count), default=8, help="images per class (default: 8)")
    p.add_argument("--out", default=None, help="grid PNG, one row per class (default: RUN/samples-KIND.png)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per image into this folder")
    p.add_argument("--tokens", default=None, help="also write the tokens (and coarse labels, class labels) to this .npz")
    p.add_argument("--npz", default=None, help="write every image to this .npz instead (uint8 arr_0 [N,H,W,C] and "
                   "labels, ADM's layout) batch by batch with flat memory; works under torchrun; a grid only with --out")
    for stage, what in ((1, "stage 1 (coarse AR / baseline)"), (2, "stage 2 (refiner)")):
        for name, text in (("cfg", "guidance scale, 1 = off"), ("t", "temperature"), ("top_k", "top-k, 0 = off"),
                           ("top_p", "top-p, 1 = off")):
            key = f"{name}{stage}"
            p.add_argument(f"--{key.replace('_', '-')}", type=arg_type(SETTING_TYPES[key]), default=DEFAULTS[key],
                           help=f"{what} {text} (default: {DEFAULTS[key]})")
    p.add_argument("--refiner-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each fine code inside its coarse cluster (default: on)")
    p.add_argument("--refine-steps", type=arg_type(Count), default=1, help="stage 2 in this many passes, the most "
                   "confident codes first (> 1 needs a refiner trained with --reveal; default: 1, the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=arg_type(Count), default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays off for many "
                   "images; the first batch waits for the compiler)")
    p.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="fp32",
                   help="weights of the sampling stages: fp32 (exact, the default), fp32-packed (CPU: the same weights "
                   "in oneDNN's layout, about 2x faster), bf16, or int8 (weight-only; CTF's refiner runs in bf16); "
                   "docs/sampling.md gives their speed and effect on FID")
    p.add_argument("--draft", default=None, help="a smaller model folder of the autoregressive stage's role (a coarse "
                   "model for CTF, a baseline for --kind baseline) or a `ctfgen count-draft` folder: sample that stage "
                   "speculatively, the same distribution in fewer passes of the large model")
    p.add_argument("--lookahead", type=arg_type(Count), default=4, help="tokens the draft proposes a pass (default: 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_output_flags(p)  # --force: replace a finished --out-dir


def cmd_sample(args: argparse.Namespace) -> None:
    if args.npz:
        return sample_npz_command(args)
    # every output is checked before the models load and sample
    grid_path = check_output_file(args.out or Path(args.run) / f"samples-{args.kind}.png")
    tokens_path = check_output_file(args.tokens) if args.tokens else None
    png_folder = plan_output(args.out_dir, SAMPLES_KIND, force=args.force) if args.out_dir else None
    device = pick_device(args.device)
    pipe = load_pipeline(args.run, args.kind, device)
    apply_decode_flags(pipe, args)
    labels = sample_labels(args, pipe.num_classes)
    out = pipe(labels, **sample_settings(args), batch_size=args.batch_size,
               generator=make_generator(args.seed, device), progress=not args.quiet)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(out.pixels, nrow=args.per_class).save(grid_path)
    print(f"{len(out.images)} samples ({args.kind}) -> {grid_path}")
    if png_folder:
        def save_pngs(folder: Path) -> None:
            for i, (im, y) in enumerate(zip(out.images, out.class_labels.tolist())):
                im.save(folder / f"{i:05d}_class{y}.png")

        png_folder.write(save_pngs)
        print(f"one PNG per image -> {args.out_dir}")
    if tokens_path:
        arrays = {"tokens": out.tokens.numpy(), "class_labels": out.class_labels.numpy()}
        if out.coarse is not None:
            arrays["coarse"] = out.coarse.numpy()
        tokens_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tokens_path, **arrays)
        print(f"tokens -> {tokens_path}")


def apply_decode_flags(pipe: CTFPipeline | BaselinePipeline, args: argparse.Namespace) -> None:
    """The decode flags: --decode-precision, --compile, --draft and --lookahead."""
    draft = load_draft(args.draft, pipe.device) if args.draft else None
    pipe.prepare_decode(args.decode_precision, args.compile, draft=draft, lookahead=args.lookahead)


def sample_labels(args: argparse.Namespace, num_classes: int) -> torch.Tensor:
    classes = torch.arange(num_classes) if args.all_classes else torch.tensor(args.classes)
    return classes.repeat_interleave(args.per_class)


def sample_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {**{name: getattr(args, name) for name in DEFAULTS}, "refiner_mask": args.refiner_mask,
            "refine_steps": args.refine_steps}


def sample_npz_command(args: argparse.Namespace) -> None:
    """`--npz`: all samples into one .npz, by every process under torchrun (ctfgen.npz_samples)."""
    from .npz_samples import write_sample_npz
    from .distributed import setup_distributed, teardown_distributed

    if args.out_dir or args.tokens:
        raise CtfgenError("--npz writes every image itself; leave out --out-dir and --tokens")
    npz_path = check_output_file(args.npz)
    if npz_path.exists() and not args.force:
        raise CtfgenError(f"{npz_path} exists; --force replaces it")
    grid_path = check_output_file(args.out) if args.out else None
    dist = setup_distributed(args.device)
    try:
        pipe = load_pipeline(args.run, args.kind, dist.device)
        apply_decode_flags(pipe, args)
        labels = sample_labels(args, pipe.num_classes)
        check_class_labels(labels, pipe.num_classes)
        write_sample_npz(pipe, labels, npz_path, sample_settings(args), args.batch_size, args.seed, dist,
                         progress=not args.quiet)
    finally:
        teardown_distributed(dist)
    if dist.is_main:
        print(f"{len(labels)} samples ({args.kind}) -> {npz_path}")
        if grid_path:
            with np.load(npz_path) as f:
                first = uint8_to_float(f["arr_0"][:min(len(labels), 8 * args.per_class)])
            image_grid(first, nrow=args.per_class).save(grid_path)
            print(f"grid of the first images -> {grid_path}")


__all__ = ["BaselinePipeline", "CTFPipeline", "DEFAULTS", "SETTING_TYPES", "PipelineOutput", "add_sample_args", "cmd_sample",
           "load_pipeline", "make_generator", "pil_images"]
