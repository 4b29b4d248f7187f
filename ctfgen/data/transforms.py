"""The one image transform every dataset goes through."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import CtfgenError


# what extraction stores per image, in order (view 0 is the plain image, or the centre crop)
VIEWS = {"none": ["original"], "flip": ["original", "hflip"],
         "ten-crop": ["center", "top-left", "top-right", "bottom-left", "bottom-right",
                      "center-hflip", "top-left-hflip", "top-right-hflip", "bottom-left-hflip", "bottom-right-hflip"]}


class ImageTransform:
    """PIL image -> float[C,H,W] in [-1,1] at `resolution` x `resolution`.

    Photos are prepared as ADM's evaluation suite prepares them (its `center_crop_arr`): halved with a
    box filter while the shorter side is at least twice the target, resized bicubically so the shorter
    side matches, centre-cropped; an image smaller than the target is scaled up the same way, never
    padded. `pad_small` is for small sprites such as Fashion-MNIST's 28 px items: an image no larger
    than the target on both sides is padded with black around its centre instead, keeping every pixel.
    `hflip` mirrors with probability 1/2 (drawn from torch's global RNG, which DataLoader seeds per worker).
    `views` makes several views of every image for extraction (`VIEWS`): "flip" (the image and its mirror)
    or "ten-crop" (LlamaGen's: the 4 corner and the centre crops of a 1.1x centre crop, and their mirrors).
    """

    def __init__(self, resolution: int, channels: int = 3, hflip: bool = False, pad_small: bool = False,
                 views: str = "none"):
        if channels not in (1, 3):
            raise CtfgenError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if views not in VIEWS:
            raise CtfgenError(f"views must be one of {sorted(VIEWS)}, got {views!r}")
        self.resolution, self.channels, self.hflip = resolution, channels, hflip
        self.pad_small, self.views = pad_small, views

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """float[C,H,W], or float[views, C, H, W] when `views` is not "none"."""
        img = img.convert("L" if self.channels == 1 else "RGB")
        r = self.resolution
        base = round(1.1 * r) if self.views == "ten-crop" else r  # LlamaGen: ten crops of a 1.1x centre crop
        if self.pad_small and img.width <= base and img.height <= base:
            canvas = Image.new(img.mode, (base, base))
            canvas.paste(img, ((base - img.width) // 2, (base - img.height) // 2))
            img = canvas
        else:
            img = center_crop(img, base)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0
        x = (x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)).contiguous()
        if self.views == "flip":
            return torch.stack([x, x.flip(-1)])
        if self.views == "ten-crop":
            e, c = base - r, (base - r) // 2
            crops = [x[:, top:top + r, left:left + r] for top, left in ((c, c), (0, 0), (0, e), (e, 0), (e, e))]
            return torch.stack(crops + [crop.flip(-1) for crop in crops])
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's preparation of a photo: box-halve while the shorter side >= 2 x size, bicubic to size, centre crop."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    scale = size / min(img.size)
    if scale != 1:
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


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
