"""The main job: every stage that exists so far on Fashion-MNIST, reusing whatever a previous run left.

Each stage is skipped when its artifact is complete and resumed when it was interrupted, so a
second `ctfgen demo` only prints where things are.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import CONFIG_NAME, read_json
from .data.datasets import build_dataset
from .runtime import pick_device
from .tokenizer.extract import extract_codes
from .tokenizer.model import load_tokenizer
from .tokenizer.train import TokenizerTrainConfig, train_tokenizer


def run_demo(run_dir: str | Path = "runs/demo", data_dir: str | None = None, tokenizer_steps: int | None = None,
             device: str = "auto", progress: bool = True) -> dict:
    run = Path(run_dir)
    tok_dir = run / "tokenizer"
    print(f"[1/2] tokenizer -> {tok_dir}")
    if (tok_dir / CONFIG_NAME).is_file() and (tok_dir / "report.json").is_file():
        report = read_json(tok_dir / "report.json")
        print("      already trained; reusing it")
    else:
        cfg = TokenizerTrainConfig(out=str(tok_dir), data_dir=data_dir, device=device)
        if tokenizer_steps:
            cfg.steps = tokenizer_steps
        report = train_tokenizer(cfg, resume=True, progress=progress)

    tok = load_tokenizer(tok_dir, pick_device(device))
    for split in ("train", "test"):
        out = run / f"codes-{split}"
        print(f"[2/2] codes ({split}) -> {out}")
        meta_path = out / "meta.json"
        if meta_path.is_file() and read_json(meta_path).get("tokenizer_fingerprint") == tok.fingerprint:
            print("      already extracted; reusing them")
            continue
        ds = build_dataset("fashion-mnist", split, tok.config.image_size, tok.config.in_channels, data_dir=data_dir)
        extract_codes(tok, ds, out, dataset_name="fashion-mnist", split=split, device=tok.codebook.device,
                      progress=progress)

    print(f"\ntokenizer on the Fashion-MNIST test split: PSNR {report['psnr_db']:.2f} dB, "
          f"codebook usage {report['codebook_usage_pct']:.1f}% of {report['codebook_size']}, "
          f"perplexity {report['perplexity']:.0f}")
    print(f"reconstructions: {tok_dir / 'reconstructions.png'} (top: originals, bottom: reconstructions)")
    print(f"report: {tok_dir / 'report.json'}; TensorBoard logs: tensorboard --logdir {run}")
    return report
