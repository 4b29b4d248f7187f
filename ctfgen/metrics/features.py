"""The feature-extractor interface every metric runs on, and the registry that builds one by name.

An extractor takes images as ctfgen makes them (float[N,C,H,W] in [-1,1], any size, 1 or 3
channels), applies its own preprocessing (resize, channel conversion, normalisation) and
returns `(features float[N,F], logits float[N,classes] or None)`.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import ArtifactError, fingerprint_tensors
from ..errors import CtfgenError

DEFAULT_EXTRACTOR = "effnet-lite0"

# name -> "module:factory", imported on first use so that listing names stays cheap
_REGISTRY: dict[str, str] = {
    "effnet-lite0": "ctfgen.metrics.effnet:build_effnet_extractor",
    "domain": "ctfgen.metrics.classifier:build_domain_extractor",
    "inception": "ctfgen.metrics.inception:build_inception_extractor",
}


class FeatureExtractor(nn.Module):
    """Base class: subclasses set `name`, `fingerprint`, and implement `preprocess` and `features`."""

    name: str = "extractor"
    fingerprint: str = ""
    feature_dim: int = 0
    num_classes: int | None = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.features(self.preprocess(images))

    def describe(self) -> dict:
        """What identifies this extractor's feature space (used in cache keys and metrics.json)."""
        return {"name": self.name, "fingerprint": self.fingerprint, "feature_dim": self.feature_dim}


def resize_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """[-1,1] images -> `channels` channels at size x size (bilinear; antialiased when shrinking)."""
    if images.dim() != 4:
        raise CtfgenError(f"expected images float[N,C,H,W], got shape {tuple(images.shape)}")
    if images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 3 and channels == 1:
        images = images.mean(dim=1, keepdim=True)
    elif images.shape[1] != channels:
        raise CtfgenError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if images.shape[-2:] != (size, size):
        shrink = images.shape[-1] > size or images.shape[-2] > size
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return images.float()


def weights_fingerprint(module: nn.Module) -> str:
    """Content hash of a module's weights; BatchNorm's step counters say nothing about the features."""
    return fingerprint_tensors({k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")})


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load a pretrained state dict, refusing missing, unexpected or mis-shaped keys (BatchNorm's
    step counters aside: they are not weights). Returns the model in eval mode."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ArtifactError(f"{source}: {len(missing)} missing keys {missing[:3]}, {len(extra)} unexpected keys {extra[:3]}")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        raise ArtifactError(f"{source}: shape mismatch for {wrong[:3]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def register_extractor(name: str, target: str) -> None:
    """Add an extractor: `target` is "module:factory", the factory takes keyword arguments."""
    _REGISTRY[name] = target


def extractor_names() -> list[str]:
    return sorted(_REGISTRY)


def get_extractor(name: str = DEFAULT_EXTRACTOR, **kwargs) -> FeatureExtractor:
    """Build an extractor by name, e.g. get_extractor("domain", path="runs/x/classifier")."""
    if name not in _REGISTRY:
        raise CtfgenError(f"unknown feature extractor {name!r}; choose from {extractor_names()}")
    module_name, factory_name = _REGISTRY[name].split(":")
    factory: Callable[..., FeatureExtractor] = getattr(importlib.import_module(module_name), factory_name)
    return factory(**kwargs).eval()


def metric_label(extractor_name: str, metric: str = "FID") -> str:
    """Only Inception-v3 figures are called FID without a qualifier."""
    return metric if extractor_name == "inception" else f"{metric} ({extractor_name} features)"


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 64,
                     device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the extractor over `images` in batches; returns float32 CPU tensors."""
    if device is None:  # where its weights are (the CPU for an extractor without any)
        device = next(iter([*extractor.parameters(), *extractor.buffers()]), torch.empty(0)).device
    device = torch.device(device)
    extractor.to(device).eval()
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        f, lg = extractor(images[start:start + batch_size].to(device))
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    features = torch.cat(feats) if feats else torch.zeros(0, extractor.feature_dim)
    return features, (torch.cat(logits) if logits else None)
