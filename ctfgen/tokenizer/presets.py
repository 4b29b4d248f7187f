"""Named tokenizer configurations."""

from __future__ import annotations

from ..errors import CtfgenError
from .model import VQConfig

PRESETS: dict[str, dict] = {
    # LlamaGen's VQ-16: 256 px -> 16x16 tokens, 16384 x 8 codebook (about 72M parameters)
    "vq-16": dict(image_size=256, in_channels=3, base_channels=128, channel_mult=[1, 1, 2, 2, 4],
                  num_res_blocks=2, z_channels=256, codebook_size=16384, codebook_dim=8,
                  norm_groups=32, attention=True),
    # LlamaGen's VQ-8: 256 px -> 32x32 tokens
    "vq-8": dict(image_size=256, in_channels=3, base_channels=128, channel_mult=[1, 2, 2, 4],
                 num_res_blocks=2, z_channels=256, codebook_size=16384, codebook_dim=8,
                 norm_groups=32, attention=True),
    # trains on a 2-core CPU: 32 px grayscale -> 8x8 tokens, 4096 x 8 codebook
    "small": dict(image_size=32, in_channels=1, base_channels=16, channel_mult=[1, 2, 4],
                  num_res_blocks=1, z_channels=64, codebook_size=4096, codebook_dim=8,
                  norm_groups=8, attention=False),
}


def preset_config(name: str, **overrides) -> VQConfig:
    if name not in PRESETS:
        raise CtfgenError(f"unknown tokenizer preset {name!r}; choose from {sorted(PRESETS)}")
    return VQConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})
