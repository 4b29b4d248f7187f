"""The `domain` feature extractor: a small conv classifier trained by ctfgen on the dataset itself.

Its penultimate (globally pooled) features and its class logits stand in for Inception's on
datasets ImageNet features describe poorly (Fashion-MNIST). `train_classifier` writes an
artifact folder; `get_extractor("domain", path=FOLDER)` reads it.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from ..arguments import AtLeast, Count, OneOf, Positive, add_dataclass_args, check_fields, dataclass_from_args
from ..artifacts import ArtifactError, load_artifact, save_artifact
from ..outputs import add_output_flags, plan_output
from ..runtime import lr_at, pick_device, seed_everything
from .features import FeatureExtractor, resize_images, weights_fingerprint

log = logging.getLogger(__name__)

KIND = "domain-classifier"


@dataclass
class ClassifierConfig:
    channels: int = 1
    resolution: int = 32
    num_classes: int = 10
    width: int = 32  # channels of the first stage; doubled at each of the next two

    @property
    def feature_dim(self) -> int:
        return 4 * self.width


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DomainClassifier(nn.Module):
    """Three conv stages (each halving the resolution), global average pool, dropout, linear."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        w = config.width
        self.config = config
        self.body = nn.Sequential(conv_bn(config.channels, w), nn.MaxPool2d(2),
                                  conv_bn(w, 2 * w), nn.MaxPool2d(2),
                                  conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w), nn.MaxPool2d(2))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * w, config.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


# --- training -----------------------------------------------------------------------------------

@dataclass
class ClassifierTrainConfig:
    data: str = "fashion-mnist"  # 'fashion-mnist', an .npz or an image folder
    out: str = "runs/classifier"
    epochs: Count = 3
    batch_size: Count = 128
    lr: Positive = 3e-3
    weight_decay: Annotated[float, AtLeast(0.0)] = 5e-4
    width: Count = 32  # channels of the first stage
    resolution: Annotated[int, AtLeast(8)] = 32  # three 2x poolings
    channels: Annotated[int, OneOf(1, 3)] = 1
    hflip: bool = True  # mirror half of each batch
    limit: Annotated[int | None, AtLeast(1)] = None  # train on the first `limit` images only (tests, quick runs)
    eval_limit: Annotated[int | None, AtLeast(1)] = None  # test images scored (None: the whole split)
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None  # folder of the Fashion-MNIST idx files

    def __post_init__(self) -> None:
        check_fields(self)


def _load_split(cfg: ClassifierTrainConfig, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from ..data.datasets import build_dataset

    ds = build_dataset(cfg.data, split, resolution=cfg.resolution, channels=cfg.channels, data_dir=cfg.data_dir)
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return images, labels, list(getattr(ds, "classes", []))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror half the batch at random (classes of clothing/objects are mirror-symmetric)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)


@torch.no_grad()
def accuracy(model: DomainClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = sum((model(images[i:i + batch_size].to(device)).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / max(len(images), 1)


def train_classifier(cfg: ClassifierTrainConfig | None = None, *, force: bool = False, **overrides) -> dict:
    """Train on the train split, measure test accuracy, write the artifact folder; returns its config.
    A finished classifier folder is replaced only with `force` (see ctfgen.outputs)."""
    cfg = ClassifierTrainConfig(**{**asdict(cfg or ClassifierTrainConfig()), **overrides})
    output = plan_output(cfg.out, KIND, force=force)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    start = time.perf_counter()
    images, labels, classes = _load_split(cfg, "train", cfg.limit)
    num_classes = max(len(classes), int(labels.max()) + 1)
    model = DomainClassifier(ClassifierConfig(cfg.channels, cfg.resolution, num_classes, cfg.width)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    total, step = cfg.epochs * steps_per_epoch, 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = images[idx]
            x = _augment(x, generator) if cfg.hflip else x
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.lr, min(100, total // 10), total)
            loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        log.info("epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, loss.item())
    train_seconds = time.perf_counter() - start
    test_images, test_labels, _ = _load_split(cfg, "test", cfg.eval_limit)
    model.cpu()
    config = {"kind": KIND, "model": asdict(model.config), "classes": classes, "dataset": cfg.data,
              "train": {k: v for k, v in asdict(cfg).items() if k != "out"}, "train_images": len(images),
              "test_accuracy": accuracy(model, test_images, test_labels), "test_images": len(test_images),
              "train_seconds": round(train_seconds, 1)}
    output.write(lambda folder: save_artifact(folder, config, model.state_dict()))
    return config


def load_classifier(folder: str | Path) -> tuple[DomainClassifier, dict]:
    config, tensors = load_artifact(folder, KIND)
    model = DomainClassifier(ClassifierConfig(**config["model"]))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ArtifactError(f"{folder}: weights do not fit the stored config: {e}") from None
    return model.eval(), config


# --- extractor ------------------------------------------------------------------------------------

class DomainExtractor(FeatureExtractor):
    name = "domain"

    def __init__(self, model: DomainClassifier, fingerprint: str):
        super().__init__()
        self.model, self.fingerprint = model, fingerprint
        self.feature_dim, self.num_classes = model.config.feature_dim, model.config.num_classes

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return resize_images(images, self.model.config.resolution, self.model.config.channels)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_features(x)
        return f, self.model.fc(f)


def build_domain_extractor(path: str | Path | None = None) -> DomainExtractor:
    if path is None:
        raise ArtifactError("the domain extractor needs a trained classifier: get_extractor('domain', path=FOLDER) "
                            "with FOLDER written by `ctfgen train-classifier`")
    model, _ = load_classifier(path)
    return DomainExtractor(model, weights_fingerprint(model))


# --- CLI (registered by ctfgen.cli) ------------------------------------------------------------------------

def add_classifier_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ClassifierTrainConfig)
    add_output_flags(parser)


def cmd_train_classifier(args: argparse.Namespace) -> None:
    config = train_classifier(dataclass_from_args(ClassifierTrainConfig, args), force=args.force)
    print(f"test accuracy {config['test_accuracy']:.4f} on {config['test_images']} images; "
          f"trained in {config['train_seconds']:.0f} s; written to {args.out}")
