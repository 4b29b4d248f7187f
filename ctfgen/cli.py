"""The `ctfgen` command: thin wrappers over the library, one subcommand per pipeline stage.

Every flag is checked while the command line is parsed (ctfgen.arguments), every output folder is
opened through ctfgen.outputs, and every error the library raises for bad input (`CtfgenError`)
ends as one `error:` line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .arguments import Count, NonNegative, Parser, add_dataclass_args, arg_type, dataclass_from_args
from .errors import CtfgenError, Stopped
from .outputs import add_output_flags


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# --- tokenizer stage -------------------------------------------------------------------------

def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from .tokenizer.train import TokenizerTrainConfig, train_tokenizer

    report = train_tokenizer(dataclass_from_args(TokenizerTrainConfig, args), resume=args.resume, force=args.force,
                             progress=not args.quiet)
    print_json(report)
    print(f"tokenizer written to {args.out} (report.json, reconstructions.png, logs/ for TensorBoard)")


def cmd_extract(args: argparse.Namespace) -> None:
    from .data.codes import CODES_KIND
    from .data.datasets import build_dataset
    from .outputs import plan_output
    from .distributed import setup_distributed, teardown_distributed
    from .tokenizer.extract import extract_codes
    from .tokenizer.model import load_tokenizer

    plan_output(args.out, CODES_KIND, force=args.force)  # refuse before listing a large dataset (extract plans again)
    tok = load_tokenizer(args.tokenizer)
    ds = build_dataset(args.data, args.split, tok.config.image_size, tok.config.in_channels,
                       data_dir=args.data_dir, on_error=args.on_error, views=args.views)
    dist = setup_distributed(args.device)  # under torchrun each rank encodes its share
    try:
        meta = extract_codes(tok, ds, args.out, views=args.views, batch_size=args.batch_size,
                             num_workers=args.num_workers, dataset_name=args.data, split=args.split,
                             device=dist.device, progress=not args.quiet, force=args.force, dist=dist)
    finally:
        teardown_distributed(dist)
    if dist.is_main:
        print(f"{meta['items']} items x {len(meta['views'])} views = {meta['count']} code grids of {meta['grid']} "
              f"written to {args.out}")


def cmd_import_llamagen(args: argparse.Namespace) -> None:
    from .outputs import open_run_folder, plan_output
    from .runtime import load_torch_file
    from .tokenizer.llamagen import import_llamagen_vq
    from .tokenizer.model import TOKENIZER_KIND, save_tokenizer
    from .transformer.llamagen import import_llamagen_gpt
    from .transformer.model import ARTIFACT_KIND, save_model

    if not args.vq and not args.gpt:
        raise CtfgenError("give --vq PATH and/or --gpt PATH")
    out = Path(args.out)
    vq_out = plan_output(out / "tokenizer" if args.gpt else out, TOKENIZER_KIND, force=args.force) if args.vq else None
    gpt_out = plan_output(out / "baseline" if args.vq else out, ARTIFACT_KIND, force=args.force) if args.gpt else None
    if args.vq and args.gpt:
        open_run_folder(out)
    # LlamaGen's checkpoints may carry its argparse Namespace: the one class allowed besides tensors
    allowed = (argparse.Namespace,)
    if vq_out:
        model = import_llamagen_vq(load_torch_file(args.vq, allowed=allowed), args.image_size)
        vq_out.write(lambda folder: save_tokenizer(model, folder))
        print(f"VQ imported: {model.config.codebook_size} x {model.config.codebook_dim} codebook, fingerprint {model.fingerprint}")
    if gpt_out:
        model = import_llamagen_gpt(load_torch_file(args.gpt, allowed=allowed), args.gpt_model,
                                    num_classes=args.num_classes, grid=args.grid, vocab_size=args.vocab_size)
        gpt_out.write(lambda folder: save_model(model, folder))
        print(f"GPT imported: {args.gpt_model}, {model.num_params() / 1e6:.1f}M parameters")


# --- hierarchy stage -------------------------------------------------------------------------

def _held_out_images(args: argparse.Namespace, tok, n: int):
    from .data.datasets import build_dataset, take_images

    ds = build_dataset(args.data, args.split, tok.config.image_size, tok.config.in_channels, data_dir=args.data_dir)
    return take_images(ds, n)


def cmd_cluster(args: argparse.Namespace) -> None:
    from .hierarchy import build_hierarchy, save_hierarchy
    from .hierarchy.artifact import HIERARCHY_KIND
    from .outputs import plan_output
    from .tokenizer.model import load_tokenizer

    output = plan_output(args.out, HIERARCHY_KIND, force=args.force)
    tok = load_tokenizer(args.tokenizer)
    images = _held_out_images(args, tok, args.images) if args.k == "auto" else None
    h = build_hierarchy(tok, args.method, args.k, seed=args.seed, images=images)
    output.write(lambda folder: save_hierarchy(h, folder))
    sizes = h.sizes
    print(f"{args.method}: K={h.K} clusters of V={h.V} codewords (sizes {int(sizes.min())}..{int(sizes.max())}), "
          f"inertia {h.inertia:.2f}; written to {args.out}")


def cmd_analyze_redundancy(args: argparse.Namespace) -> None:
    from .hierarchy import build_hierarchy, load_hierarchy, write_redundancy_report
    from .hierarchy.redundancy import REPORT_KIND
    from .outputs import plan_output
    from .tokenizer.model import load_tokenizer

    if not args.hierarchy and not (args.methods and args.ks):
        raise CtfgenError("nothing to analyse: give --hierarchy DIR, or --methods with --ks")
    output = plan_output(args.out, REPORT_KIND, force=args.force)
    tok = load_tokenizer(args.tokenizer)
    hierarchies = [load_hierarchy(path, tokenizer=tok) for path in args.hierarchy]
    hierarchies += [build_hierarchy(tok, m, k, seed=args.seed) for m in args.methods for k in args.ks]
    images = _held_out_images(args, tok, args.images)
    report = output.write(lambda folder: write_redundancy_report(folder, tok, images, hierarchies, args.seed))
    print(f"plain reconstruction {report['plain']['psnr_vs_original']:.2f} dB; PSNR against it: "
          f"random swap {report['random']['psnr_vs_plain']:.2f} dB, nearest codeword {report['nearest']['psnr_vs_plain']:.2f} dB")
    for row in report["hierarchies"]:
        print(f"  within-cluster swap, {row['method']} K={row['K']}: {row['within']['psnr_vs_plain']:.2f} dB "
              f"(damage {row['damage_ratio']:.3f} of random)")
    print(f"written to {args.out} (redundancy.json, redundancy.png)")


def cluster_count(text: str) -> int | str:
    """--k: a positive integer or 'auto'."""
    if text == "auto":
        return text
    try:
        return arg_type(Count)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"K must be a positive integer or 'auto', got {text!r}") from None


def _add_image_source(p: argparse.ArgumentParser, n: int) -> None:
    p.add_argument("--data", default="fashion-mnist", help="held-out images: 'fashion-mnist', an .npz or an image folder")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=arg_type(Count), default=n, help=f"number of held-out images (default: {n})")


# --- generator stage -------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> None:
    from .training import TrainConfig, train

    info = train(dataclass_from_args(TrainConfig, args), resume=args.resume, force=args.force, progress=not args.quiet)
    if info:
        print_json(info)


def cmd_count_draft(args: argparse.Namespace) -> None:
    from .count_draft import DRAFT_KIND, count_draft_from_codes
    from .hierarchy import load_hierarchy
    from .outputs import plan_output

    output = plan_output(args.out, DRAFT_KIND, force=args.force)
    hierarchy = load_hierarchy(args.hierarchy) if args.hierarchy else None
    draft = count_draft_from_codes(args.codes, hierarchy)
    output.write(draft.save)
    pairs = sum(len(order.tokens) for order in draft.orders)
    print(f"counts of {draft.info['items']} grids over {draft.config.vocab_size} "
          f"{'coarse labels' if hierarchy else 'codewords'} ({pairs} context-token pairs) written to {args.out}; "
          f"sample with --draft {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoBudget, run_demo

    budget = dataclass_from_args(DemoBudget, args)
    run_demo(args.run, data_dir=args.data_dir, budget=budget, device=args.device, progress=not args.quiet, data=args.data)


# --- the parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .tokenizer.train import TokenizerTrainConfig
    from .demo import DemoBudget
    from .training import TrainConfig

    parser = Parser(prog="ctfgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and a traceback with every error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run every stage on Fashion-MNIST or --data (reuses and resumes earlier runs)")
    p.add_argument("--run", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist', an .npz or an image folder with one "
                   "sub-folder per class (a set without a test split gets a seeded, class-balanced 10%% hold-out)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    add_dataclass_args(p, DemoBudget)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-tokenizer", help="train a VQ tokenizer on images")
    add_dataclass_args(p, TokenizerTrainConfig)
    add_output_flags(p, resumable=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("extract", help="encode a dataset into a memory-mapped code array")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--out", required=True, help="codes folder to write")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist', an .npz file or an image folder")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--split", default="train")
    p.add_argument("--views", choices=["none", "flip", "ten-crop"], default="none",
                   help="store several views of every image, training draws one at random: flip (the image and its "
                        "mirror) or ten-crop (LlamaGen's: corner and centre crops of a 1.1x centre crop, and mirrors)")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip", help="unreadable image files (default: skip)")
    p.add_argument("--batch-size", type=arg_type(Count), default=256)
    p.add_argument("--num-workers", type=arg_type(NonNegative), default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes decoding images (default: min(4, CPU cores))")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    add_output_flags(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("cluster", help="cluster the tokenizer's codebook into K coarse labels")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--method", default="kmeans", choices=["kmeans", "balanced", "agglomerative", "random"])
    p.add_argument("--k", type=cluster_count, default=512, help="number of clusters, or 'auto' (smallest K whose "
                   "within-cluster swaps stay within the tokenizer's own reconstruction error on held-out images; "
                   "see docs/hierarchy.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="hierarchy folder to write")
    _add_image_source(p, 1000)
    add_output_flags(p)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("analyze-redundancy", help="are same-cluster tokens interchangeable? (the paper's Fig. 1b)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--hierarchy", nargs="*", default=[], help="hierarchy folders to test")
    p.add_argument("--methods", nargs="*", default=[], choices=["kmeans", "balanced", "agglomerative", "random"],
                   help="also cluster with these methods ...")
    p.add_argument("--ks", nargs="*", default=[], type=arg_type(Count), help="... at these K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for redundancy.json and redundancy.png")
    _add_image_source(p, 1000)
    add_output_flags(p)
    p.set_defaults(func=cmd_analyze_redundancy)

    p = sub.add_parser("train", help="train the coarse AR model, the refiner or the baseline on extracted codes")
    add_dataclass_args(p, TrainConfig)
    add_output_flags(p, resumable=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("count-draft", help="count a codes folder's tokens by class, position and neighbours: a draft "
                       "for speculative sampling (`sample --draft`) that needs no network pass")
    p.add_argument("--codes", required=True, help="training codes folder")
    p.add_argument("--hierarchy", default=None, help="count coarse labels of this hierarchy (a draft for CTF's stage "
                   "1); without it, codewords (a draft for the baseline)")
    p.add_argument("--out", required=True, help="draft folder to write")
    add_output_flags(p)
    p.set_defaults(func=cmd_count_draft)

    from .bench import add_bench_args, cmd_bench
    from .evaluate import add_evaluate_args, cmd_evaluate
    from .metrics.classifier import add_classifier_args, cmd_train_classifier
    from .pipeline import add_sample_args, cmd_sample
    from .serve import add_serve_args, cmd_serve

    # stages whose flags live beside their library code
    for name, help_text, add_args, func in [
        ("sample", "sample images from a run (CTF or the baseline)", add_sample_args, cmd_sample),
        ("evaluate", "FID/IS/precision/recall of a PNG folder, an .npz or a run's samples", add_evaluate_args, cmd_evaluate),
        ("bench", "CTF against the baseline on Fashion-MNIST or --data: quality, compute, speed (BENCHMARKS.md)", add_bench_args, cmd_bench),
        ("train-classifier", "train the dataset's own classifier (the 'domain' feature extractor)", add_classifier_args,
         cmd_train_classifier),
        ("serve", "a web demo of a run: CTF and the baseline side by side, the coarse stage shown (needs .[demo])",
         add_serve_args, cmd_serve),
    ]:
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("import-llamagen", help="convert LlamaGen's released checkpoints")
    p.add_argument("--vq", help="LlamaGen VQ checkpoint (e.g. vq_ds16_c2i.pt)")
    p.add_argument("--gpt", help="LlamaGen class-to-image GPT checkpoint (e.g. c2i_B_256.pt)")
    p.add_argument("--image-size", type=arg_type(Count), default=256, help="resolution the VQ model works at")
    p.add_argument("--gpt-model", default="GPT-B", help="GPT-B, GPT-L, GPT-XL or GPT-XXL")
    p.add_argument("--num-classes", type=arg_type(Count), default=1000)
    p.add_argument("--grid", type=arg_type(Count), default=16, help="token grid side (16 for 256 px with VQ-16)")
    p.add_argument("--vocab-size", type=arg_type(Count), default=16384)
    p.add_argument("--out", required=True, help="output folder (with both: OUT/tokenizer and OUT/baseline)")
    add_output_flags(p)
    p.set_defaults(func=cmd_import_llamagen)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prog = f"ctfgen {args.command}"
    try:
        args.func(args)
    except Stopped as e:
        again = "with --resume " if hasattr(args, "resume") else ""
        print(f"{prog}: {e}; run the same command again {again}to continue", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (a checkpoint was saved where the stage supports it; "
              "run the same command again to resume)", file=sys.stderr)
        raise SystemExit(130) from None
    except (CtfgenError, OSError) as e:
        # bad input (CtfgenError) or a file system that refused (OSError): one line, no traceback (-v shows it)
        if args.verbose:
            raise
        message = " ".join(str(e).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, CtfgenError) else 1) from None


if __name__ == "__main__":
    main()
