"""One Llama-style transformer stack, used three ways.

* ``coarse``:   causal, reads and predicts coarse labels (vocabulary K).
* ``baseline``: causal, reads and predicts codewords (vocabulary V); this is LlamaGen's GPT.
* ``refiner``:  bidirectional, reads the whole coarse grid (vocabulary K) and predicts the
  codeword of every position at once (head over V), optionally masked to each position's cluster.
  With ``reveal`` it also reads the codewords already decided (id V = not yet), which lets it
  refine in several steps (`ctfgen.sampling.refine`); with nothing revealed it is the paper's refiner.
  With ``feature_dim`` it also reads a coarse model's last hidden state at each position
  (`Transformer.hidden_states`; computed while stage 1 samples, at no extra cost).

The block follows LlamaGen's GPT (autoregressive/models/gpt.py): pre-norm RMSNorm, fused QKV
attention with 2D rotary embeddings over the token grid, SwiGLU feed-forward, a class token from a
label table with one extra "null" row (the last) for classifier-free guidance, a zero-initialised
output head and N(0, 0.02) for every other matrix. Parameter names are our own; the mapping from
LlamaGen's names lives in ``ctfgen.transformer.llamagen``.

Input sequence layout (all roles): position 0 is the class token, position p >= 1 holds token
p - 1, which sits at grid cell divmod(p - 1, grid_w).
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfgen.artifacts import ArtifactError, load_artifact, save_artifact

from ..errors import CtfgenError

ROLES = ("coarse", "baseline", "refiner")
ARTIFACT_KIND = "transformer"
# How inductor compiles a decode step on the CPU (`Transformer.compile_step`): the weights frozen into the graph,
# constants it may lay out for its kernels, and each product's kernel picked at the first call by timing
# inductor's own C++ GEMM template against ATen's. Timing finds what suits the layer and the CPU, where a fixed
# rule did not (packing every layer doubled a small model's step on an AVX2-only CPU); measured in
# docs/sampling.md ("Compiled decoding").
# The timings are not printed (inductor writes a table per product to stderr otherwise).
CPU_DECODE_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                       "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
COMPILED_STEPS = itertools.count()  # numbers each model's copy of the step it compiles (`Transformer.compile_step`)


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class TransformerConfig:
    """Everything needed to rebuild a model; saved verbatim as config.json."""

    role: str = "baseline"
    vocab_size: int = 16384  # input vocabulary: K for coarse/refiner, V for baseline
    head_size: int | None = None  # output vocabulary; None means vocab_size (causal roles)
    n_layer: int = 12
    n_head: int = 12
    dim: int = 768
    multiple_of: int = 256  # SwiGLU width is rounded up to this (LlamaGen's rule)
    ffn_dim_multiplier: float | None = None
    num_classes: int = 1000
    grid_h: int = 16
    grid_w: int = 16
    causal: bool | None = None  # None: from role (refiner is bidirectional, the others causal)
    reveal: bool = False  # refiner: also reads the fine codes already decided (few-step refinement)
    feature_dim: int = 0  # refiner: also reads stage-1 hidden states of this width (0: no)
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise CtfgenError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.causal is None:
            self.causal = self.role != "refiner"
        if self.causal != (self.role != "refiner"):
            raise CtfgenError(f"role {self.role!r} needs causal={self.role != 'refiner'}")
        if self.reveal and self.role != "refiner":
            raise CtfgenError(f"reveal (reading decided fine codes) is for the refiner, not role {self.role!r}")
        if self.feature_dim and self.role != "refiner":
            raise CtfgenError(f"feature_dim (reading stage-1 hidden states) is for the refiner, not role {self.role!r}")
        if self.feature_dim < 0:
            raise CtfgenError(f"feature_dim must be >= 0, got {self.feature_dim}")
        if self.head_size is None:
            if self.role == "refiner":
                raise CtfgenError("a refiner needs head_size = V (its input vocabulary is K)")
            self.head_size = self.vocab_size
        if self.causal and self.head_size != self.vocab_size:
            # A causal model feeds its own predictions back in, so both vocabularies must agree.
            raise CtfgenError(f"causal role {self.role!r} needs head_size == vocab_size")
        if self.dim % self.n_head != 0:
            raise CtfgenError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4 != 0:
            # 2D RoPE rotates head_dim/2 pairs, half by row and half by column.
            raise CtfgenError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        for name in ("vocab_size", "head_size", "n_layer", "num_classes", "grid_h", "grid_w"):
            if getattr(self, name) < 1:
                raise CtfgenError(f"{name} must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def seq_len(self) -> int:
        """Number of tokens in one image (grid_h * grid_w)."""
        return self.grid_h * self.grid_w

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: 2/3 of 4*dim, optionally scaled, rounded up (LlamaGen)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def null_class(self) -> int:
        """Label id of the unconditional ("null") class row, used for CFG."""
        return self.num_classes

    @property
    def hidden_id(self) -> int:
        """Fine-code id a `reveal` refiner reads where a codeword is not decided yet (one past the last)."""
        return self.head_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# LlamaGen's class-conditional sizes (layers, heads, width; FFN from the rule with multiple_of 256),
# plus small presets that train in minutes on a 2-core CPU for an 8x8 token grid.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768, multiple_of=256),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024, multiple_of=256),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280, multiple_of=256),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536, multiple_of=256),
    "tiny": dict(n_layer=2, n_head=4, dim=64, multiple_of=32),
    "small": dict(n_layer=4, n_head=4, dim=128, multiple_of=32),
    "medium": dict(n_layer=6, n_head=8, dim=256, multiple_of=32),
}


def preset_config(size: str, **fields: Any) -> TransformerConfig:
    """A config from the size registry; `fields` set role, vocab_size, grid_h, ... or override sizes."""
    if size not in MODEL_SIZES:
        raise CtfgenError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
    return TransformerConfig(**{**MODEL_SIZES[size], **fields})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast, as LlamaGen does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_2d_tables(grid_h: int, grid_w: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [1 + grid_h*grid_w, head_dim/2], one row per input position.

    Head dims are rotated in adjacent pairs (2i, 2i+1). The first half of the pairs turn with the
    row index, the second half with the column index, each half using frequencies
    base^(-2j/(head_dim/2)). Row 0 (the class token) is all zeros, not the identity: LlamaGen
    prepends zero rows, which zeroes the class token's query and key; we keep that to match its
    checkpoints exactly.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32) / half))  # [head_dim/4]
    rows = torch.arange(grid_h, dtype=torch.float32)[:, None, None] * freqs  # [H, 1, head_dim/4]
    cols = torch.arange(grid_w, dtype=torch.float32)[None, :, None] * freqs  # [1, W, head_dim/4]
    angles = torch.cat([rows.expand(grid_h, grid_w, -1), cols.expand(grid_h, grid_w, -1)], dim=-1)
    angles = angles.reshape(grid_h * grid_w, half)  # raster order, as the tokens are fed
    zero = torch.zeros(1, half)
    return torch.cat([zero, angles.cos()]), torch.cat([zero, angles.sin()])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., B, n_head, L, head_dim] by cos/sin [L, head_dim/2] (or per row [B, 1, L, head_dim/2]), in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache:
    """Preallocated keys/values for causal decoding: per layer [B, n_head, max_len, head_dim].

    The buffers never move or grow during sampling (attention reads the written slots, a view of
    them), so a compiled step reuses its memory. `pos` counts the input positions already written
    (class token included): an int when every row stands at the same position, or a long tensor [B]
    of per-row positions (speculative sampling, where each row keeps its own number of tokens a round).
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.pos: int | torch.Tensor = 0

    def reset(self) -> None:
        # Stale entries need no clearing: attention never reads beyond `pos`.
        self.pos = 0

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, n_head, L, head_dim] at positions start..start+L (start: an int, or per row [B]);
        return the full buffers."""
        L = k.shape[2]
        if k.shape[0] != self.batch_size:
            raise CtfgenError(f"batch {k.shape[0]} does not match the cache's batch {self.batch_size}")
        if isinstance(start, int):
            end = start + L
            self.check_fits(end)
            self.k[layer][:, :, start:end] = k
            self.v[layer][:, :, start:end] = v
        else:  # row b at slots start[b]..start[b]+L (checked once a pass by the model, not once a layer):
            # index the [B, max_len] dims of a transposed view
            # (an indexed write does not convert dtypes as a slice assignment does: bf16 weights, fp32 cache)
            rows, slots = torch.arange(k.shape[0], device=k.device)[:, None], row_slots(start, L)
            self.k[layer].transpose(1, 2)[rows, slots] = k.transpose(1, 2).to(self.k[layer].dtype)
            self.v[layer].transpose(1, 2)[rows, slots] = v.transpose(1, 2).to(self.v[layer].dtype)
        return self.k[layer], self.v[layer]

    def check_fits(self, end: int) -> None:
        if end > self.max_len:
            raise CtfgenError(f"KV cache overflow: position {end} > max_len {self.max_len}")


def row_slots(start: torch.Tensor, length: int) -> torch.Tensor:
    """Per-row start positions [B] -> the positions [B, length] each row's new tokens take."""
    return start[:, None] + torch.arange(length, device=start.device)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.causal = cfg.n_head, cfg.head_dim, bool(cfg.causal)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # [q; k; v], heads contiguous in each
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.fused_decode = False  # a compiled step's attention as loops of inductor's (set by `compile_step`)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, start: int | torch.Tensor = 0) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        (q, k), v = apply_rope(qkv[:2], cos, sin), qkv[2]  # queries and keys rotated in one call (fewer small ops a step)
        dropout = self.attn_dropout_p if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        else:
            keys, values = cache.update(layer, start, k, v)
            if isinstance(start, int):
                end = start + L
                mask = None  # one new token sees every written slot
                if L > 1:  # several new tokens: each sees the slots up to its own position
                    mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
            else:  # per-row positions: each row's tokens see that row's slots up to their own position; every
                # slot is read under the mask, so no layer waits for the rows' furthest position on the host
                end = cache.max_len
                mask = (torch.arange(end, device=x.device) <= row_slots(start, L)[..., None])[:, None]  # [B, 1, L, end]
            keys, values = keys[:, :, :end], values[:, :, :end]  # the written slots only, in the cache's dtype
            if self.fused_decode and torch.compiler.is_compiling():
                y = fused_decode_attention(q.to(keys.dtype), keys, values, mask).to(q.dtype)
            else:
                y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask,
                                                   dropout_p=dropout).to(q.dtype)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, L, D)))


def fused_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of a decode step's few queries q [B, H, L, D] over the cache's slots [B, H, T, D] (mask: True where
    a query may look, broadcast to [B, H, L, T]), written as broadcast products and sums for inductor on the CPU,
    which fuses them into loops that read the keys and the values once. torch's CPU flash kernel, tiled for many
    queries, read a GPT-B cache several times slower than the memory allows (a compiled GPT-B step, 2 threads: batch
    64 135 -> 103 ms, batch 1 9.5 -> 9.0; docs/sampling.md). Run eagerly, the products would be materialised."""
    scores = (q[:, :, :, None] * keys[:, :, None]).sum(-1) * q.shape[-1] ** -0.5  # [B, H, L, T]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1)[..., None] * values[:, :, None]).sum(-2)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer: int, start: int | torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, start)
        return x + self.ffn(self.ffn_norm(x))


class MemberProduct(torch.autograd.Function):
    """out[n, j] = weight[members[n, j]] . hidden[n], `step` positions at a time. The backward pass gathers the
    rows again rather than keeping them, so training stores hidden states and indices, not N x M x dim weights
    (which at a large width would outgrow the V-wide logits this product replaces)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, members: torch.Tensor, step: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, members)
        ctx.step = step
        return torch.cat([torch.bmm(weight[m].to(h.dtype), h[:, :, None])[..., 0]
                          for h, m in zip(hidden.split(step), members.split(step))])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, members = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, len(hidden), ctx.step):
            part = slice(start, start + ctx.step)
            h, m, g = hidden[part], members[part], grad[part].to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = torch.bmm(g[:, None, :], weight[m].to(h.dtype))[:, 0]
            if grad_weight is not None:
                grad_weight.index_add_(0, m.flatten(), (g[:, :, None] * h[:, None, :]).flatten(0, 1).to(weight.dtype))
        return grad_hidden, grad_weight, None, None


# products per cluster pay off from this much work a cluster (positions x members x width): on a CPU a product
# costs ~20 us to start (~0.2 ms with its backward pass), a gathered weight ~1 ns (~7 ns); measured by
# benchmarks/bench_member_product.py
GROUPED_WORK = 2 ** 14


def products_per_cluster(positions: int, members: int, width: int, clusters: int, backward: bool) -> bool:
    """Whether one product per cluster beats gathering every position's member rows."""
    return positions * members * width >= GROUPED_WORK * clusters * (2 if backward else 1)


def grouped_member_product(hidden: torch.Tensor, weight: torch.Tensor, clusters: torch.Tensor,
                           members: torch.Tensor) -> torch.Tensor:
    """out[n] = weight[members[clusters[n]]] @ hidden[n] as one product per cluster over its positions."""
    order = clusters.argsort(stable=True)
    counts = torch.bincount(clusters, minlength=len(members))
    present = counts.nonzero()[:, 0]
    parts = [h @ weight[members[k]].to(h.dtype).T
             for k, h in zip(present.tolist(), hidden[order].split(counts[present].tolist()))]
    return torch.cat(parts)[order.argsort()]


class Transformer(nn.Module):
    """`model(codes[B,T], class_labels[B]) -> logits[B, T, head_size]` (fp32).

    Causal roles: logits[:, t] predict codes[:, t] from the class and codes[:, :t] (the last code
    is never read). Refiner: logits[:, t] predict the codeword at t from the whole coarse grid.
    During training (``model.train()``) class labels are replaced by the null id with probability
    ``class_dropout_prob``, drawn from the global torch RNG (like nn.Dropout), so
    ``torch.manual_seed`` makes training reproducible on CPU.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.class_embed = nn.Embedding(config.num_classes + 1, config.dim)  # last row = null class
        self.tok_embed = nn.Embedding(config.vocab_size, config.dim)
        # added to the coarse-code embedding; zero at first, so a fresh reveal refiner starts as a plain one
        self.fine_embed = nn.Embedding(config.head_size + 1, config.dim) if config.reveal else None
        self.feature_proj = nn.Linear(config.feature_dim, config.dim, bias=False) if config.feature_dim else None  # likewise
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.head_size, bias=False)
        cos, sin = rope_2d_tables(config.grid_h, config.grid_w, config.head_dim, config.rope_base)
        # Recomputed from the config, so not saved with the weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        # A zero head makes every initial prediction uniform.
        nn.init.zeros_(self.head.weight)
        for extra in (self.fine_embed, self.feature_proj):
            if extra is not None:
                nn.init.zeros_(extra.weight)

    @property
    def null_class(self) -> int:
        return self.config.null_class

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compile_step(self, **options: Any) -> None:
        """Compile the decode step (torch.compile; `options` go to it, e.g. backend). Two graphs: with the cache at
        one integer position that position is dynamic, so one graph serves every position; with per-row positions
        (speculative verification, several tokens a row) the shapes are fixed, as they are for a whole sample, and
        a graph of fixed shapes is what inductor's C++ GEMM template compiles for several tokens a row (over a
        symbolic row count it failed and the products fell back to slower kernels).
        On the CPU inductor compiles under CPU_DECODE_INDUCTOR (frozen weights, each product's kernel chosen by
        timing; layers already packed for oneDNN, `--decode-precision bf16`, it can only freeze, not re-tune), and
        attention as its own fused loops (`fused_decode_attention`)."""
        # Dynamo keeps the graphs of one code up to a limit (8), then runs that code eagerly, and it tells codes
        # apart by value. `step` compiled as it is (a method under no_grad) went through one torch wrapper shared by
        # every such function, so a process compiling several models (stage 1 and the baseline, a graph per
        # verification length) ran some of them eagerly. Each model compiles its own numbered copy of the bare step.
        bare = type(self).step.__wrapped__
        code = bare.__code__.replace(co_name=f"step_{next(COMPILED_STEPS)}")
        step = types.FunctionType(code, bare.__globals__, code.co_name, bare.__defaults__, bare.__closure__)
        by_position = torch.compile(step, dynamic=True, **options)
        by_row = torch.compile(step, dynamic=False, **options)
        settings = None
        if compile_freezes(self.head.weight.device, **options):
            from torch._inductor import config as inductor_config

            prepacked = any(getattr(m, "prepacked", False) for m in self.modules())
            settings = {"freezing": True} if prepacked else CPU_DECODE_INDUCTOR
            for block in self.blocks:
                block.attn.fused_decode = True

        @torch.no_grad()
        def compiled_step(codes: torch.Tensor, cache: KVCache, with_hidden: bool = False) -> Any:
            graph = by_row if isinstance(cache.pos, torch.Tensor) else by_position
            if settings is None:
                return graph(self, codes, cache, with_hidden)
            # The settings must hold while inductor compiles, which happens at the first calls (and at a new shape);
            # torch.compile's options={"freezing": True} left the products as plain aten::mm (torch 2.13), the patch
            # does not. It costs ~10 us a call: nothing at GPT-B, a few per cent of a compiled small-shape step
            with inductor_config.patch(settings):
                return graph(self, codes, cache, with_hidden)

        self.step = compiled_step  # the instance attribute shadows the method

    def make_cache(self, batch_size: int, dtype: torch.dtype | None = None, spare: int = 0) -> KVCache:
        """A cache for causal decoding of one full image (class token + seq_len - 1 tokens), and `spare`
        slots past it (where speculative rounds feed the rows that are already done)."""
        p = self.tok_embed.weight  # the activations' dtype (an int8 head would not say it)
        return KVCache(self.config.n_layer, batch_size, self.config.n_head, self.config.seq_len + spare,
                       self.config.head_dim, device=p.device, dtype=dtype or p.dtype)

    def _class_token(self, class_labels: torch.Tensor) -> torch.Tensor:
        if class_labels.dim() != 1:
            raise CtfgenError(f"class_labels must be [B], got shape {tuple(class_labels.shape)}")
        if self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
            class_labels = torch.where(drop, torch.full_like(class_labels, self.null_class), class_labels)
        return self.class_embed(class_labels)[:, None]  # [B, 1, dim]

    def _run(self, h: torch.Tensor, start: int | torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Blocks + final norm over input positions start..start+L (start: an int, or per row [B] with a
        cache): the last hidden states (`head` makes logits)."""
        L, positions = h.shape[1], self.rope_cos.shape[0]
        if isinstance(start, int):
            if start + L > positions:
                raise CtfgenError(f"sequence of {start + L} positions exceeds 1 + grid ({positions})")
            cos, sin = self.rope_cos[start:start + L], self.rope_sin[start:start + L]
        else:  # positions past the grid are a finished row's spare slots: any angle will do, nothing reads them
            if cache is None:
                raise CtfgenError("per-row positions need a KV cache")
            if not torch.compiler.is_compiling():  # a host sync: it would split a compiled step in two
                cache.check_fits(int(start.max()) + L)
            slots = row_slots(start, L).clamp(max=positions - 1)
            cos, sin = self.rope_cos[slots][:, None], self.rope_sin[slots][:, None]  # [B, 1, L, head_dim / 2]
        h = self.tok_dropout(h)
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, cache, i, start)
        if cache is not None:
            cache.pos = start + L
        return self.norm(h)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of last hidden states (`hidden_states`, or what `prefill`/`step` return with_hidden)."""
        return self.head(hidden).float()

    def _check_codes(self, codes: torch.Tensor, batch: int) -> None:
        if codes.dim() != 2 or codes.shape[0] != batch:
            raise CtfgenError(f"codes must be [B={batch}, T], got shape {tuple(codes.shape)}")

    def forward(self, codes: torch.Tensor, class_labels: torch.Tensor, member_mask: torch.Tensor | None = None,
                fine: torch.Tensor | None = None, features: torch.Tensor | None = None,
                within: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Full-sequence logits [B, T, head_size] (training and scoring).

        member_mask: refiner only, bool [K, V]; when given, logits of codewords outside each
        position's cluster (the cluster given by its coarse code) become -inf.
        within: refiner only, `cluster_members(member_mask)`: instead, the logits of each position's cluster
        members only, [B, T, M] in the order of members[k] (-inf at the padding); the same softmax within
        clusters, but the head's product costs M columns, not V (training within clusters).
        fine: `reveal` refiner only, long [B, T]: the fine codes decided so far, `hidden_id` elsewhere;
        None means none decided.
        features: refiner with `feature_dim` only, float [B, T, feature_dim]: the coarse model's
        `hidden_states` of the coarse codes.
        """
        self._check_codes(codes, class_labels.shape[0])
        T = codes.shape[1]
        if not 1 <= T <= self.config.seq_len:
            raise CtfgenError(f"T={T} must be in 1..{self.config.seq_len} (grid {self.config.grid_h}x{self.config.grid_w})")
        if self.config.causal:
            if member_mask is not None or within is not None:
                raise CtfgenError("member_mask and within apply only to the refiner")
            h = torch.cat([self._class_token(class_labels), self.tok_embed(codes[:, :-1])], dim=1)  # the last code predicts nothing
            return self.head_logits(self._run(h, 0, None))
        hidden = self.refiner_states(codes, class_labels, fine, features)
        if within is not None:
            members, is_member = within
            return self.member_logits(hidden, codes, members).masked_fill(~is_member[codes], float("-inf"))
        logits = self.head_logits(hidden)
        if member_mask is not None:
            logits = mask_to_clusters(logits, codes, member_mask)
        return logits

    def refiner_states(self, codes: torch.Tensor, class_labels: torch.Tensor, fine: torch.Tensor | None = None,
                       features: torch.Tensor | None = None) -> torch.Tensor:
        """The refiner's last hidden state at each position [B, T, dim] (`forward` without the head)."""
        self._check_codes(codes, class_labels.shape[0])
        tokens = self.tok_embed(codes)
        if self.fine_embed is not None:
            if fine is None:
                fine = torch.full_like(codes, self.config.hidden_id)
            elif fine.shape != codes.shape:
                raise CtfgenError(f"fine must have the coarse codes' shape {tuple(codes.shape)}, got {tuple(fine.shape)}")
            tokens = tokens + self.fine_embed(fine)
        elif fine is not None:
            raise CtfgenError("this refiner was not trained to read decided fine codes (train it with --reveal)")
        if self.feature_proj is not None:
            expected = (*codes.shape, self.config.feature_dim)
            if features is None or tuple(features.shape) != expected:
                raise CtfgenError(f"this refiner reads stage-1 features {expected}, got "
                                  f"{None if features is None else tuple(features.shape)}")
            tokens = tokens + self.feature_proj(features.to(tokens.dtype))
        elif features is not None:
            raise CtfgenError("this refiner was not trained to read stage-1 features (train it with --stage1-features)")
        h = torch.cat([self._class_token(class_labels), tokens], dim=1)
        return self._run(h, 0, None)[:, 1:]  # the class token's output predicts nothing

    def member_logits(self, hidden: torch.Tensor, clusters: torch.Tensor, members: torch.Tensor,
                      chunk: int = 2 ** 24) -> torch.Tensor:
        """fp32 logits [..., M] of each position's cluster members only (`members` [K, M], as `cluster_members`
        gives, `clusters` [...] the positions' clusters), from hidden states [..., dim]: the head's rows for
        those codewords, so a refiner restricted to each position's cluster pays for M, not V, of them
        (differentiable). Few positions a cluster: each position's M rows gathered (in chunks of at most
        `chunk` weights); many: one product per cluster over all its positions (at V = 16384 and K = 32 the
        head trains 35-50x faster so)."""
        flat_h, flat_c = hidden.reshape(-1, hidden.shape[-1]), clusters.reshape(-1)
        weight, m, dim = self.head.weight, members.shape[1], hidden.shape[-1]
        backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        if products_per_cluster(len(flat_c), m, dim, int(torch.bincount(flat_c).count_nonzero()), backward):
            logits = grouped_member_product(flat_h, weight, flat_c, members)
        else:
            logits = MemberProduct.apply(flat_h, weight, members[flat_c], max(1, chunk // (m * dim)))
        return logits.float().view(*clusters.shape, m)

    @torch.no_grad()
    def hidden_states(self, codes: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Causal models: the last hidden state [B, T, dim] whose logits predict each of codes [B, T] (it has
        read the class and the codes before it): what a refiner with `feature_dim` reads. Teacher-forced."""
        if not self.config.causal:
            raise CtfgenError("hidden_states are a causal model's")
        self._check_codes(codes, class_labels.shape[0])
        h = torch.cat([self._class_token(class_labels), self.tok_embed(codes[:, :-1])], dim=1)
        return self._run(h, 0, None)

    @torch.no_grad()
    def prefill(self, class_labels: torch.Tensor, cache: KVCache, codes: torch.Tensor | None = None,
                with_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Start causal decoding: feed the class token (and optional known prefix codes [B, n]).

        Resets the cache. Returns logits [B, 1 + n, head_size]; row i predicts token i (with_hidden: and
        the hidden states those logits came from).
        Pass null labels (``model.null_class``) in the batch for classifier-free guidance.
        """
        if not self.config.causal:
            raise CtfgenError("prefill/step are for causal models; the refiner runs in one forward")
        cache.reset()
        h = self._class_token(class_labels)
        if codes is not None:
            self._check_codes(codes, class_labels.shape[0])
            h = torch.cat([h, self.tok_embed(codes)], dim=1)
        hidden = self._run(h, 0, cache)
        return (self.head_logits(hidden), hidden) if with_hidden else self.head_logits(hidden)

    @torch.no_grad()
    def step(self, codes: torch.Tensor, cache: KVCache,
             with_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Feed the next codes [B, n] after what the cache holds; logits [B, n, head_size] (with_hidden: and
        their hidden states).

        With the cache at position p (class token + p - 1 tokens), row i predicts token p + i; with per-row
        positions (`cache.pos` a tensor [B]) each batch row reads and writes at its own p.
        """
        if not self.config.causal:
            raise CtfgenError("prefill/step are for causal models; the refiner runs in one forward")
        if isinstance(cache.pos, int) and cache.pos == 0:
            raise CtfgenError("call prefill before step")
        self._check_codes(codes, cache.batch_size)
        hidden = self._run(self.tok_embed(codes), cache.pos, cache)
        return (self.head_logits(hidden), hidden) if with_hidden else self.head_logits(hidden)


def mask_to_clusters(logits: torch.Tensor, coarse_codes: torch.Tensor, member_mask: torch.Tensor) -> torch.Tensor:
    """Set logits [B, T, V] to -inf wherever codeword v is not in cluster coarse_codes[b, t].

    member_mask: bool [K, V], member_mask[k, v] is True iff codeword v belongs to cluster k.
    """
    if member_mask.dtype != torch.bool or member_mask.dim() != 2 or member_mask.shape[1] != logits.shape[-1]:
        raise CtfgenError(f"member_mask must be bool [K, {logits.shape[-1]}], got {member_mask.dtype} {tuple(member_mask.shape)}")
    allowed = member_mask.to(logits.device)[coarse_codes]  # [B, T, V]
    return logits.masked_fill(~allowed, float("-inf"))


def compile_freezes(device: torch.device, **compile_options: Any) -> bool:
    """Whether `Transformer.compile_step` with these options freezes the weights into the graph, where inductor
    lays them out for its own kernels (as `--decode-precision fp32-packed` does for oneDNN's): inductor on the CPU."""
    return compile_options.get("backend", "inductor") == "inductor" and torch.device(device).type == "cpu"


def cluster_members(member_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """member_mask bool [K, V] -> (members long [K, M], is_member bool [K, M]): each cluster's codewords in
    ascending order, padded to the largest cluster's size M (padding repeats codeword 0, is_member False).
    Scoring and drawing among M members instead of all V codewords is what makes the masked refiner cheap."""
    k, v = member_mask.nonzero(as_tuple=True)  # row-major: by cluster, then codeword
    size = torch.bincount(k, minlength=member_mask.shape[0])  # (not member_mask.sum(1): 5x slower over K x V)
    first = size.cumsum(0) - size  # where each cluster's members start in (k, v)
    members = torch.zeros(member_mask.shape[0], int(size.max()), dtype=torch.long, device=member_mask.device)
    members[k, torch.arange(len(k), device=k.device) - first[k]] = v
    return members, torch.arange(members.shape[1], device=members.device) < size[:, None]


def build_model(config: TransformerConfig) -> Transformer:
    """A freshly initialised model (build under ``with torch.device("meta"):`` to only count)."""
    return Transformer(config)


def save_model(model: Transformer, folder: str | Path) -> None:
    """Write config.json ("kind": "transformer" + config fields) and model.safetensors."""
    save_artifact(folder, {"kind": ARTIFACT_KIND, **model.config.to_dict()}, model.state_dict())


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild a model saved by `save_model` (in eval mode)."""
    raw, tensors = load_artifact(folder, ARTIFACT_KIND, device)
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    config_dict = {k: v for k, v in raw.items() if k != "kind"}
    unknown = set(config_dict) - fields
    if unknown:
        raise ArtifactError(f"{folder}: unknown transformer config fields {sorted(unknown)}")
    try:
        config = TransformerConfig(**config_dict)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{folder}: invalid transformer config: {e}") from None
    with torch.device(device):
        model = Transformer(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{folder}: weights do not fit the config: {e}") from None
    return model.eval()


__all__ = [
    "ARTIFACT_KIND", "CPU_DECODE_INDUCTOR", "KVCache", "MODEL_SIZES", "ROLES", "Transformer", "TransformerConfig",
    "compile_freezes", "apply_rope", "build_model", "cluster_members", "find_multiple", "load_model", "mask_to_clusters",
    "preset_config", "rope_2d_tables", "row_slots", "save_model",
]
