"""The one image transform every dataset goes through."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import CtfgenError


class ImageTransform:
    """PIL image -> float[C,H,W] in [-1,1] at `resolution` x `resolution`.

    An image smaller than the target on both sides is padded with black around its
    centre (Fashion-MNIST's 28 px -> 32 px keeps every pixel); anything else is resized
    so its shorter side matches and centre-cropped. `hflip` mirrors with probability 1/2
    (drawn from torch's global RNG, which DataLoader seeds per worker).
    """

    def __init__(self, resolution: int, channels: int = 3, hflip: bool = False):
        if channels not in (1, 3):
            raise CtfgenError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.resolution, self.channels, self.hflip = resolution, channels, hflip

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("L" if self.channels == 1 else "RGB")
        w, h = img.size
        r = self.resolution
        if w <= r and h <= r:
            canvas = Image.new(img.mode, (r, r))
            canvas.paste(img, ((r - w) // 2, (r - h) // 2))
            img = canvas
        else:
            scale = r / min(w, h)
            img = img.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BICUBIC)
            left, top = (img.width - r) // 2, (img.height - r) // 2
            img = img.crop((left, top, left + r, top + r))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float[B,C,H,W] in [-1,1] -> uint8 [B,H,W,C]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def uint8_to_float(array: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,C] -> float [N,C,H,W] in [-1, 1]."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise CtfgenError(f"expected images [N,H,W] or [N,H,W,C], got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1


def image_grid(x: torch.Tensor, nrow: int = 8, pad: int = 2) -> Image.Image:
    """float[B,C,H,W] in [-1,1] -> one PIL image with `nrow` images per row."""
    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    ncol = min(nrow, b)
    nrows = -(-b // ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = im
    return Image.fromarray(grid[..., 0] if c == 1 else grid)
