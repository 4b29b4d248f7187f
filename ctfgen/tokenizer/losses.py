"""Optional tokenizer losses: a PatchGAN discriminator and an LPIPS-style perceptual loss.

The perceptual loss needs pretrained VGG16 weights, which cannot be downloaded at run
time: it is built only from a local file the user gives (torchvision's `vgg16` state-dict
keys `features.N.weight/bias`, optionally with LPIPS's linear heads `lin{0..4}.model.1.weight`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import ArtifactError, load_tensors


class PatchDiscriminator(nn.Module):
    """PatchGAN: a conv net that scores overlapping patches as real or fake."""

    def __init__(self, in_channels: int, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, n_layers + 1):
            c_next = channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


# VGG16 conv layout: (out channels) per conv, "M" = max-pool; LPIPS taps relu1_2, 2_2, 3_3, 4_3, 5_3
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = {3, 8, 15, 22, 29}  # indices in `features` of the ReLUs whose outputs are compared


class PerceptualLoss(nn.Module):
    """LPIPS-style distance: unit-normalised VGG16 features, weighted per channel, averaged."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        widths = [64, 128, 256, 512, 512]
        self.lins = nn.ParameterList(nn.Parameter(torch.ones(w)) for w in widths)
        # ImageNet statistics in [-1,1] units, as LPIPS's scaling layer
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self._load(Path(weights_path))
        self.requires_grad_(False).eval()

    def _load(self, path: Path) -> None:
        sd = load_tensors(path)
        feats = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
        missing = set(self.features.state_dict()) - set(feats)
        if missing:
            raise ArtifactError(f"{path}: not VGG16 weights in torchvision's layout (missing features.{sorted(missing)[0]})")
        self.features.load_state_dict({k: feats[k] for k in self.features.state_dict()})
        for i, lin in enumerate(self.lins):
            key = f"lin{i}.model.1.weight"
            if key in sd:
                lin.data.copy_(sd[key].flatten())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = h.new_zeros(())
        lin = iter(self.lins)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                a, b = F.normalize(h, dim=1).chunk(2)
                total = total + ((a - b) ** 2 * next(lin).view(1, -1, 1, 1)).sum(1).mean()
        return total
