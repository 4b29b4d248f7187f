"""`ctfgen evaluate`: score a set of generated images against a dataset split.

The set is a folder of PNGs (searched recursively; a class comes from a numeric sub-folder name
or from a `_classN` file-name suffix as `ctfgen sample --out-dir` writes), an .npz with `images` (or ADM's `arr_0`)
uint8 [N,H,W(,C)] (and optionally `labels` / `class_labels`), or a run folder, sampled N per class
with a fixed seed. Every figure is labelled with its feature extractor (`metric_label`).

    result = evaluate_source("runs/fm", extractors=[("domain", {"path": "runs/fm/classifier"})], kind="ctf")
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .arguments import Count, arg_type
from .data.transforms import to_uint8, uint8_to_float
from .artifacts import read_npz, write_json
from .errors import CtfgenError
from .metrics import FeatureExtractor, evaluate_features, extract_features, get_extractor, metric_label, reference_stats
from .metrics.fid import load_stats_file, save_stats_file
from .outputs import check_output_file
from .pipeline import DEFAULTS, SETTING_TYPES, BaselinePipeline, CTFPipeline, load_pipeline, make_generator
from .runtime import pick_device

log = logging.getLogger(__name__)
_CLASS_SUFFIX = re.compile(r"_class(\d+)$")


@dataclass
class ImageSet:
    images: torch.Tensor  # float [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None  # long [N] conditioning classes, when known
    source: dict[str, Any] = field(default_factory=dict)  # how the set was made (recorded in the JSON)


# --- loading ----------------------------------------------------------------------------------------

def _label_of(path: Path, root: Path) -> int | None:
    match = _CLASS_SUFFIX.search(path.stem)
    if match:
        return int(match.group(1))
    parent = path.parent.relative_to(root).parts
    return int(parent[-1]) if parent and parent[-1].isdigit() else None


def _read_png(path: Path) -> np.ndarray:
    """Grayscale files stay one channel; everything else becomes RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L" if im.mode in ("L", "1", "I", "I;16") else "RGB"))


def load_png_folder(folder: str | Path, on_error: str = "skip") -> ImageSet:
    """Every .png under `folder`; an unreadable file is skipped with a warning (on_error="skip") or is an error."""
    if on_error not in ("skip", "raise"):
        raise CtfgenError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    root = Path(folder)
    paths, arrays, skipped = [], [], []
    for path in sorted(root.rglob("*.png")):
        try:
            arrays.append(_read_png(path))
            paths.append(path)
        except (OSError, ValueError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated data, bad modes
            if on_error == "raise":
                raise CtfgenError(f"unreadable image {path}: {e} (--on-error skip leaves such files out)") from None
            skipped.append(path)
    if skipped:
        log.warning("skipped %d unreadable .png file(s) in %s, e.g. %s", len(skipped), root, skipped[0])
    if not arrays:
        raise CtfgenError(f"{root} holds no readable .png files")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CtfgenError(f"{root}: images of different shapes {sorted(shapes)}")
    labels = [_label_of(p, root) for p in paths]
    known = None if any(y is None for y in labels) else torch.tensor(labels, dtype=torch.long)
    return ImageSet(uint8_to_float(np.stack(arrays)), known, {"type": "png-folder", "path": str(root), "files": len(paths),
                                                              "skipped": len(skipped)})


def load_npz(path: str | Path) -> ImageSet:
    with read_npz(path) as data:
        key = next((k for k in ("images", "arr_0") if k in data), None)  # arr_0: ADM's sample batches
        if key is None:
            raise CtfgenError(f"{path} has no 'images' or 'arr_0' array (found {sorted(data.files)})")
        images = data[key]
        if images.dtype != np.uint8:
            raise CtfgenError(f"{path}: '{key}' must be uint8 [N,H,W(,C)], got {images.dtype}")
        key = next((k for k in ("labels", "class_labels") if k in data), None)
        labels = torch.from_numpy(data[key].astype(np.int64)) if key else None
    return ImageSet(uint8_to_float(images), labels, {"type": "npz", "path": str(path), "images": len(images)})


def sample_with(pipe: CTFPipeline | BaselinePipeline, per_class: int, seed: int = 0, batch_size: int = 64,
                progress: bool = False, **settings: Any) -> ImageSet:
    """A class-balanced set: `per_class` images of every class, one generator seeded with `seed`."""
    labels = torch.arange(pipe.num_classes).repeat_interleave(per_class)
    settings = {**DEFAULTS, **settings}
    out = pipe(labels, generator=make_generator(seed, pipe.device), batch_size=batch_size, progress=progress, **settings)
    source = {"type": "run", "kind": "ctf" if isinstance(pipe, CTFPipeline) else "baseline", "per_class": per_class,
              "seed": seed, "batch_size": batch_size, "settings": settings}
    return ImageSet(out.pixels, labels, source)


def sample_run(run: str | Path, kind: str = "ctf", per_class: int = 100, seed: int = 0, batch_size: int = 64,
               device: str | torch.device = "cpu", progress: bool = False, **settings: Any) -> ImageSet:
    images = sample_with(load_pipeline(run, kind, device), per_class, seed, batch_size, progress, **settings)
    images.source["path"] = str(run)
    return images


def load_source(source: str | Path, on_error: str = "skip", **sample_kw: Any) -> ImageSet:
    """A run folder (has tokenizer/), an .npz, or a folder of PNGs (`on_error` for its unreadable files)."""
    path = Path(source)
    if path.suffix == ".npz":
        return load_npz(path)
    if (path / "tokenizer").is_dir():
        return sample_run(path, **sample_kw)
    if path.is_dir():
        return load_png_folder(path, on_error)
    raise CtfgenError(f"{source}: not a run folder, an .npz or a folder of PNGs")


# --- scoring ---------------------------------------------------------------------------------------

@dataclass
class Reference:
    dataset: str = "fashion-mnist"
    split: str = "test"
    n: int | None = None  # reference images (None: the whole split)
    data_dir: str | None = None
    cache_dir: str | None = None
    stats_file: str | None = None  # precomputed statistics (.npz) instead of the split's
    save_stats: str | None = None  # also write the statistics used to this .npz


def class_consistency(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples the classifier assigns to the class they were conditioned on."""
    return (logits.argmax(dim=1) == labels).float().mean().item()


def score(images: torch.Tensor, labels: torch.Tensor | None, extractor: FeatureExtractor, ref: Reference,
          device: str | torch.device | None = None) -> dict[str, Any]:
    """FID / IS / precision / recall with one extractor (`get_extractor`), + class consistency for `domain`.
    The extractor runs on `device` (default: where the images are), for the reference set too. Images are
    quantised to uint8 first, as saving them as PNG would (a no-op for images read from files)."""
    device = device if device is not None else images.device
    images = uint8_to_float(to_uint8(images))
    extractor.to(device)
    if ref.stats_file:
        stats = load_stats_file(ref.stats_file, extractor)
    else:
        stats = reference_stats(extractor, ref.dataset, ref.split, resolution=images.shape[-1], channels=images.shape[1],
                                n=ref.n, cache_dir=ref.cache_dir, data_dir=ref.data_dir)
    if ref.save_stats:
        save_stats_file(ref.save_stats, stats, extractor)
    start = time.perf_counter()
    features, logits = extract_features(extractor, images)
    result = evaluate_features(features, logits, stats, extractor.name)
    result["ref_images"] = stats.meta.get("count")
    result["extract_s"] = round(time.perf_counter() - start, 2)
    if extractor.name == "domain" and labels is not None and logits is not None:
        result["class_consistency"] = class_consistency(logits, labels)
        result["class_consistency_label"] = f"class consistency ({extractor.name} classifier)"
    return result


def evaluate_set(images: ImageSet, extractors: dict[str, FeatureExtractor], ref: Reference,
                 device: str | torch.device | None = None) -> dict[str, Any]:
    return {name: score(images.images, images.labels, extractor, ref, device) for name, extractor in extractors.items()}


def record(result_by_extractor: dict[str, Any], images: ImageSet, ref: Reference, command: str | None = None) -> dict[str, Any]:
    """The metrics JSON: figures plus everything needed to reproduce them."""
    return {"command": command or " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "samples": len(images.images), "source": images.source, "reference": asdict(ref),
            "labels": {name: {"fid": metric_label(name), "is": metric_label(name, "IS")} for name in result_by_extractor},
            "metrics": result_by_extractor}


def evaluate_source(source: str | Path, extractors: list[tuple[str, dict[str, Any]]], ref: Reference | None = None,
                    out: str | Path | None = None, on_error: str = "skip", **sample_kw: Any) -> dict[str, Any]:
    ref = ref or Reference()
    # the output and the extractors' weights are checked before the (possibly long) sampling
    out = check_output_file(out) if out is not None else None
    if ref.save_stats:
        check_output_file(ref.save_stats)
        if len(extractors) != 1:
            raise CtfgenError("--save-ref-stats writes one extractor's statistics: give exactly one --extractor")
    built = {name: get_extractor(name, **kw) for name, kw in extractors}
    images = load_source(source, on_error, **sample_kw)
    result = record(evaluate_set(images, built, ref, sample_kw.get("device")), images, ref)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
    return result


# --- the `ctfgen evaluate` command -----------------------------------------------------------------

def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a folder of PNGs, an .npz with 'images' (or ADM's 'arr_0'), or a run folder (sampled)")
    p.add_argument("--out", default="metrics.json", help="metrics JSON to write (default: metrics.json)")
    p.add_argument("--extractor", action="append", choices=("effnet-lite0", "domain", "inception"),
                   help="feature extractor, repeatable (default: effnet-lite0)")
    p.add_argument("--classifier", default=None, help="domain classifier folder (for --extractor domain)")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05 file (for --extractor inception)")
    p.add_argument("--data", default="fashion-mnist", help="reference dataset (default: fashion-mnist)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--ref-images", type=arg_type(Count), default=None, help="reference images (default: the whole split)")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="unreadable .png files in SOURCE: leave them out with a warning, or stop (default: skip)")
    p.add_argument("--cache-dir", default=None, help="reference-statistics cache (default: $CTFGEN_CACHE or ~/.cache)")
    p.add_argument("--ref-stats", default=None, help="precomputed reference statistics .npz: mu and sigma (pytorch-fid), "
                   "plus arr_0 images (ADM's reference batches) or features (ctfgen's) for precision/recall")
    p.add_argument("--save-ref-stats", default=None, help="also write the reference statistics used to this .npz")
    g = p.add_argument_group("sampling a run")
    g.add_argument("--kind", choices=("ctf", "baseline"), default="ctf")
    g.add_argument("--per-class", type=arg_type(Count), default=100)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=arg_type(Count), default=64)
    g.add_argument("--device", default="auto")
    for name, value in DEFAULTS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=arg_type(SETTING_TYPES[name]), default=value)
    g.add_argument("--refiner-mask", action=argparse.BooleanOptionalAction, default=True)


def extractor_specs(names: list[str] | None, classifier: str | None, inception: str | None) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for name in names or ["effnet-lite0"]:
        kw: dict[str, Any] = {}
        if name == "domain":
            if not classifier:
                raise CtfgenError("--extractor domain needs --classifier DIR (ctfgen train-classifier)")
            kw["path"] = classifier
        if name == "inception":
            if not inception:
                raise CtfgenError("--extractor inception needs --inception-weights FILE")
            kw["path"] = inception
        specs.append((name, kw))
    return specs


def cmd_evaluate(args: argparse.Namespace) -> None:
    specs = extractor_specs(args.extractor, args.classifier, args.inception_weights)
    ref = Reference(args.data, args.split, args.ref_images, args.data_dir, args.cache_dir, args.ref_stats,
                    args.save_ref_stats)
    settings = {name: getattr(args, name) for name in DEFAULTS}
    result = evaluate_source(args.source, specs, ref, args.out, args.on_error, kind=args.kind, per_class=args.per_class, seed=args.seed,
                             batch_size=args.batch_size, device=pick_device(args.device), refiner_mask=args.refiner_mask, **settings)
    for name, m in result["metrics"].items():
        line = f"{m['fid_label']}: {m['fid']:.2f}"
        if m["precision"] is not None:
            line += f", precision {m['precision']:.3f}, recall {m['recall']:.3f}"
        if "is_mean" in m:
            line += f", {m['is_label']}: {m['is_mean']:.2f} +- {m['is_std']:.2f}"
        if "class_consistency" in m:
            line += f", class consistency {100 * m['class_consistency']:.1f}%"
        print(line)
    print(f"{result['samples']} images; metrics -> {args.out}")


__all__ = ["ImageSet", "Reference", "add_evaluate_args", "class_consistency", "cmd_evaluate", "evaluate_set",
           "evaluate_source", "extractor_specs", "load_npz", "load_png_folder", "load_source", "record", "sample_run", "sample_with",
           "score", "uint8_to_float"]
