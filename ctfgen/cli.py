"""The `ctfgen` command: thin wrappers over the library, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path

from .artifacts import ArtifactError
from .data.datasets import DataError


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` flag per dataclass field, typed and defaulted from the dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None`
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f"(default: {f.default})")


def dataclass_from_args(cls: type, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# --- tokenizer stage -------------------------------------------------------------------------

def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from .tokenizer.train import TokenizerTrainConfig, train_tokenizer

    report = train_tokenizer(dataclass_from_args(TokenizerTrainConfig, args), resume=args.resume, progress=not args.quiet)
    print_json(report)
    print(f"tokenizer written to {args.out} (report.json, reconstructions.png, logs/ for TensorBoard)")


def cmd_extract(args: argparse.Namespace) -> None:
    from .data.datasets import build_dataset
    from .runtime import pick_device
    from .tokenizer.extract import extract_codes
    from .tokenizer.model import load_tokenizer

    device = pick_device(args.device)
    tok = load_tokenizer(args.tokenizer, device)
    ds = build_dataset(args.data, args.split, tok.config.image_size, tok.config.in_channels,
                       data_dir=args.data_dir, on_error=args.on_error)
    meta = extract_codes(tok, ds, args.out, hflip_copies=args.hflip_copies, batch_size=args.batch_size,
                         num_workers=args.num_workers, dataset_name=args.data, split=args.split, device=device,
                         progress=not args.quiet)
    print(f"{meta['count']} code grids of {meta['grid']} written to {args.out}")


def cmd_import_llamagen(args: argparse.Namespace) -> None:
    if not args.vq and not args.gpt:
        raise SystemExit("import-llamagen: give --vq PATH and/or --gpt PATH")
    out = Path(args.out)
    if args.vq:
        from .tokenizer.llamagen import import_llamagen_vq_file

        model = import_llamagen_vq_file(args.vq, out / "tokenizer" if args.gpt else out, args.image_size)
        print(f"VQ imported: {model.config.codebook_size} x {model.config.codebook_dim} codebook, fingerprint {model.fingerprint}")
    if args.gpt:
        import torch

        from .transformer.llamagen import import_llamagen_gpt
        from .transformer.model import save_model

        ckpt = torch.load(args.gpt, map_location="cpu", weights_only=True)
        model = import_llamagen_gpt(ckpt, args.gpt_model, num_classes=args.num_classes, grid=args.grid,
                                    vocab_size=args.vocab_size)
        save_model(model, out / "baseline" if args.vq else out)
        print(f"GPT imported: {args.gpt_model}, {model.num_params() / 1e6:.1f}M parameters")


# --- hierarchy stage -------------------------------------------------------------------------

def _held_out_images(args: argparse.Namespace, tok, n: int):
    from .data.datasets import build_dataset, take_images

    ds = build_dataset(args.data, args.split, tok.config.image_size, tok.config.in_channels, data_dir=args.data_dir)
    return take_images(ds, n)


def cmd_cluster(args: argparse.Namespace) -> None:
    from .hierarchy import build_hierarchy, save_hierarchy
    from .tokenizer.model import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    k = args.k if args.k == "auto" else _positive_int(args.k)
    images = _held_out_images(args, tok, args.images) if k == "auto" else None
    h = build_hierarchy(tok, args.method, k, seed=args.seed, images=images)
    save_hierarchy(h, args.out)
    sizes = h.sizes
    print(f"{args.method}: K={h.K} clusters of V={h.V} codewords (sizes {int(sizes.min())}..{int(sizes.max())}), "
          f"inertia {h.inertia:.2f}; written to {args.out}")


def cmd_analyze_redundancy(args: argparse.Namespace) -> None:
    from .hierarchy import build_hierarchy, load_hierarchy, write_redundancy_report
    from .tokenizer.model import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    hierarchies = [load_hierarchy(path, tokenizer=tok) for path in args.hierarchy]
    hierarchies += [build_hierarchy(tok, m, _positive_int(k), seed=args.seed) for m in args.methods for k in args.ks]
    if not hierarchies:
        raise ValueError("nothing to analyse: give --hierarchy DIR or --methods/--ks")
    report = write_redundancy_report(args.out, tok, _held_out_images(args, tok, args.images), hierarchies, args.seed)
    print(f"plain reconstruction {report['plain']['psnr_vs_original']:.2f} dB; PSNR against it: "
          f"random swap {report['random']['psnr_vs_plain']:.2f} dB, nearest codeword {report['nearest']['psnr_vs_plain']:.2f} dB")
    for row in report["hierarchies"]:
        print(f"  within-cluster swap, {row['method']} K={row['K']}: {row['within']['psnr_vs_plain']:.2f} dB "
              f"(damage {row['damage_ratio']:.3f} of random)")
    print(f"written to {args.out} (redundancy.json, redundancy.png)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"K must be a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise ValueError(f"K must be >= 1, got {value}")
    return value


def _add_image_source(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--data", default="fashion-mnist", help="held-out images: 'fashion-mnist', an .npz or an image folder")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=n, help=f"number of held-out images (default: {n})")


# --- generator stage -------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> None:
    from .training import TrainConfig, train

    info = train(dataclass_from_args(TrainConfig, args), resume=args.resume, progress=not args.quiet)
    if info.get("interrupted"):
        print(f"interrupted at step {info['step']}; checkpoint {info['checkpoint']} (run again with --resume)")
    elif info:
        print_json(info)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoBudget, run_demo

    budget = dataclass_from_args(DemoBudget, args)
    run_demo(args.run, data_dir=args.data_dir, budget=budget, device=args.device, progress=not args.quiet)


# --- the parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .tokenizer.train import TokenizerTrainConfig
    from .demo import DemoBudget
    from .training import TrainConfig

    parser = argparse.ArgumentParser(prog="ctfgen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run every stage on Fashion-MNIST (reuses and resumes earlier runs)")
    p.add_argument("--run", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    add_dataclass_args(p, DemoBudget)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-tokenizer", help="train a VQ tokenizer on images")
    add_dataclass_args(p, TokenizerTrainConfig)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("extract", help="encode a dataset into a memory-mapped code array")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--out", required=True, help="codes folder to write")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist', an .npz file or an image folder")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--split", default="train")
    p.add_argument("--hflip-copies", action="store_true", help="also store the codes of mirrored images")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip", help="unreadable image files (default: skip)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("cluster", help="cluster the tokenizer's codebook into K coarse labels")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--method", default="kmeans", choices=["kmeans", "balanced", "agglomerative", "random"])
    p.add_argument("--k", default="512", help="number of clusters, or 'auto' (smallest K whose within-cluster swaps "
                   "stay within the tokenizer's own reconstruction error on held-out images; see docs/hierarchy.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="hierarchy folder to write")
    _add_image_source(p, 1000)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("analyze-redundancy", help="are same-cluster tokens interchangeable? (the paper's Fig. 1b)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--hierarchy", nargs="*", default=[], help="hierarchy folders to test")
    p.add_argument("--methods", nargs="*", default=[], help="also cluster with these methods ...")
    p.add_argument("--ks", nargs="*", default=[], help="... at these K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for redundancy.json and redundancy.png")
    _add_image_source(p, 1000)
    p.set_defaults(func=cmd_analyze_redundancy)

    p = sub.add_parser("train", help="train the coarse AR model, the refiner or the baseline on extracted codes")
    add_dataclass_args(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    from .bench import add_bench_args, cmd_bench
    from .evaluate import add_evaluate_args, cmd_evaluate
    from .metrics.classifier import add_classifier_args, cmd_train_classifier
    from .pipeline import add_sample_args, cmd_sample

    # stages whose flags live beside their library code
    for name, help_text, add_args, func in [
        ("sample", "sample images from a run (CTF or the baseline)", add_sample_args, cmd_sample),
        ("evaluate", "FID/IS/precision/recall of a PNG folder, an .npz or a run's samples", add_evaluate_args, cmd_evaluate),
        ("bench", "CTF against the baseline on Fashion-MNIST: quality, compute, speed (BENCHMARKS.md)", add_bench_args, cmd_bench),
        ("train-classifier", "train the dataset's own classifier (the 'domain' feature extractor)", add_classifier_args,
         cmd_train_classifier),
    ]:
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("import-llamagen", help="convert LlamaGen's released checkpoints")
    p.add_argument("--vq", help="LlamaGen VQ checkpoint (e.g. vq_ds16_c2i.pt)")
    p.add_argument("--gpt", help="LlamaGen class-to-image GPT checkpoint (e.g. c2i_B_256.pt)")
    p.add_argument("--image-size", type=int, default=256, help="resolution the VQ model works at")
    p.add_argument("--gpt-model", default="GPT-B", help="GPT-B, GPT-L, GPT-XL or GPT-XXL")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--grid", type=int, default=16, help="token grid side (16 for 256 px with VQ-16)")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--out", required=True, help="output folder (with both: OUT/tokenizer and OUT/baseline)")
    p.set_defaults(func=cmd_import_llamagen)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"ctfgen {args.command}: interrupted (a checkpoint was saved where the stage supports it; "
              "run the same command again to resume)", file=sys.stderr)
        raise SystemExit(130) from None
    except (DataError, ArtifactError, ValueError, FileNotFoundError) as e:
        # bad input: one clear line instead of a traceback (use -v to see where it came from)
        if args.verbose:
            raise
        print(f"ctfgen {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
