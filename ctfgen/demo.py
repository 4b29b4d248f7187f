"""The main job: every stage of the pipeline on Fashion-MNIST, at a budget that fits a 2-core CPU.

Each stage writes one folder of the run and is skipped when that folder is complete, so a second
`ctfgen demo` only samples; an interrupted stage resumes from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifacts import CONFIG_NAME, read_json, write_json
from .data.datasets import build_dataset, take_images
from .runtime import pick_device


@dataclass
class DemoBudget:
    # sized so that every stage together fits in about 15 minutes on a 2-core CPU
    tokenizer_steps: int = 500
    transformer_steps: int = 300
    transformer_size: str = "small"
    batch_size: int = 64
    lr: float = 1e-3
    auto_k_images: int = 500
    classifier_epochs: int = 1
    classifier_images: int = 20000  # training images of the domain classifier
    samples_per_class: int = 50  # scored with the domain classifier's features


def _done(folder: Path, marker: str = CONFIG_NAME) -> bool:
    return (folder / marker).is_file()


def _train_tokenizer(run: Path, budget: DemoBudget, data_dir: str | None, device: str, progress: bool) -> None:
    from .tokenizer.train import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(out=str(run / "tokenizer"), data_dir=data_dir, device=device, steps=budget.tokenizer_steps)
    train_tokenizer(cfg, resume=True, progress=progress)


def _extract(run: Path, split: str, data_dir: str | None, device: str, progress: bool) -> None:
    from .tokenizer.extract import extract_codes
    from .tokenizer.model import load_tokenizer

    tok = load_tokenizer(run / "tokenizer", pick_device(device))
    ds = build_dataset("fashion-mnist", split, tok.config.image_size, tok.config.in_channels, data_dir=data_dir)
    extract_codes(tok, ds, run / f"codes-{split}", dataset_name="fashion-mnist", split=split,
                  device=tok.codebook.device, progress=progress)


def _cluster(run: Path, budget: DemoBudget, data_dir: str | None) -> None:
    from .hierarchy import build_hierarchy, save_hierarchy
    from .tokenizer.model import load_tokenizer

    tok = load_tokenizer(run / "tokenizer")
    ds = build_dataset("fashion-mnist", "test", tok.config.image_size, tok.config.in_channels, data_dir=data_dir)
    # held-out images from the end of the test split, away from the first ones used for reports
    images = take_images(ds, len(ds))[-budget.auto_k_images:]
    h = build_hierarchy(tok, "kmeans", "auto", images=images)
    save_hierarchy(h, run / "hierarchy")
    print(f"      K = {h.K} chosen automatically ({h.V} codewords)")


def _train_transformer(run: Path, role: str, budget: DemoBudget, device: str, progress: bool) -> None:
    from .training import TrainConfig, train

    cfg = TrainConfig(role=role, size=budget.transformer_size, codes=str(run / "codes-train"),
                      hierarchy=None if role == "baseline" else str(run / "hierarchy"), out=str(run / role),
                      val_codes=str(run / "codes-test"), steps=budget.transformer_steps, batch_size=budget.batch_size,
                      lr=budget.lr, warmup_steps=min(100, budget.transformer_steps // 10), lr_decay="cosine",
                      device=device)
    info = train(cfg, resume=True, progress=progress)
    if info.get("interrupted"):
        raise KeyboardInterrupt


def _train_classifier(run: Path, budget: DemoBudget, data_dir: str | None, device: str) -> None:
    from .metrics.classifier import train_classifier

    info = train_classifier(out=str(run / "classifier"), epochs=budget.classifier_epochs, limit=budget.classifier_images,
                            data_dir=data_dir, device=device)
    print(f"      test accuracy {100 * info.get('test_accuracy', float('nan')):.1f}%")


def sample_and_score(run: Path, budget: DemoBudget, data_dir: str | None, device: str, progress: bool) -> dict:
    """A sample grid per class for CTF and for the baseline, and a class-balanced set of each scored
    in the domain classifier's feature space (FID/IS/precision/recall) plus class consistency
    (how often the classifier names the class the sample was drawn for)."""
    from .data.transforms import image_grid
    from .evaluate import Reference, sample_with, score
    from .pipeline import load_pipeline

    dev = pick_device(device)
    ref = Reference("fashion-mnist", "test", data_dir=data_dir, cache_dir=str(run / "cache"))
    metrics = {}
    for kind in ("ctf", "baseline"):
        pipe = load_pipeline(run, kind, dev)
        image_grid(sample_with(pipe, 8, seed=0).images, nrow=8).save(run / f"samples-{kind}.png")
        samples = sample_with(pipe, budget.samples_per_class, seed=1, progress=progress)
        metrics[kind] = score(samples.images, samples.labels, "domain", {"path": str(run / "classifier")}, ref)
    write_json(run / "metrics.json", metrics)
    return metrics


def run_demo(run_dir: str | Path = "runs/demo", data_dir: str | None = None, budget: DemoBudget | None = None,
             device: str = "auto", progress: bool = True) -> dict:
    run, budget = Path(run_dir), budget or DemoBudget()
    stages = [
        ("tokenizer", lambda: _done(run / "tokenizer", "report.json"), lambda: _train_tokenizer(run, budget, data_dir, device, progress)),
        ("codes-train", lambda: _done(run / "codes-train", "meta.json"), lambda: _extract(run, "train", data_dir, device, progress)),
        ("codes-test", lambda: _done(run / "codes-test", "meta.json"), lambda: _extract(run, "test", data_dir, device, progress)),
        ("hierarchy", lambda: _done(run / "hierarchy"), lambda: _cluster(run, budget, data_dir)),
    ] + [(role, lambda r=role: _done(run / r, "train_info.json"), lambda r=role: _train_transformer(run, r, budget, device, progress))
         for role in ("coarse", "refiner", "baseline")] + [
        ("classifier", lambda: _done(run / "classifier"), lambda: _train_classifier(run, budget, data_dir, device)),
    ]
    total = len(stages) + 1
    for i, (name, done, work) in enumerate(stages, 1):
        print(f"[{i}/{total}] {name} -> {run / name}")
        if done():
            print("      done earlier; reusing it")
        else:
            work()
    print(f"[{total}/{total}] samples -> {run}/samples-ctf.png, {run}/samples-baseline.png")
    metrics = sample_and_score(run, budget, data_dir, device, progress)
    return summarize(run, metrics)


def summarize(run: Path, metrics: dict) -> dict:
    tok = read_json(run / "tokenizer" / "report.json")
    summary = {"tokenizer": {k: tok[k] for k in ("psnr_db", "codebook_usage_pct", "perplexity")},
               "K": read_json(run / "hierarchy" / CONFIG_NAME)["K"]}
    for role in ("coarse", "refiner", "baseline"):
        info = read_json(run / role / "train_info.json")
        summary[role] = {"train_loss": info["final_train_loss"], "held_out": info["held_out"]}
    print(f"\ntokenizer (test split): PSNR {tok['psnr_db']:.2f} dB, codebook usage {tok['codebook_usage_pct']:.1f}% "
          f"of {tok['codebook_size']}, perplexity {tok['perplexity']:.0f}; K = {summary['K']}")
    for role in ("coarse", "refiner", "baseline"):
        s = summary[role]
        print(f"{role:>9}: train loss {s['train_loss']:.3f}, held-out loss {s['held_out']['loss']:.3f}, "
              f"held-out token accuracy {100 * s['held_out']['accuracy']:.1f}%")
    n = metrics["ctf"]["n"]
    print(f"samples ({n} per side, class-balanced), scored with the domain classifier's features:")
    for kind, m in metrics.items():
        print(f"{kind:>9}: {m['fid_label']} {m['fid']:.2f}, {m['is_label']} {m['is_mean']:.2f}, precision "
              f"{m['precision']:.2f}, recall {m['recall']:.2f}, class consistency {100 * m['class_consistency']:.1f}%")
    summary["samples"] = metrics
    print(f"sample grids (one row per class): {run / 'samples-ctf.png'}, {run / 'samples-baseline.png'}")
    print(f"metrics: {run / 'metrics.json'}; reconstructions: {run / 'tokenizer' / 'reconstructions.png'}; "
          f"TensorBoard: tensorboard --logdir {run}")
    return summary
