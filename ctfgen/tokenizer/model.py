"""The VQ tokenizer: a convolutional encoder/decoder around an l2-normalised codebook.

The layout follows LlamaGen's VQ family (a taming-transformers style U-shaped
conv net with group norm, swish, residual blocks and attention at the lowest
resolution), so LlamaGen's released weights map onto it one to one
(see `ctfgen.tokenizer.llamagen`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import fingerprint_tensors, load_artifact, save_artifact
from ..errors import CtfgenError
from .quantizer import VectorQuantizer


@dataclass
class VQConfig:
    image_size: int = 32
    in_channels: int = 1
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    z_channels: int = 64
    codebook_size: int = 4096
    codebook_dim: int = 8
    norm_groups: int = 32
    attention: bool = True  # attention blocks at the lowest resolution (LlamaGen has them)
    dropout: float = 0.0
    commitment_beta: float = 0.25

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    def validate(self) -> None:
        if self.image_size % self.downsample:
            raise CtfgenError(f"image_size {self.image_size} is not divisible by the downsample factor {self.downsample}")
        for c in {self.base_channels * m for m in self.channel_mult}:
            if c % self.norm_groups:
                raise CtfgenError(f"{c} channels do not split into {self.norm_groups} norm groups")
        if self.codebook_size < 2 or self.codebook_dim < 1:
            raise CtfgenError("the codebook needs at least 2 codewords of dimension >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # [b, hw, c]
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom so the output is exactly half size


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, optional attention, a resampler."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attention: bool, groups: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out, groups, dropout) for i in range(n_blocks))
        self.attns = nn.ModuleList(AttnBlock(c_out, groups) for _ in range(n_blocks if attention else 0))
        self.resample: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attns:
                x = self.attns[i](x)
        return self.resample(x)


def _middle(channels: int, cfg: VQConfig) -> nn.Sequential:
    g, p = cfg.norm_groups, cfg.dropout
    attn = AttnBlock(channels, g) if cfg.attention else nn.Identity()
    return nn.Sequential(ResBlock(channels, channels, g, p), attn, ResBlock(channels, channels, g, p))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        last = len(chans) - 1
        self.stem = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        c_in = cfg.base_channels
        for i, c in enumerate(chans):
            level = Level(c_in, c, cfg.num_res_blocks, cfg.attention and i == last, cfg.norm_groups, cfg.dropout)
            if i != last:
                level.resample = Downsample(c)
            self.levels.append(level)
            c_in = c
        self.middle = _middle(c_in, cfg)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for level in self.levels:
            h = level(h)
        h = self.middle(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult][::-1]  # lowest resolution first
        last = len(chans) - 1
        self.stem = nn.Conv2d(cfg.z_channels, chans[0], 3, padding=1)
        self.middle = _middle(chans[0], cfg)
        self.levels = nn.ModuleList()
        c_in = chans[0]
        for i, c in enumerate(chans):
            # one block more than the encoder, as in LlamaGen
            level = Level(c_in, c, cfg.num_res_blocks + 1, cfg.attention and i == 0, cfg.norm_groups, cfg.dropout)
            if i != last:
                level.resample = Upsample(c)
            self.levels.append(level)
            c_in = c
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.stem(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQTokenizer(nn.Module):
    """Images in [-1, 1] <-> integer code grids.

    `forward(x)` is the training path and returns (reconstruction, VQOutput);
    `encode` / `decode` are the inference API used by every later stage.
    """

    def __init__(self, config: VQConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.quantizer = VectorQuantizer(config.codebook_size, config.codebook_dim, config.commitment_beta)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.decoder = Decoder(config)
        self.fingerprint: str | None = None  # set when loaded from or saved to a folder

    @property
    def codebook(self) -> torch.Tensor:
        """The l2-normalised codewords, V x D."""
        return self.quantizer.codebook

    def forward(self, x: torch.Tensor):
        z = self.quant_conv(self.encoder(x))
        out = self.quantizer(z)
        return self.decode_latent(out.quantized), out

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """float[B,C,H,W] in [-1,1] -> long[B,h,w]."""
        self._check_images(x)
        return self.quantizer.lookup(self.quant_conv(self.encoder(x)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """long[B,h,w] -> float[B,C,H,W], clamped to [-1,1]."""
        if codes.dim() != 3 or codes.dtype not in (torch.int64, torch.int32):
            raise CtfgenError(f"decode expects integer codes of shape [B,h,w], got {tuple(codes.shape)} {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise CtfgenError(f"codes must lie in [0, {self.config.codebook_size}), got [{codes.min()}, {codes.max()}]")
        z_q = self.quantizer.embed(codes.long())
        return self.decode_latent(z_q).clamp(-1, 1)

    def _check_images(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.downsample
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] % s or x.shape[3] % s:
            raise CtfgenError(f"expected images [B,{c},H,W] with H and W divisible by {s}, got {tuple(x.shape)}")


TOKENIZER_KIND = "vq-tokenizer"


def save_tokenizer(model: VQTokenizer, folder: str | Path) -> str:
    """Write the tokenizer artifact folder; returns (and sets) its fingerprint."""
    tensors = model.state_dict()
    model.fingerprint = fingerprint_tensors(tensors)
    save_artifact(folder, {"kind": TOKENIZER_KIND, "fingerprint": model.fingerprint, **model.config.to_dict()}, tensors)
    return model.fingerprint


def load_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> VQTokenizer:
    """Rebuild a frozen tokenizer (eval mode) from its artifact folder."""
    config, tensors = load_artifact(folder, TOKENIZER_KIND, device)
    fingerprint = config.pop("fingerprint", None)
    config.pop("kind")
    model = VQTokenizer(VQConfig(**config)).to(device)
    model.load_state_dict(tensors)
    model.fingerprint = fingerprint or fingerprint_tensors(tensors)
    return model.eval().requires_grad_(False)
