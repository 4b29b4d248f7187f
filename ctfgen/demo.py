"""The main job: every stage of the pipeline on Fashion-MNIST (or `--data`), at a budget that fits a 2-core CPU.

Each stage writes one folder of the run and is skipped when that folder is complete (saying so when
it was made with other settings than the flags ask for), so a second `ctfgen demo` only samples; an
interrupted stage resumes from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

from .arguments import Count, OneOf, Positive, check_fields
from .artifacts import CONFIG_NAME, read_json, write_json
from .data.codes import CODES_KIND
from .data.datasets import build_dataset, check_data, take_images
from .hierarchy.artifact import HIERARCHY_KIND
from .metrics.classifier import KIND as CLASSIFIER_KIND
from .outputs import is_finished, open_output, open_run_folder
from .runtime import pick_device
from .tokenizer.model import TOKENIZER_KIND
from .transformer.model import ARTIFACT_KIND, MODEL_SIZES


@dataclass
class DemoBudget:
    # sized so that every stage together fits in about 15 minutes on a 2-core CPU
    tokenizer_steps: Count = 500
    transformer_steps: Count = 300
    transformer_size: Annotated[str, OneOf(*MODEL_SIZES)] = "small"
    batch_size: Count = 64
    lr: Positive = 1e-3
    auto_k_images: Count = 500
    classifier_epochs: Count = 1
    classifier_images: Count = 20000  # training images of the domain classifier
    samples_per_class: Count = 50  # scored with the domain classifier's features

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Stage:
    name: str  # its folder in the run
    kind: str  # what that folder holds when finished (ctfgen.outputs)
    work: Callable[[], None]
    settings: dict[str, Any] = field(default_factory=dict)  # budget flags, as the stage records them
    recorded: Callable[[Path], dict[str, Any]] = lambda folder: _read(folder / "train_config.json")


def _read(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def reuse_note(stage: Stage, folder: Path) -> str:
    """What a reused stage was made with, where that differs from the flags given."""
    recorded = stage.recorded(folder)
    differs = {k: v for k, v in stage.settings.items() if k in recorded and recorded[k] != v}
    if not differs:
        return ""
    made = ", ".join(f"{k}={recorded[k]}" for k in differs)
    asked = ", ".join(f"{k}={v}" for k, v in differs.items())
    return f" (made with {made}; the flags ask for {asked}: delete {folder} or use another --run to redo it)"


@dataclass
class Demo:
    """The stages of one demo run; `data` is 'fashion-mnist', an .npz or an image folder (as for every command)."""

    run: Path
    budget: DemoBudget
    data: str = "fashion-mnist"
    data_dir: str | None = None  # Fashion-MNIST's idx files
    device: str = "auto"
    progress: bool = True

    def dataset(self, split: str, tok: Any) -> Any:
        return build_dataset(self.data, split, tok.config.image_size, tok.config.in_channels, data_dir=self.data_dir)

    def stages(self) -> list[Stage]:
        b = self.budget
        transformer = {"steps": b.transformer_steps, "size": b.transformer_size, "batch_size": b.batch_size, "lr": b.lr}
        return [
            Stage("tokenizer", TOKENIZER_KIND, self.train_tokenizer, {"steps": b.tokenizer_steps, "data": self.data}),
            Stage("codes-train", CODES_KIND, lambda: self.extract("train")),
            Stage("codes-test", CODES_KIND, lambda: self.extract("test")),
            Stage("hierarchy", HIERARCHY_KIND, self.cluster),
        ] + [Stage(role, ARTIFACT_KIND, lambda r=role: self.train_transformer(r), transformer)
             for role in ("coarse", "refiner", "baseline")] + [
            Stage("classifier", CLASSIFIER_KIND, self.train_classifier,
                  {"epochs": b.classifier_epochs, "limit": b.classifier_images, "data": self.data},
                  lambda folder: _read(folder / CONFIG_NAME).get("train", {})),
        ]

    def train_tokenizer(self) -> None:
        from .tokenizer.train import TokenizerTrainConfig, train_tokenizer

        cfg = TokenizerTrainConfig(out=str(self.run / "tokenizer"), data=self.data, data_dir=self.data_dir,
                                   device=self.device, steps=self.budget.tokenizer_steps)
        train_tokenizer(cfg, resume=True, progress=self.progress)

    def extract(self, split: str) -> None:
        from .tokenizer.extract import extract_codes
        from .tokenizer.model import load_tokenizer

        tok = load_tokenizer(self.run / "tokenizer", pick_device(self.device))
        extract_codes(tok, self.dataset(split, tok), self.run / f"codes-{split}", dataset_name=self.data, split=split,
                      device=tok.codebook.device, progress=self.progress)

    def cluster(self) -> None:
        from .hierarchy import build_hierarchy, save_hierarchy
        from .tokenizer.model import load_tokenizer

        tok = load_tokenizer(self.run / "tokenizer")
        ds = self.dataset("test", tok)
        # held-out images from the end of the test split, away from the first ones used for reports
        images = take_images(ds, len(ds))[-self.budget.auto_k_images:]
        h = build_hierarchy(tok, "kmeans", "auto", images=images)
        open_output(self.run / "hierarchy", HIERARCHY_KIND).write(lambda folder: save_hierarchy(h, folder))
        print(f"      K = {h.K} chosen automatically ({h.V} codewords)")

    def train_transformer(self, role: str) -> None:
        from .training import TrainConfig, train

        b, run = self.budget, self.run
        cfg = TrainConfig(role=role, size=b.transformer_size, codes=str(run / "codes-train"),
                          hierarchy=None if role == "baseline" else str(run / "hierarchy"), out=str(run / role),
                          val_codes=str(run / "codes-test"), steps=b.transformer_steps, batch_size=b.batch_size,
                          lr=b.lr, warmup_steps=min(100, b.transformer_steps // 10), lr_decay="cosine",
                          device=self.device)
        train(cfg, resume=True, progress=self.progress)

    def train_classifier(self) -> None:
        from .metrics.classifier import train_classifier

        info = train_classifier(out=str(self.run / "classifier"), data=self.data, epochs=self.budget.classifier_epochs,
                                limit=self.budget.classifier_images, data_dir=self.data_dir, device=self.device)
        print(f"      test accuracy {100 * info.get('test_accuracy', float('nan')):.1f}%")

    def sample_and_score(self) -> dict:
        """A sample grid per class for CTF and for the baseline, and a class-balanced set of each scored
        in the domain classifier's feature space (FID/IS/precision/recall) plus class consistency
        (how often the classifier names the class the sample was drawn for)."""
        from .data.transforms import image_grid
        from .evaluate import Reference, sample_with, score
        from .metrics import get_extractor
        from .pipeline import load_pipeline

        run, dev = self.run, pick_device(self.device)
        ref = Reference(self.data, "test", data_dir=self.data_dir, cache_dir=str(run / "cache"))
        extractor = get_extractor("domain", path=str(run / "classifier"))
        metrics = {}
        for kind in ("ctf", "baseline"):
            pipe = load_pipeline(run, kind, dev)
            image_grid(sample_with(pipe, 8, seed=0).images, nrow=8).save(run / f"samples-{kind}.png")
            samples = sample_with(pipe, self.budget.samples_per_class, seed=1, progress=self.progress)
            metrics[kind] = score(samples.images, samples.labels, extractor, ref)
        write_json(run / "metrics.json", metrics)
        return metrics


def run_demo(run_dir: str | Path = "runs/demo", data_dir: str | None = None, budget: DemoBudget | None = None,
             device: str = "auto", progress: bool = True, data: str = "fashion-mnist") -> dict:
    check_data(data, data_dir)
    demo = Demo(open_run_folder(run_dir), budget or DemoBudget(), data, data_dir, device, progress)
    stages = demo.stages()
    total = len(stages) + 1
    for i, stage in enumerate(stages, 1):
        folder = demo.run / stage.name
        print(f"[{i}/{total}] {stage.name} -> {folder}")
        if is_finished(folder, stage.kind):
            print("      done earlier; reusing it" + reuse_note(stage, folder))
        else:
            stage.work()
    print(f"[{total}/{total}] samples -> {demo.run}/samples-ctf.png, {demo.run}/samples-baseline.png")
    return summarize(demo.run, demo.sample_and_score())


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
    print(f"What this shows: {n} samples per side after a short training budget, one seed. Early in "
          "training CTF converges faster, so a large gap here is expected and is not the verdict; the comparison "
          "at the end of training, over seeds and sampler settings, is `ctfgen bench` (docs/bench.md).")
    print(f"sample grids (one row per class): {run / 'samples-ctf.png'}, {run / 'samples-baseline.png'}")
    print(f"metrics: {run / 'metrics.json'}; reconstructions: {run / 'tokenizer' / 'reconstructions.png'}; "
          f"TensorBoard: tensorboard --logdir {run}")
    print(f"in a browser: ctfgen serve {run} (needs pip install -e \".[demo]\")")
    return summary
