"""Import LlamaGen's released VQ checkpoints (e.g. vq_ds16_c2i.pt) into a ctfgen tokenizer.

LlamaGen's `VQModel` and `VQTokenizer` share one layout; only module names differ.
The name table below is explicit so that an unexpected key is an error, never a
silently dropped weight.
"""

from __future__ import annotations

import re

import torch

from ..errors import CtfgenError
from .model import VQConfig, VQTokenizer

# (LlamaGen name pattern, ctfgen name); applied to each key, first match wins
_RENAMES = [
    (r"^quantize\.embedding\.weight$", "quantizer.embedding"),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.stem."),
    (r"^(encoder|decoder)\.mid\.1\.proj_out\.", r"\1.middle.1.proj."),
    (r"^(encoder|decoder)\.mid\.", r"\1.middle."),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.res\.(\d+)\.nin_shortcut\.", r"\1.levels.\2.blocks.\3.skip."),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.res\.", r"\1.levels.\2.blocks."),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.attn\.(\d+)\.proj_out\.", r"\1.levels.\2.attns.\3.proj."),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.attn\.", r"\1.levels.\2.attns."),
    (r"^(encoder|decoder)\.conv_blocks\.(\d+)\.(downsample|upsample)\.conv\.", r"\1.levels.\2.resample.conv."),
    (r"^(encoder|decoder)\.(norm_out|conv_out)\.", r"\1.\2."),
    (r"^(quant_conv|post_quant_conv)\.", r"\1."),
]
# training statistics LlamaGen keeps in its state dict; they are not weights
NON_WEIGHT_KEYS = {"quantize.codebook_used"}


def unwrap_checkpoint(ckpt: dict) -> dict[str, torch.Tensor]:
    """The VQ state dict inside a LlamaGen checkpoint ({"model": ...} or a bare state dict)."""
    for key in ("model", "state_dict", "ema"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt.items() if torch.is_tensor(v)}


def rename_key(key: str) -> str | None:
    for pattern, repl in _RENAMES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_state_dict(llamagen: dict[str, torch.Tensor], model: VQTokenizer) -> dict[str, torch.Tensor]:
    """Rename every LlamaGen key; raise if any key is unknown, missing or of the wrong shape."""
    target = model.state_dict()
    out, unknown = {}, []
    for key, value in llamagen.items():
        if key in NON_WEIGHT_KEYS:
            continue
        new = rename_key(key)
        if new is None or new not in target:
            unknown.append(key)
            continue
        if target[new].shape != value.shape:
            raise CtfgenError(f"LlamaGen key {key} has shape {tuple(value.shape)}, ctfgen's {new} expects {tuple(target[new].shape)}")
        out[new] = value.to(target[new].dtype)
    missing = sorted(set(target) - set(out))
    if unknown or missing:
        raise CtfgenError(f"checkpoint does not match the VQ layout: unmapped LlamaGen keys {unknown[:5]}"
                          f"{'...' if len(unknown) > 5 else ''}, ctfgen weights left without a value {missing[:5]}")
    return out


def infer_config(state: dict[str, torch.Tensor], image_size: int = 256) -> VQConfig:
    """Read the layout (channels, levels, blocks, codebook) off the weights; LlamaGen always uses 32 norm groups."""
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.conv_blocks.")})
    base = state["encoder.conv_in.weight"].shape[0]
    v, d = state["quantize.embedding.weight"].shape
    return VQConfig(
        image_size=image_size, in_channels=state["encoder.conv_in.weight"].shape[1], base_channels=base,
        channel_mult=[state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // base for i in levels],
        num_res_blocks=len({k.split(".")[4] for k in state if k.startswith("encoder.conv_blocks.0.res.")}),
        z_channels=state["quant_conv.weight"].shape[1], codebook_size=v, codebook_dim=d, norm_groups=32,
        attention="encoder.mid.1.q.weight" in state)


def import_llamagen_vq(ckpt: dict, image_size: int = 256) -> VQTokenizer:
    state = unwrap_checkpoint(ckpt)
    if "quantize.embedding.weight" not in state or "encoder.conv_in.weight" not in state:
        raise CtfgenError("not a LlamaGen VQ checkpoint: no quantize.embedding.weight / encoder.conv_in.weight")
    model = VQTokenizer(infer_config(state, image_size))
    model.load_state_dict(convert_state_dict(state, model))
    return model.eval()
