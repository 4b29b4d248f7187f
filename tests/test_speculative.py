"""Speculative sampling (ctfgen.sampling.sample_speculative) draws from the large model's guided, filtered
distribution exactly: checked against the distribution enumerated over every sequence of a 3-token grid,
by a chi-square test with fixed seeds that the draft's own samples fail."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from ctfgen.cli import main
from ctfgen.count_draft import CONTEXTS, ContextCounts, CountDraft, CountDraftConfig, count_draft_from_codes, load_draft
from ctfgen.errors import CtfgenError
from ctfgen.hierarchy import load_hierarchy
from ctfgen.pipeline import add_sample_args, cmd_sample, load_pipeline
from ctfgen.sampling import StageSettings, sample_causal, token_probs, apply_guidance, with_null_labels
from ctfgen.transformer import Transformer, build_model, preset_config, save_model
from ctfgen.transformer import precision as precision_module
from ctfgen.transformer.precision import DECODE_PRECISIONS, for_decoding
from test_sampling import CLASSES as RUN_CLASSES, K as RUN_K, V as RUN_V, gen, random_model
from test_training import write_codes, write_hierarchy

K, CLASSES = 4, 2


def model(seed: int, size: str = "tiny", grid: tuple[int, int] = (1, 3)) -> Transformer:
    torch.manual_seed(seed)
    m = build_model(preset_config(size, role="coarse", vocab_size=K, num_classes=CLASSES, grid_h=grid[0],
                                  grid_w=grid[1]))
    torch.nn.init.normal_(m.head.weight, std=1.0)  # peaked, unlike the zero-initialised head
    return m.eval()


def exact_distribution(m: Transformer, label: int, settings: StageSettings) -> np.ndarray:
    """Probability of each of the K^3 sequences, in itertools.product order: the product of the guided,
    filtered conditionals the sampler draws from."""
    seqs = torch.tensor(list(itertools.product(range(K), repeat=3)))
    labels = torch.full((len(seqs),), label)
    with torch.no_grad():
        logits = apply_guidance(m(seqs.repeat(2, 1), with_null_labels(m, labels)), settings.cfg)
    probs = token_probs(logits, settings).view(len(seqs), 3, K)
    return probs.gather(2, seqs[..., None])[..., 0].prod(1).double().numpy()


def counts(samples: torch.Tensor) -> np.ndarray:
    index = (samples * torch.tensor([K * K, K, 1])).sum(1)
    return np.bincount(index.numpy(), minlength=K ** 3)


@pytest.mark.parametrize("settings", [StageSettings(cfg=2.0), StageSettings(cfg=1.5, temperature=0.8, top_k=3)])
def test_speculative_samples_follow_the_model_not_the_draft(settings: StageSettings) -> None:
    target, draft = model(0), model(1)
    expected = exact_distribution(target, 1, settings)
    labels = torch.ones(500, dtype=torch.long)
    g, stats = gen(7), {}
    fast = torch.cat([sample_causal(target, labels, settings, g, draft=draft, lookahead=2, stats_out=stats)
                      for _ in range(80)])  # 40,000 sequences
    drafted = torch.cat([sample_causal(draft, labels, settings, g) for _ in range(8)])
    possible = expected > 0  # top-k leaves some sequences impossible: they must never appear

    def fits(samples: torch.Tensor) -> bool:
        found = counts(samples)
        if found[~possible].sum():
            return False
        return chisquare(found[possible], expected[possible] / expected[possible].sum() * len(samples)).pvalue > 1e-3

    assert fits(fast)
    assert not fits(drafted)  # the test can tell the draft's distribution from the model's
    assert 0 < stats["accepted"] < stats["proposed"] and stats["tokens"] == 80 * 3


def test_a_perfect_draft_is_always_accepted_and_hidden_states_match() -> None:
    target = model(0, grid=(4, 4))
    labels = torch.tensor([0, 1, 1])
    stats, hidden = {}, []
    codes = sample_causal(target, labels, StageSettings(cfg=2.0), gen(0), draft=target, lookahead=4, stats_out=stats,
                          hidden_out=hidden)
    assert stats["accepted"] == stats["proposed"] and stats["rounds"] == 3  # 1 + 3 x (4 proposed + 1): 16 tokens
    torch.testing.assert_close(torch.stack(hidden, 1), target.hidden_states(codes, labels), rtol=0, atol=1e-5)
    assert torch.equal(codes, sample_causal(target, labels, StageSettings(cfg=2.0), gen(0), draft=target, lookahead=4))


@pytest.mark.parametrize("precision", DECODE_PRECISIONS[1:])
def test_speculative_sampling_at_each_decode_precision(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-row cache writes of speculative rounds take the bf16 model's keys into its fp32 CPU cache."""
    monkeypatch.setattr(precision_module, "PACK_MIN_WEIGHTS", 0)  # pack even the tiny model's layers
    target, stats = for_decoding(model(0, grid=(4, 4)), precision), {}
    codes = sample_causal(target, torch.tensor([0, 1, 1]), StageSettings(cfg=2.0), gen(0), draft=target, lookahead=4,
                          stats_out=stats)
    assert codes.shape == (3, 16) and 0 <= int(codes.min()) and int(codes.max()) < K
    assert stats["accepted"] >= 0.9 * stats["proposed"]  # its own draft: refused only where a pass and a step round apart


def test_rows_of_a_batch_move_on_by_their_own_counts() -> None:
    """Each row keeps as many proposals as it accepts (the KV caches hold a position per row): a batch of 64
    takes about as many passes as its slowest row, not one token a pass as a batch-wide cut would give
    (with acceptance near 1/3, some row refuses its first proposal in almost every round)."""
    target, draft = model(0, grid=(4, 4)), model(0, grid=(4, 4))
    with torch.no_grad():
        draft.head.weight.add_(0.3 * torch.randn(draft.head.weight.shape, generator=gen(3)))
    stats = {}
    sample_causal(target, torch.arange(64) % CLASSES, StageSettings(cfg=2.0), gen(0), draft=draft, lookahead=4,
                  stats_out=stats)
    assert 0.2 < stats["accepted"] / stats["proposed"] < 0.5
    assert stats["rounds"] <= 10  # a batch-wide cut: 15 rounds for the 15 tokens after the first


def test_a_compiled_step_samples_speculatively_as_the_eager_one() -> None:
    """Compiled (by the eager backend: it traces as torch.compile does without generating code), the verification
    passes run the step's graph of per-row positions and fixed shapes: the same samples."""
    import torch._dynamo

    labels, draft = torch.tensor([0, 1, 1]), model(1, grid=(4, 4))
    plain = sample_causal(model(0, grid=(4, 4)), labels, StageSettings(cfg=2.0), gen(0), draft=draft, lookahead=3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model(0, grid=(4, 4))
    compiled.compile_step(backend="eager")
    assert torch.equal(sample_causal(compiled, labels, StageSettings(cfg=2.0), gen(0), draft=draft, lookahead=3), plain)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for every round of the sample


def test_bad_drafts_are_refused() -> None:
    target = model(0)
    with pytest.raises(CtfgenError, match="vocab_size"):
        wrong = build_model(preset_config("tiny", role="coarse", vocab_size=K + 1, num_classes=CLASSES, grid_h=1, grid_w=3))
        sample_causal(target, torch.tensor([0]), StageSettings(), draft=wrong)
    with pytest.raises(CtfgenError, match="lookahead"):
        sample_causal(target, torch.tensor([0]), StageSettings(), draft=model(1), lookahead=0)
    undroppable = build_model(preset_config("tiny", role="coarse", vocab_size=K, num_classes=CLASSES, grid_h=1, grid_w=3,
                                            class_dropout_prob=0.0))
    with pytest.raises(CtfgenError, match="class-label dropout"):
        sample_causal(target, torch.tensor([0]), StageSettings(cfg=2.0), draft=undroppable)


def test_pipelines_and_the_cli_sample_with_a_draft(run_dir: Path, tmp_path: Path) -> None:
    for kind, role in (("ctf", "coarse"), ("baseline", "baseline")):
        draft = random_model(role, seed=9)
        pipe = load_pipeline(run_dir, kind)
        pipe.prepare_decode(draft=draft, lookahead=3)
        out = pipe([0, 1, 2], generator=gen(1), progress=False)
        assert out.tokens.shape == (3, 4, 4)
        save_model(draft, tmp_path / f"draft-{kind}")
    parser = argparse.ArgumentParser()
    add_sample_args(parser)
    cmd_sample(parser.parse_args(["--run", str(run_dir), "--out", str(tmp_path / "g.png"), "--tokens", str(tmp_path / "t.npz"),
                                  "--draft", str(tmp_path / "draft-ctf"), "--lookahead", "2", "--device", "cpu", "--quiet"]))
    assert np.load(tmp_path / "t.npz")["coarse"].shape == (8, 4, 4)
    with pytest.raises(CtfgenError, match="role"):  # a baseline cannot draft for the coarse model
        cmd_sample(parser.parse_args(["--run", str(run_dir), "--out", str(tmp_path / "h.png"), "--draft",
                                      str(tmp_path / "draft-baseline"), "--device", "cpu", "--quiet"]))


# --- counts as the draft (ctfgen.count_draft) ------------------------------------------------------

def witten_bell(grids: list[list[int]], labels: list[int], grid: list[int], label: int, pos: int, V: int, W: int) -> np.ndarray:
    """The count draft's q at `pos` of `grid`, computed the slow way from Python dicts of the training grids."""
    def context(g: list[int], y: int, t: int, names: tuple[str, ...]) -> tuple:
        values = {"class": y, "pos": t, "left": g[t - 1] if t >= 1 else None, "up": g[t - W] if t >= W else None}
        return tuple(values[n] for n in names)

    q = np.full(V, 1.0 / V)
    for names in CONTEXTS:
        seen = np.zeros(V)
        for g, y in zip(grids, labels):
            for t in range(len(g)):
                if context(g, y, t, names) == context(grid, label, pos, names):
                    seen[g[t]] += 1
        if seen.sum():
            distinct = (seen > 0).sum()
            q = (seen + distinct * q) / (seen.sum() + distinct)
    return q


def test_counts_give_the_witten_bell_estimate_of_each_context_order() -> None:
    rng = np.random.default_rng(0)
    V, h, w, n = 5, 2, 3, 40
    labels = rng.integers(0, 2, n)
    grids = np.where(rng.random((n, h * w)) < 0.6, (labels[:, None] + np.arange(h * w)) % V, rng.integers(0, V, (n, h * w)))
    config = CountDraftConfig("coarse", V, h, w, 2)
    draft = CountDraft.count([(torch.tensor(grids), torch.tensor(labels))], config)
    chunked = CountDraft.count([(torch.tensor(grids[i:i + 7]), torch.tensor(labels[i:i + 7])) for i in range(0, n, 7)],
                               config)  # merged chunk by chunk: the same counts
    for whole, merged in zip(draft.orders, chunked.orders):
        for field in ContextCounts.FIELDS:
            np.testing.assert_array_equal(getattr(whole, field), getattr(merged, field))
    # one batch of rows: every position of a training grid (contexts seen) and of a random one (some not seen)
    batch = np.repeat(np.stack([grids[0], rng.integers(0, V, h * w)]), h * w, axis=0)
    pos, batch_labels = np.tile(np.arange(h * w), 2), np.repeat([labels[0], 1], h * w)
    q = draft.probs(batch, pos, batch_labels)
    for row, (grid, p, label) in enumerate(zip(batch, pos, batch_labels)):
        expected = witten_bell(grids.tolist(), labels.tolist(), grid.tolist(), int(label), int(p), V, w)
        np.testing.assert_allclose(q[row], expected, rtol=1e-12)
    np.testing.assert_allclose(q.sum(1), 1, rtol=1e-12)
    assert q.min() > 0
    with pytest.raises(CtfgenError, match="tokens must lie"):
        CountDraft.count([(torch.tensor(grids) + V, torch.tensor(labels))], config)
    with pytest.raises(CtfgenError, match="no codes"):
        CountDraft.count([], config)


@pytest.mark.parametrize("settings", [StageSettings(cfg=2.0), StageSettings(cfg=1.5, temperature=0.8, top_k=3)])
def test_speculative_samples_with_a_count_draft_follow_the_model(settings: StageSettings) -> None:
    """Counts of another model's samples propose; the samples still follow the target's exact distribution."""
    target = model(0)
    other = torch.cat([sample_causal(model(1), torch.full((500,), y), settings, gen(y)) for y in range(CLASSES)])
    draft = CountDraft.count([(other, torch.arange(CLASSES).repeat_interleave(500))],
                             CountDraftConfig("coarse", K, 1, 3, CLASSES))
    expected = exact_distribution(target, 1, settings)
    labels = torch.ones(500, dtype=torch.long)
    g, stats = gen(7), {}
    fast = torch.cat([sample_causal(target, labels, settings, g, draft=draft, lookahead=2, stats_out=stats)
                      for _ in range(40)])  # 20,000 sequences
    found, possible = counts(fast), expected > 0
    assert found[~possible].sum() == 0
    assert chisquare(found[possible], expected[possible] / expected[possible].sum() * len(fast)).pvalue > 1e-3
    assert 0 < stats["accepted"] < stats["proposed"]


def test_count_drafts_through_the_cli_and_the_pipelines(run_dir: Path, tmp_path: Path) -> None:
    """`ctfgen count-draft` over coarse labels (with --hierarchy) and over codewords; `sample --draft` takes
    either; a draft of the other role is refused."""
    data = {"codes": write_codes(tmp_path / "codes", num_classes=RUN_CLASSES, max_label=RUN_CLASSES - 1),
            "hierarchy": write_hierarchy(tmp_path / "hierarchy")}  # the run's classes
    main(["count-draft", "--codes", str(data["codes"]), "--hierarchy", str(data["hierarchy"]), "--out",
          str(tmp_path / "counts-ctf")])
    main(["count-draft", "--codes", str(data["codes"]), "--out", str(tmp_path / "counts-baseline")])
    coarse, fine = load_draft(tmp_path / "counts-ctf"), load_draft(tmp_path / "counts-baseline")
    assert (coarse.config.role, coarse.config.vocab_size) == ("coarse", RUN_K)
    assert (fine.config.role, fine.config.vocab_size) == ("baseline", RUN_V)
    assert coarse.info["items"] == 64
    again = CountDraft.count([(torch.tensor(np.load(data["codes"] / "codes.npy").reshape(64, -1) % RUN_K),
                               torch.tensor(np.load(data["codes"] / "labels.npy")))], coarse.config)
    in_chunks = count_draft_from_codes(data["codes"], load_hierarchy(data["hierarchy"]), chunk=5)
    grid = np.arange(16) % RUN_K  # the test hierarchy maps codeword v to v % K
    for other in (again, in_chunks):  # saved and loaded unchanged; the folder read 5 items at a time
        np.testing.assert_array_equal(*(d.probs(grid[None], np.array([9]), np.array([2])) for d in (coarse, other)))
    for kind in ("ctf", "baseline"):
        pipe = load_pipeline(run_dir, kind)
        pipe.prepare_decode(draft=load_draft(tmp_path / f"counts-{kind}"), lookahead=3)
        assert pipe([0, 1, 2], generator=gen(1), progress=False).tokens.shape == (3, 4, 4)
    main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "g.png"), "--tokens", str(tmp_path / "t.npz"),
          "--draft", str(tmp_path / "counts-ctf"), "--lookahead", "2", "--device", "cpu", "--quiet"])
    assert np.load(tmp_path / "t.npz")["coarse"].shape == (8, 4, 4)
    with pytest.raises(SystemExit) as stopped:  # counts of codewords cannot draft coarse labels
        main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "h.png"), "--draft",
              str(tmp_path / "counts-baseline"), "--device", "cpu", "--quiet"])
    assert stopped.value.code == 2
