"""Import LlamaGen's class-conditional GPT checkpoints (FoundationVision/LlamaGen, c2i_*.pt).

The mapping is an explicit table: every LlamaGen weight maps to exactly one ctfgen parameter and
every ctfgen parameter is filled; anything else is an error. LlamaGen's q/k/v fusion, rotary pair
layout, 2D RoPE and null class row are the same as ours, so the weights are copied unchanged.

Load the file yourself with ``torch.load(path, map_location="cpu", weights_only=True)`` and pass
the result (the whole checkpoint dict or the bare state dict).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ctfgen.transformer.model import Transformer, TransformerConfig, build_model, preset_config

from ..errors import CtfgenError

# LlamaGen name -> ctfgen name, for the weights outside the block stack.
GLOBAL_KEYS: dict[str, str] = {
    "cls_embedding.embedding_table.weight": "class_embed.weight",
    "tok_embeddings.weight": "tok_embed.weight",
    "norm.weight": "norm.weight",
    "output.weight": "head.weight",
}

# LlamaGen "layers.{i}.<name>" -> ctfgen "blocks.{i}.<name>".
LAYER_KEYS: dict[str, str] = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wqkv.weight": "attn.qkv.weight",
    "attention.wo.weight": "attn.proj.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn.gate.weight",
    "feed_forward.w3.weight": "ffn.up.weight",
    "feed_forward.w2.weight": "ffn.down.weight",
}

# Tensors a LlamaGen state dict may hold that are not weights; we recompute or never need them.
NON_WEIGHT_KEYS = re.compile(r"^(freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.(k|v)_cache)$")

_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP/DeepSpeed wrappers


def llamagen_key_map(n_layer: int) -> dict[str, str]:
    """The full LlamaGen -> ctfgen parameter name table for a stack of n_layer blocks."""
    table = dict(GLOBAL_KEYS)
    for i in range(n_layer):
        for src, dst in LAYER_KEYS.items():
            table[f"layers.{i}.{src}"] = f"blocks.{i}.{dst}"
    return table


def unwrap_llamagen_checkpoint(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The bare state dict from a LlamaGen checkpoint, with wrapper prefixes stripped."""
    state = checkpoint
    for key in ("model", "module", "state_dict"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CtfgenError(f"checkpoint entry {name!r} is a {type(value).__name__}, not a tensor; "
                              "pass the state dict (or a dict holding it under 'model')")
        stripped = name
        while stripped.startswith(_PREFIXES):
            stripped = stripped.split(".", 1)[1]
        if stripped in out:
            raise CtfgenError(f"two checkpoint entries map to {stripped!r}")
        out[stripped] = value
    return out


def convert_llamagen_state_dict(checkpoint: Mapping[str, object], n_layer: int) -> dict[str, torch.Tensor]:
    """Rename a LlamaGen GPT state dict to ctfgen's names; fail on anything unmapped or missing."""
    state = unwrap_llamagen_checkpoint(checkpoint)
    table = llamagen_key_map(n_layer)
    weights = {k: v for k, v in state.items() if not NON_WEIGHT_KEYS.match(k)}
    unknown = sorted(set(weights) - set(table))
    missing = sorted(set(table) - set(weights))
    if unknown or missing:
        raise CtfgenError(
            f"not a LlamaGen c2i GPT with {n_layer} layers: unmapped keys {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}, missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return {table[k]: v for k, v in weights.items()}


def import_llamagen_gpt(state_dict: Mapping[str, object], model_name: str = "GPT-B", num_classes: int = 1000,
                        grid: int = 16, vocab_size: int = 16384,
                        config: TransformerConfig | None = None) -> Transformer:
    """A baseline ctfgen model holding a LlamaGen c2i GPT's weights (same logits, in eval mode).

    `model_name` picks the size from ctfgen's registry (LlamaGen's names); `config` overrides
    everything else for non-standard sizes. The checkpoint must have a null class row
    (num_classes + 1 rows), which every LlamaGen model trained with class dropout has.
    """
    if config is None:
        config = preset_config(model_name, role="baseline", vocab_size=vocab_size, num_classes=num_classes,
                               grid_h=grid, grid_w=grid)
    if config.role != "baseline":
        raise CtfgenError(f"LlamaGen GPTs are baseline models, not {config.role!r}")
    weights = convert_llamagen_state_dict(state_dict, config.n_layer)
    model = build_model(config)
    expected = model.state_dict()
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CtfgenError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                              f"{tuple(expected[name].shape)} (check model_name, num_classes, vocab_size)")
    model.load_state_dict(weights, strict=True)
    return model.eval()


__all__ = [
    "GLOBAL_KEYS", "LAYER_KEYS", "NON_WEIGHT_KEYS", "convert_llamagen_state_dict", "import_llamagen_gpt",
    "llamagen_key_map", "unwrap_llamagen_checkpoint",
]
