"""Lower-precision copies of a causal model for sampling: decoding one token at a time reads every
weight once per token, so its speed is set by how many bytes the weights take.

* ``fp32``: the model itself (exact; the default).
* ``fp32-packed``: the same fp32 weights, reordered once into oneDNN's blocked layout (CPU only). At the
  2-16 rows of decoding torch's default matrix product reads the weights at about half the memory's
  bandwidth; oneDNN's kernel on packed weights reads them near it. Same precision, another summation
  order: logits differ in the last bits, so a sampled token can differ where two are nearly tied.
* ``bf16``: weights and activations in bfloat16 (half the bytes); logits stay fp32, and so does the KV cache
  on the CPU (`ctfgen.sampling.decode_cache`; bf16 on a GPU). On a CPU whose oneDNN has bf16 kernels
  (AVX512-BF16, AMX) the weights are also packed as above: torch's bf16 product at 2 rows runs at half the
  packed one's speed there.
* ``int8``: weight-only quantisation of every matrix in the blocks and the head (one scale per output
  row, symmetric); activations in bf16 for the product (on the CPU torch's int8-weight GEMV kernel),
  everything else in fp32. A quarter of the bytes.

A refiner (stage 2) follows the same precision, though its one pass over every position is bound by
arithmetic, not by the weights' bytes: fp32-packed packs every layer of its blocks (from 64 rows up oneDNN's
kernel beat torch's product at every layer size, by 1.1-3x), bf16 runs it in bf16, and so does int8 (torch's
int8-weight kernel is made for a few rows: 3.6x slower than bf16 at 4,096). Its head stays a plain layer:
stage 2 gathers the rows of each cluster's members from it.

Each changes the sampled tokens a little; docs/bench.md ("Decode precision") measures what that costs in
FID, docs/sampling.md what it buys in speed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CtfgenError
from .model import Transformer, compile_freezes

DECODE_PRECISIONS = ("fp32", "fp32-packed", "bf16", "int8")
# `fp32-packed` packs only the block layers with at least this many weights (2 MiB of fp32): below it oneDNN's
# per-call cost eats its faster streaming (`benchmarks/bench_decode.py --layers`, 2 rows, 2 threads: 1.5-2x slower
# at 0.06-0.25 MiB, even at 0.75-1 MiB, 0.3-0.7x from 2 MiB up), so the small preset's blocks stay plain fp32
PACK_MIN_WEIGHTS = 1 << 19
PACKED_FOR_ROWS = 2  # oneDNN picks its blocking for this many rows: one image with CFG (any count runs)


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights: W ~ q * scale[:, None], q in [-127, 127]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise CtfgenError("Int8Linear quantises bias-free layers only")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        else:  # no int8-weight kernel everywhere: widen the weights on the fly (saves memory, not time)
            y = F.linear(flat, self.weight.to(torch.bfloat16)) * self.scale
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def packed_kernels_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has oneDNN and the (internal) packed-linear operators PackedLinear calls, and
    for bf16 whether this CPU has oneDNN's bf16 kernels (without them oneDNN emulates bf16, slowly)."""
    try:
        ops = torch.ops.mkldnn
        available = torch.backends.mkldnn.is_available() and all((ops._reorder_linear_weight, ops._linear_pointwise))
        return available and (dtype != torch.bfloat16 or bool(ops._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """An nn.Linear for the CPU whose weights (fp32 or bf16, kept as they are) sit in oneDNN's blocked layout
    (a copy, made once)."""

    prepacked = True  # inductor can freeze it but not re-tune its kernel (Transformer.compile_step)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, PACKED_FOR_ROWS))
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def for_decoding(model: Transformer, precision: str = "fp32") -> Transformer:
    """The model to sample a stage with at `precision` (a copy unless fp32; the model is unchanged): a causal
    model (stage 1, the baseline) or a refiner (see the module's docstring)."""
    if precision not in DECODE_PRECISIONS:
        raise CtfgenError(f"--decode-precision must be one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return model
    if precision == "fp32-packed" and (model.head.weight.device.type != "cpu" or not packed_kernels_available()):
        raise CtfgenError("--decode-precision fp32-packed runs on the CPU with oneDNN's packed linear kernels, which "
                          "this device or torch build does not have; use fp32 here")
    fast, causal = copy.deepcopy(model).eval(), model.config.causal  # a refiner's head stays a plain layer
    if precision == "bf16" or (precision == "int8" and not causal):
        fast.to(torch.bfloat16)
        fast.rope_cos, fast.rope_sin = model.rope_cos.clone(), model.rope_sin.clone()  # rotations stay fp32
        if fast.head.weight.device.type == "cpu" and packed_kernels_available(torch.bfloat16):
            swap_linears(fast, PackedLinear, 0, causal)  # gains at every size measured (bench_decode.py --layers)
    elif precision == "fp32-packed":  # a refiner's pass has a row per position, where packing gains at every size
        swap_linears(fast, PackedLinear, PACK_MIN_WEIGHTS if causal else 0, causal)
    else:
        swap_linears(fast, Int8Linear, 0)
    return fast


def refiner_precision(precision: str, compiled: bool, device: torch.device | str, **compile_options: object) -> str:
    """The precision CTF's refiner runs at beside a stage 1 decoding at `precision`, its step `compiled` or not. The
    refiner's one pass is never compiled, so where the compiled step freezes fp32 weights (inductor, the CPU) the
    refiner is packed as fp32-packed packs it (a row per position: from 64 rows packing paid at every layer size)."""
    packs = compiled and precision == "fp32" and compile_freezes(device, **compile_options)
    return "fp32-packed" if packs and packed_kernels_available() else precision


def swap_linears(model: Transformer, swap: type[nn.Module], least: int, head: bool = True) -> None:
    """Replace, in place, every linear layer of the blocks, the model's own (the head too if `head`) with at
    least `least` weights by `swap(layer)`."""
    for parent in [model, *model.blocks.modules()]:
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.weight.numel() >= least and (head or child is not model.head):
                setattr(parent, name, swap(child))


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: the blocks, the final norm and the head (the embeddings are
    read one row per token, which is negligible)."""
    parts = [*model.blocks.modules(), model.norm, model.head]
    return sum(t.numel() * t.element_size() for m in parts for t in [*m.parameters(False), *m.buffers(False)])


__all__ = ["DECODE_PRECISIONS", "Int8Linear", "PACK_MIN_WEIGHTS", "PackedLinear", "for_decoding",
           "packed_kernels_available", "refiner_precision", "weight_bytes_per_token"]
