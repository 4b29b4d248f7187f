"""Tests for ctfgen.transformer: sizes, masking, KV cache, save/load and LlamaGen import."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ctfgen.artifacts import ArtifactError
from ctfgen.transformer import (
    KVCache,
    Transformer,
    TransformerConfig,
    build_model,
    import_llamagen_gpt,
    load_model,
    preset_config,
    save_model,
)
from ctfgen.transformer.llamagen import convert_llamagen_state_dict

NO_DROPOUT = dict(class_dropout_prob=0.0, token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def tiny(role: str = "baseline", vocab: int = 32, head: int | None = None, grid: int = 4, **kw) -> Transformer:
    """A tiny fp32 model in eval mode with a random (non-zero) head so logits differ per position."""
    torch.manual_seed(0)
    cfg = preset_config("tiny", role=role, vocab_size=vocab, head_size=head, num_classes=10,
                        grid_h=grid, grid_w=grid, **{**NO_DROPOUT, **kw})
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def meta_params(size: str, vocab: int) -> int:
    with torch.device("meta"):
        model = build_model(preset_config(size, vocab_size=vocab, num_classes=1000, grid_h=16, grid_w=16))
    return model.num_params()


# ---------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("size,vocab,expected", [
    ("GPT-B", 16384, 111e6), ("GPT-B", 512, 87e6),     # LlamaGen-B and the paper's coarse B model
    ("GPT-L", 16384, 343e6), ("GPT-L", 512, 310e6),
    ("GPT-XL", 16384, 775e6), ("GPT-XL", 512, 734e6),
    ("GPT-XXL", 16384, 1.4e9),
])
def test_llamagen_parameter_counts(size: str, vocab: int, expected: float) -> None:
    n = meta_params(size, vocab)
    assert abs(n - expected) / expected < 0.01, f"{size} V={vocab}: {n:,} params"


def test_gpt_b_ffn_width_matches_llamagen() -> None:
    assert [preset_config(s).ffn_dim for s in ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL")] == [2048, 2816, 3584, 4096]


def test_small_presets_build() -> None:
    counts = []
    for size in ("tiny", "small", "medium"):
        model = build_model(preset_config(size, vocab_size=512, num_classes=10, grid_h=8, grid_w=8))
        counts.append(model.num_params())
    assert counts == sorted(counts) and counts[0] < 200_000


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="head_size"):
        TransformerConfig(role="refiner", vocab_size=8)
    with pytest.raises(ValueError, match="head_size == vocab_size"):
        TransformerConfig(role="coarse", vocab_size=8, head_size=16)
    with pytest.raises(ValueError, match="causal"):
        TransformerConfig(role="refiner", vocab_size=8, head_size=16, causal=True)
    with pytest.raises(ValueError, match="role"):
        TransformerConfig(role="decoder")
    assert TransformerConfig(role="refiner", vocab_size=8, head_size=16).causal is False


# ------------------------------------------------------------------------------------- behaviour

def test_output_head_zero_initialised() -> None:
    model = build_model(preset_config("tiny", vocab_size=32, num_classes=10, grid_h=4, grid_w=4)).eval()
    logits = model(torch.randint(0, 32, (2, 16)), torch.tensor([1, 2]))
    assert logits.shape == (2, 16, 32) and logits.dtype == torch.float32
    assert torch.all(logits == logits.flatten()[0])


def test_causal_masking() -> None:
    model = tiny("coarse", vocab=16)
    codes, labels = torch.randint(0, 16, (2, 16)), torch.tensor([3, 4])
    base = model(codes, labels)
    for t in (0, 5, 14):
        changed = codes.clone()
        changed[:, t] = (changed[:, t] + 1) % 16
        out = model(changed, labels)
        # Position t predicts token t from tokens < t, so positions 0..t must not move.
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])
    # The last token is never read, and the class label reaches every position.
    changed = codes.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 16
    torch.testing.assert_close(model(changed, labels), base, rtol=0, atol=0)
    assert not torch.allclose(model(codes, torch.tensor([5, 6]))[:, 0], base[:, 0])


def test_refiner_is_bidirectional() -> None:
    model = tiny("refiner", vocab=8, head=32)
    codes, labels = torch.randint(0, 8, (2, 16)), torch.tensor([1, 2])
    base = model(codes, labels)
    assert base.shape == (2, 16, 32)
    changed = codes.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 8
    out = model(changed, labels)
    moved = (out - base).abs().amax(dim=(0, 2)) > 1e-6
    assert moved[:10].all() and moved[11:].all()  # earlier and later positions both see the change


def test_refiner_member_mask_restricts_to_cluster() -> None:
    K, V = 8, 32
    model = tiny("refiner", vocab=K, head=V)
    coarse_of = torch.arange(V) % K  # every cluster has 4 members
    member_mask = torch.zeros(K, V, dtype=torch.bool)
    member_mask[coarse_of, torch.arange(V)] = True
    codes, labels = torch.randint(0, K, (3, 16)), torch.tensor([0, 1, 2])
    probs = model(codes, labels, member_mask=member_mask).softmax(-1)
    outside = ~member_mask[codes]
    assert torch.all(probs[outside] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 16))
    assert torch.all(probs[~outside] > 0)
    with pytest.raises(ValueError, match="refiner"):
        tiny("coarse", vocab=K)(codes, labels, member_mask=member_mask)


def test_member_product_gradients_in_chunks() -> None:
    """The members-only head product (training within clusters) recomputes its gathered rows in the backward
    pass: its gradients are the exact ones, whatever the chunking."""
    from ctfgen.transformer.model import MemberProduct

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(12, 5, dtype=torch.float64, generator=g, requires_grad=True)
    members = torch.randint(0, 12, (7, 3), generator=g)  # repeated rows too: their gradients add up
    for step in (1, 2, 7):
        assert torch.autograd.gradcheck(lambda h, w: MemberProduct.apply(h, w, members, step), (hidden, weight))
    torch.testing.assert_close(MemberProduct.apply(hidden, weight, members, 3),
                               torch.einsum("nmd,nd->nm", weight[members], hidden))


def test_member_product_per_cluster() -> None:
    """The same product as one matrix product per cluster (where clusters hold many positions): the same values
    and gradients, positions of a cluster scattered and clusters absent."""
    from ctfgen.transformer.model import grouped_member_product

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(12, 5, dtype=torch.float64, generator=g, requires_grad=True)
    table = torch.randperm(12, generator=g).view(4, 3)  # 4 clusters of 3 codewords
    clusters = torch.tensor([2, 0, 2, 3, 0, 0, 2, 3, 0])  # cluster 1 absent
    assert torch.autograd.gradcheck(lambda h, w: grouped_member_product(h, w, clusters, table), (hidden, weight))
    torch.testing.assert_close(grouped_member_product(hidden, weight, clusters, table),
                               torch.einsum("nmd,nd->nm", weight[table[clusters]], hidden))


def test_class_dropout_uses_null_row() -> None:
    model = tiny("baseline", class_dropout_prob=1.0)
    codes, labels = torch.randint(0, 32, (2, 16)), torch.tensor([1, 2])
    null = torch.full_like(labels, model.null_class)
    model.train()
    dropped = model(codes, labels)
    model.eval()
    torch.testing.assert_close(dropped, model(codes, null))
    assert model.class_embed.num_embeddings == 11  # 10 classes + null row


# -------------------------------------------------------------------------------------- KV cache

def test_kv_cache_matches_full_forward() -> None:
    model = tiny("baseline")
    B, T = 3, 16
    codes = torch.randint(0, 32, (B, T))
    labels = torch.tensor([1, 2, model.null_class])  # a CFG-style batch with a null row
    full = model(codes, labels)

    cache = model.make_cache(B)
    assert isinstance(cache, KVCache) and cache.k[0].shape == (B, 4, T, 16)
    steps = [model.prefill(labels, cache)]
    for t in range(T - 1):
        steps.append(model.step(codes[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)

    # A prefix prefill and a multi-token step give the same logits, and the cache is reusable.
    head = model.prefill(labels, cache, codes=codes[:, :5])
    tail = model.step(codes[:, 5:-1], cache)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="overflow"):
        model.step(codes[:, :1], cache)


def test_kv_cache_with_a_position_per_row_matches_full_forward() -> None:
    """Rows that stand at different positions (speculative sampling) each read and write their own slots:
    every row's logits equal the full forward pass's, and stale slots past a row's position are never read."""
    model = tiny("baseline")
    B, T = 3, 16
    codes = torch.randint(0, 32, (B, T))
    labels = torch.tensor([1, 2, model.null_class])
    full = model(codes, labels)
    cache = model.make_cache(B, spare=4)
    assert cache.max_len == T + 4
    model.prefill(labels, cache)
    model.step(codes[:, :8], cache)  # slots 1..8 of every row hold codes[:, :8]
    t = torch.tensor([1, 4, 9])
    cache.pos = t  # row b goes back to t[b]: its slots from t[b] on hold codes it must not read yet
    logits = model.step(torch.stack([codes[b, t[b] - 1:t[b] + 2] for b in range(B)]), cache)  # 3 tokens a row
    assert torch.equal(cache.pos, t + 3)
    for b in range(B):
        torch.testing.assert_close(logits[b], full[b, t[b]:t[b] + 3], rtol=0, atol=1e-4)
    # a row whose new tokens run past the grid (a finished row in its spare slots) raises nothing
    cache.pos = torch.tensor([T, 2, 3])
    model.step(codes[:, :4], cache)
    with pytest.raises(ValueError, match="overflow"):
        cache.pos = torch.tensor([T + 1, 2, 3])
        model.step(codes[:, :4], cache)


def test_a_compiled_step_with_a_position_per_row_is_one_graph() -> None:
    """The cache's overflow check reads the rows' furthest position on the host; a compiled step skips it, so a
    speculative pass is one graph, not two around a sync (its logits are the eager step's)."""
    import torch._dynamo

    model = tiny("baseline")
    codes, labels, t = torch.randint(0, 32, (3, 16)), torch.tensor([1, 2, 0]), torch.tensor([1, 4, 9])
    logits = []
    for compiled in (False, True):
        cache = model.make_cache(3, spare=4)
        model.prefill(labels, cache)
        model.step(codes[:, :8], cache)
        cache.pos = t
        tokens = torch.stack([codes[b, t[b] - 1:t[b] + 2] for b in range(3)])
        if compiled:
            torch._dynamo.reset()
            assert torch._dynamo.explain(model.step)(tokens, cache).graph_break_count == 0
            cache.pos = t
        logits.append((torch.compile(model.step, backend="eager") if compiled else model.step)(tokens, cache))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)


def test_fused_decode_attention_is_torchs_attention() -> None:
    """The compiled CPU step's attention (broadcast products and sums) against torch's kernel: one query over every
    written slot, and several queries a row under a per-row causal mask (verification passes)."""
    from ctfgen.transformer.model import fused_decode_attention, row_slots

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 4, 9, 16), torch.randn(3, 4, 9, 16)
    torch.testing.assert_close(fused_decode_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))
    q = torch.randn(3, 4, 3, 16)
    mask = (torch.arange(9) <= row_slots(torch.tensor([2, 5, 6]), 3)[..., None])[:, None]  # [B, 1, L, T]
    torch.testing.assert_close(fused_decode_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_several_compiled_models_each_keep_their_graphs() -> None:
    """Dynamo keeps at most 8 graphs of one code and runs it eagerly past that: three models compiled in one process,
    each stepping at one position and in verification passes of four lengths (15 graphs), all run their graphs
    (the steps compiled through one shared wrapper ran the last seven eagerly) and give the eager steps' logits."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    models, eager = [tiny("coarse") for _ in range(3)], [tiny("coarse") for _ in range(3)]
    for m, e in zip(models, eager):
        m.load_state_dict(e.state_dict())
        m.compile_step(backend="eager")
    for m, e in zip(models, eager):
        for length in range(1, 6):
            logits = []
            for model in (m, e):
                cache = model.make_cache(2, spare=5)
                model.prefill(torch.tensor([0, 1]), cache)
                cache.pos = 1 if length == 1 else torch.tensor([1, 1])
                logits.append(model.step(torch.zeros(2, length, dtype=torch.long), cache))
            assert torch.equal(logits[0], logits[1]) and not logits[0].requires_grad
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 15


# ----------------------------------------------------------------------------------- save / load

def test_save_load_round_trip(tmp_path) -> None:
    model = tiny("refiner", vocab=8, head=32)
    save_model(model, tmp_path / "refiner")
    config = json.loads((tmp_path / "refiner" / "config.json").read_text())
    assert config["kind"] == "transformer" and config["role"] == "refiner" and config["head_size"] == 32
    loaded = load_model(tmp_path / "refiner")
    codes, labels = torch.randint(0, 8, (2, 16)), torch.tensor([1, 2])
    assert torch.equal(loaded(codes, labels), model(codes, labels))
    assert loaded.config == model.config and not loaded.training

    config["n_layer"] = 3
    (tmp_path / "refiner" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_model(tmp_path / "refiner")


# ------------------------------------------------------------------------------- LlamaGen import

def llamagen_shapes(n_layer: int, dim: int, ffn: int, vocab: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a LlamaGen c2i GPT state dict (gpt.py, class dropout > 0)."""
    shapes = {
        "cls_embedding.embedding_table.weight": (num_classes + 1, dim),
        "tok_embeddings.weight": (vocab, dim),
        "norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    for i in range(n_layer):
        shapes |= {
            f"layers.{i}.attention.wqkv.weight": (3 * dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, dim),
            f"layers.{i}.feed_forward.w1.weight": (ffn, dim),
            f"layers.{i}.feed_forward.w3.weight": (ffn, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, ffn),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        }
    return shapes


def test_llamagen_gpt_b_keys_cover_model() -> None:
    shapes = llamagen_shapes(12, 768, 2048, 16384, 1000)
    with torch.device("meta"):
        src = {k: torch.empty(s) for k, s in shapes.items()}
        model = build_model(preset_config("GPT-B", num_classes=1000, grid_h=16, grid_w=16))
    converted = convert_llamagen_state_dict(src, n_layer=12)
    assert len(converted) == len(src)  # one-to-one
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(math.prod(s) for s in shapes.values()) == model.num_params()


TINY_LLAMAGEN = dict(n_layer=2, n_head=4, dim=64, multiple_of=256, num_classes=16, vocab_size=32, grid_h=4, grid_w=4)


def random_llamagen_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = llamagen_shapes(2, 64, 256, 32, 16)  # dim 64 -> int(2*256/3)=170 -> 256 (multiple_of 256)
    sd = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights: near one, but not exactly, so they matter
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = (0.2 if name == "output.weight" else 0.1) * torch.randn(shape, generator=g)
    return sd


def test_llamagen_key_coverage_and_wrappers() -> None:
    sd = random_llamagen_state_dict()
    config = TransformerConfig(role="baseline", **TINY_LLAMAGEN)
    model_keys = set(build_model(config).state_dict())
    assert set(convert_llamagen_state_dict(sd, 2)) == model_keys

    wrapped = {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "steps": 10}
    assert set(convert_llamagen_state_dict(wrapped, 2)) == model_keys
    for key in ("module", "state_dict"):
        assert set(convert_llamagen_state_dict({key: {f"module.{k}": v for k, v in sd.items()}}, 2)) == model_keys
    # Recomputed buffers are tolerated, anything else is not.
    assert set(convert_llamagen_state_dict({**sd, "freqs_cis": torch.zeros(17, 8, 2)}, 2)) == model_keys
    with pytest.raises(ValueError, match="unmapped"):
        convert_llamagen_state_dict({**sd, "extra.weight": torch.zeros(1)}, 2)
    with pytest.raises(ValueError, match="missing"):
        convert_llamagen_state_dict({k: v for k, v in sd.items() if k != "layers.1.ffn_norm.weight"}, 2)
    with pytest.raises(ValueError, match="shape"):
        import_llamagen_gpt(sd, config=TransformerConfig(role="baseline", **{**TINY_LLAMAGEN, "num_classes": 15}))


def reference_llamagen_logits(sd: dict[str, torch.Tensor], codes: torch.Tensor, labels: torch.Tensor,
                              n_head: int, grid: int, eps: float = 1e-5, base: float = 10000.0) -> torch.Tensor:
    """LlamaGen's training-mode c2i forward (dropout off), re-derived in float64 with complex RoPE."""
    sd = {k: v.double() for k, v in sd.items()}
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    dim = sd["tok_embeddings.weight"].shape[1]
    hd = dim // n_head

    def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    # Per grid cell (r, c): head pairs 0..hd/4-1 rotate by r*f_j, pairs hd/4..hd/2-1 by c*f_j;
    # f_j = base^(-2j/(hd/2)). The class token's factor is 0 (LlamaGen prepends zero rows).
    f = base ** (-torch.arange(hd // 4, dtype=torch.float64) * 2 / (hd // 2))
    rot = torch.zeros(1 + grid * grid, hd // 2, dtype=torch.complex128)
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        rot[1 + p] = torch.polar(torch.ones(hd // 2, dtype=torch.float64), torch.cat([r * f, c * f]))

    x = torch.cat([sd["cls_embedding.embedding_table.weight"][labels][:, None],
                   sd["tok_embeddings.weight"][codes[:, :-1]]], dim=1)
    B, L, _ = x.shape
    rope = rot[:L]

    def rotate(t: torch.Tensor) -> torch.Tensor:  # t: [B, L, H, hd]
        tc = torch.view_as_complex(t.reshape(B, L, n_head, hd // 2, 2).contiguous())
        return torch.view_as_real(tc * rope[None, :, None]).reshape(B, L, n_head, hd)

    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(n_layer):
        p = f"layers.{i}."
        h = rmsnorm(x, sd[p + "attention_norm.weight"]) @ sd[p + "attention.wqkv.weight"].T
        q, k, v = (t.reshape(B, L, n_head, hd) for t in h.split(dim, dim=-1))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhlm,bmhd->blhd", att, v).reshape(B, L, dim)
        x = x + y @ sd[p + "attention.wo.weight"].T
        h = rmsnorm(x, sd[p + "ffn_norm.weight"])
        a, b = h @ sd[p + "feed_forward.w1.weight"].T, h @ sd[p + "feed_forward.w3.weight"].T
        x = x + (a * torch.sigmoid(a) * b) @ sd[p + "feed_forward.w2.weight"].T
    return rmsnorm(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_llamagen_import_numeric_identity() -> None:
    sd = random_llamagen_state_dict()
    model = import_llamagen_gpt({"model": sd}, config=TransformerConfig(role="baseline", **TINY_LLAMAGEN))
    torch.manual_seed(2)
    codes, labels = torch.randint(0, 32, (3, 16)), torch.tensor([0, 15, 16])  # 16 = null class
    expected = reference_llamagen_logits(sd, codes, labels, n_head=4, grid=4)
    got = model(codes, labels)
    assert expected.abs().max() > 0.5  # logits are far from trivial
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
