"""Lower-precision decoding (ctfgen.transformer.precision): close to fp32, consistent with itself through
the KV cache, never touching the original model, and reachable from the pipelines and `ctfgen sample`."""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ctfgen.errors import CtfgenError
from ctfgen.pipeline import add_sample_args, cmd_sample, load_pipeline
from ctfgen.sampling import decode_cache
from ctfgen.transformer import build_model, preset_config
from ctfgen.transformer import precision as precision_module
from ctfgen.transformer.precision import (DECODE_PRECISIONS, PACK_MIN_WEIGHTS, Int8Linear, PackedLinear, for_decoding,
                                          packed_kernels_available, weight_bytes_per_token)
from test_sampling import gen


def causal_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", role="baseline", vocab_size=64, num_classes=3, grid_h=4, grid_w=4))
    nn.init.normal_(model.head.weight, std=0.1)
    return model.eval()


def test_int8_linear_is_the_rounded_matrix() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127  # each row's largest weight maps to +-127
    widened = q.weight.float() * q.scale.float()[:, None]
    assert (widened - linear.weight).abs().max() <= q.scale.float().max()  # half a step, plus the bf16 scale's rounding
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(q(x), x @ widened.t(), rtol=0.02, atol=0.02)  # bf16 activations
    assert q(x).dtype == torch.float32 and q(x).shape == (5, 3, 48)
    with pytest.raises(CtfgenError, match="bias-free"):
        Int8Linear(nn.Linear(4, 4))


@pytest.mark.parametrize("precision", ["fp32-packed", "bf16", "int8"])
def test_lower_precision_copy_is_close_and_its_cache_agrees(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "PACK_MIN_WEIGHTS", 0)  # pack even the tiny model's layers
    model = causal_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = for_decoding(model, precision)
    assert fast is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([0, 2])
    with torch.no_grad():
        exact, approx = model(codes, labels), fast(codes, labels)
        assert approx.dtype == torch.float32
        assert (approx - exact).abs().max() < 0.05 * exact.abs().max()
        assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9
        if precision == "fp32-packed":  # the same numbers summed in another order
            torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-5)
            assert all(not isinstance(m, nn.Linear) for m in fast.blocks.modules()) and not isinstance(fast.head, nn.Linear)
        # sampling's cache on the CPU is fp32 whatever the weights (attention runs in the cache's dtype); a cache in
        # the weights' dtype is what a GPU gets
        for cache, dtype in [(decode_cache(fast, 2), torch.float32),
                             (fast.make_cache(2), torch.bfloat16 if precision == "bf16" else torch.float32)]:
            assert cache.k[0].dtype == dtype
            steps = [fast.prefill(labels, cache)] + [fast.step(codes[:, t:t + 1], cache) for t in range(15)]
            torch.testing.assert_close(torch.cat(steps, 1), approx, rtol=0, atol=0.05 * exact.abs().max().item())
    assert fast.rope_cos.dtype == torch.float32


def test_fp32_is_the_model_and_bad_requests_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    model = causal_model()
    assert for_decoding(model, "fp32") is model
    with pytest.raises(CtfgenError, match="--decode-precision must be one of"):
        for_decoding(model, "fp8")
    with pytest.raises(CtfgenError, match="fp32-packed runs on the CPU with oneDNN"):
        for_decoding(causal_model().to("meta"), "fp32-packed")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a torch build without oneDNN
    with pytest.raises(CtfgenError, match="does not have"):
        for_decoding(model, "fp32-packed")


@pytest.mark.parametrize("precision", ["fp32-packed", "bf16", "int8"])
def test_a_refiner_runs_at_the_precision_with_its_head_a_plain_layer(precision: str) -> None:
    torch.manual_seed(0)
    refiner = build_model(preset_config("tiny", role="refiner", vocab_size=8, head_size=64, num_classes=3, grid_h=4,
                                        grid_w=4)).eval()
    nn.init.normal_(refiner.head.weight, std=0.1)
    before = {k: v.clone() for k, v in refiner.state_dict().items()}
    fast = for_decoding(refiner, precision)
    assert fast is not refiner and all(torch.equal(before[k], v) for k, v in refiner.state_dict().items())
    # stage 2 gathers its cluster members' rows from the head: a plain layer; int8's GEMV kernel would be slow at
    # a refiner's rows, so int8 runs the refiner in bf16
    dtype = torch.float32 if precision == "fp32-packed" else torch.bfloat16
    assert type(fast.head) is nn.Linear and fast.head.weight.dtype == dtype
    blocks = [m for m in fast.blocks.modules() if hasattr(m, "weight") and m.weight.dim() == 2]
    # packed at every size: a refiner's pass has a row per position, where packing gains even for tiny layers
    packed = precision == "fp32-packed" or packed_kernels_available(torch.bfloat16)
    assert len(blocks) == 2 * 5 and all(isinstance(m, PackedLinear if packed else nn.Linear) for m in blocks)
    assert all(m.weight.dtype == dtype for m in blocks)
    coarse, labels = torch.randint(0, 8, (2, 16)), torch.tensor([0, 2])
    members = torch.randint(0, 64, (8, 5))  # a table of 5 codewords for each of the 8 clusters
    with torch.no_grad():
        exact, approx = refiner(coarse, labels), fast(coarse, labels)
        assert approx.dtype == torch.float32
        tolerance = 1e-5 if precision == "fp32-packed" else 0.05 * exact.abs().max().item()  # packed: another order
        torch.testing.assert_close(approx, exact, rtol=0, atol=tolerance)
        within = fast.member_logits(fast.refiner_states(coarse, labels), coarse, members)
        torch.testing.assert_close(within, exact.gather(2, members[coarse]), rtol=0, atol=tolerance)


def test_fp32_packed_packs_only_layers_large_enough_to_gain() -> None:
    torch.manual_seed(0)
    wide = build_model(preset_config("tiny", role="baseline", vocab_size=PACK_MIN_WEIGHTS // 64, num_classes=3, grid_h=4,
                                     grid_w=4)).eval()  # a head of exactly PACK_MIN_WEIGHTS (tiny: width 64)
    fast = for_decoding(wide, "fp32-packed")
    assert isinstance(fast.head, PackedLinear) and all(isinstance(m, nn.Linear) for m in fast.blocks.modules()
                                                       if hasattr(m, "weight") and m.weight.dim() == 2)
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(fast(codes, labels), wide(codes, labels), rtol=1e-5, atol=1e-5)


def test_bf16_packs_its_weights_where_onednn_has_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    model = causal_model()
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([0, 2])
    this_cpu_has_them = packed_kernels_available(torch.bfloat16)

    def bf16_logits(packed: bool) -> torch.Tensor:
        monkeypatch.setattr(precision_module, "packed_kernels_available", lambda dtype=torch.float32: packed)
        fast = for_decoding(model, "bf16")
        layers = [m for m in [*fast.blocks.modules(), fast.head] if hasattr(m, "weight") and m.weight.dim() == 2]
        assert len(layers) == 2 * 5 + 1  # the blocks' five matrices each, the head
        assert all(isinstance(m, PackedLinear if packed else nn.Linear) for m in layers)
        assert all(m.weight.dtype == torch.bfloat16 for m in layers)
        with torch.no_grad():
            return fast(codes, labels)

    plain = bf16_logits(False)
    if this_cpu_has_them:  # (elsewhere oneDNN may refuse bf16 outright)
        torch.testing.assert_close(bf16_logits(True), plain, rtol=0.02, atol=0.02)  # the same bf16 numbers, another order


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor generates C++ on the CPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_the_compiled_step_on_the_cpu_runs_on_kernels_inductor_chose(precision: str, capfd) -> None:
    """The compiled step's products are no longer ATen's plain ones (inductor froze the weights and timed its own
    kernels against ATen's: torch.compile's options={"freezing": True} had left them as aten::mm); layers bf16 packed
    for oneDNN are frozen as they are. So with one position for the batch and with per-row positions (speculative
    verification, three tokens a row: over a symbolic row count inductor's template failed to compile and fp32 fell
    back to oneDNN's linear). Attention is inductor's own fused loops, not torch's flash kernel. The logits are the
    eager step's, and the timing tables stay unprinted."""
    import torch._dynamo
    from torch.profiler import profile

    if precision == "bf16" and not packed_kernels_available(torch.bfloat16):
        pytest.skip("no oneDNN bf16 kernels on this CPU")
    eager, compiled = for_decoding(causal_model(), precision), for_decoding(causal_model(), precision)
    torch._dynamo.reset()
    compiled.compile_step()
    codes, labels = torch.randint(0, 64, (2, 6)), torch.tensor([0, 2])
    logits = {}
    with torch.no_grad():
        for name, m in (("eager", eager), ("compiled", compiled)):
            cache = m.make_cache(2)
            m.prefill(labels, cache)
            first = [m.step(codes[:, t:t + 1], cache) for t in range(2)]  # compiles: static, then dynamic
            cache.pos = torch.tensor([3, 3])
            first.append(m.step(codes[:, 2:5], cache))  # compiles the per-row graph
            with profile() as prof:
                cache.pos = 3
                one = m.step(codes[:, 2:3], cache)
                cache.pos = torch.tensor([4, 3])
                logits[name] = torch.cat([*first, one, m.step(codes[:, 3:6], cache)], 1)
            ops = {event.key for event in prof.key_averages()}  # the compiled model's, after the loop
    assert not ops & {"aten::mm", "aten::addmm", "aten::linear", "aten::_weight_int8pack_mm"}, ops
    assert ("mkldnn::_linear_pointwise" in ops) == (precision == "bf16"), ops
    assert not any("scaled_dot_product" in op for op in ops), ops
    tolerance = 1e-5 if precision == "fp32" else 0.02  # bf16 products summed in another order
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=tolerance, atol=tolerance)
    assert "AUTOTUNE" not in capfd.readouterr().err


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor generates C++ on the CPU")
def test_two_compiled_models_of_one_shape_each_step_with_their_own_weights() -> None:
    """The weights are frozen into each compiled graph, and the step's code is one for every model: a second model
    of the same shape (two seeds in one bench, stage 1 and a draft) gets its own graph, not the first one's
    weights (dropping dynamo's guards on the modules, 2-7 % of a step, lost exactly this)."""
    import torch._dynamo

    torch._dynamo.reset()
    models = [causal_model(), causal_model()]
    with torch.no_grad():
        models[1].head.weight.mul_(-1)
    eager = copy.deepcopy(models)
    for m in models:
        m.compile_step()
    codes = torch.randint(0, 64, (2, 1))
    with torch.no_grad():
        for m, e in zip(models, eager):
            caches = [m.make_cache(2), e.make_cache(2)]
            m.prefill(torch.tensor([0, 2]), caches[0])
            e.prefill(torch.tensor([0, 2]), caches[1])
            torch.testing.assert_close(m.step(codes, caches[0]), e.step(codes, caches[1]), rtol=1e-5, atol=1e-5)


def test_weight_bytes_shrink_with_precision() -> None:
    model = causal_model()
    full = weight_bytes_per_token(model)
    matrices = sum(m.weight.numel() for m in [*model.blocks.modules(), model.head] if isinstance(m, nn.Linear))
    assert full >= 4 * matrices
    assert weight_bytes_per_token(for_decoding(model, "fp32-packed")) == full
    assert weight_bytes_per_token(for_decoding(model, "bf16")) == full // 2
    assert full / 4 < weight_bytes_per_token(for_decoding(model, "int8")) < full / 3.5  # int8 plus a scale per row


def test_compile_on_the_cpu_packs_the_refiner(run_dir: Path) -> None:
    """On the CPU the compiled step freezes stage 1's fp32 weights and picks their kernels (inductor); the
    refiner's one pass, never compiled, is packed instead (as fp32-packed packs it). Compiling is lazy: nothing
    is compiled here."""
    def refiner_packed(**compile_options: object) -> bool:
        pipe = load_pipeline(run_dir, "ctf")
        pipe.prepare_decode(compile=True, **compile_options)
        return any(isinstance(m, PackedLinear) for m in pipe.refiner.modules())

    assert refiner_packed() == packed_kernels_available()
    assert not refiner_packed(backend="eager")  # which packs nothing


def test_pipelines_and_the_cli_sample_at_each_precision(run_dir: Path, tmp_path: Path) -> None:
    for kind in ("ctf", "baseline"):
        exact = load_pipeline(run_dir, kind)([0, 1, 2, 3], generator=gen(1), progress=False).tokens
        for precision in DECODE_PRECISIONS[1:]:
            pipe = load_pipeline(run_dir, kind)
            pipe.prepare_decode(precision)
            if kind == "ctf":  # the refiner's pass runs at the precision too (int8: in bf16)
                assert (pipe.refiner.head.weight.dtype == torch.float32) == (precision == "fp32-packed")
            tokens = pipe([0, 1, 2, 3], generator=gen(1), progress=False).tokens
            assert tokens.shape == exact.shape and (tokens == exact).float().mean() > 0.5  # close, not equal
    parser = argparse.ArgumentParser()
    add_sample_args(parser)
    cmd_sample(parser.parse_args(["--run", str(run_dir), "--out", str(tmp_path / "g.png"), "--tokens",
                                  str(tmp_path / "t.npz"), "--decode-precision", "int8", "--device", "cpu", "--quiet"]))
    assert np.load(tmp_path / "t.npz")["tokens"].shape == (8, 4, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--run", str(run_dir), "--decode-precision", "int4"])
