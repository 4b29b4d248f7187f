"""Tests for ctfgen.sampling and ctfgen.pipeline on tiny random models (4x4 grid, V=32, K=8, 5 classes), CPU only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.artifacts import ArtifactError
from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.pipeline import BaselinePipeline, CTFPipeline, add_sample_args, cmd_sample, load_pipeline
from ctfgen.sampling import (StageSettings, apply_guidance, draw, filter_top_p, refine, sample_baseline, sample_causal,
                             sample_ctf)
from ctfgen.tokenizer.model import VQConfig, VQTokenizer
from ctfgen.transformer import Transformer, build_model, cluster_members, preset_config

V, K, CLASSES, GRID = 32, 8, 5, 4


def random_model(role: str, seed: int = 0, class_dropout_prob: float = 0.1) -> Transformer:
    torch.manual_seed(seed)
    vocab = V if role == "baseline" else K
    head = K if role == "coarse" else V
    model = build_model(preset_config("tiny", role=role, vocab_size=vocab, head_size=head, num_classes=CLASSES,
                                      grid_h=GRID, grid_w=GRID, class_dropout_prob=class_dropout_prob))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the zero-initialised head would give uniform logits
    return model.eval()


def tiny_tokenizer() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(VQConfig(image_size=16, in_channels=1, base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=1,
                                z_channels=8, codebook_size=V, codebook_dim=4, norm_groups=4, attention=False)).eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LABELS = torch.tensor([0, 1, 4])


# --- the sampler ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_kv_cache_logits_match_full_forward(models: dict[str, Transformer], cfg: float) -> None:
    model = models["baseline"]
    used: list[torch.Tensor] = []
    codes = sample_causal(model, LABELS, StageSettings(cfg=cfg), gen(0), logits_out=used)
    with torch.no_grad():
        full = model(codes, LABELS)
        if cfg != 1.0:
            full = apply_guidance(torch.cat([full, model(codes, torch.full_like(LABELS, model.null_class))]), cfg)
    assert len(used) == codes.shape[1] == GRID * GRID
    torch.testing.assert_close(torch.stack(used, dim=1), full, atol=1e-4, rtol=1e-4)


def test_seed_reproducible_and_different_seeds_differ(models: dict[str, Transformer], hierarchy: Hierarchy) -> None:
    s1, s2 = StageSettings(cfg=2.0), StageSettings()
    run = lambda seed: sample_ctf(models["coarse"], models["refiner"], LABELS, s1, s2, gen(seed), hierarchy.member_mask)
    (c_a, f_a), (c_b, f_b), (_, f_c) = run(7), run(7), run(8)
    assert torch.equal(c_a, c_b) and torch.equal(f_a, f_b)
    assert not torch.equal(f_a, f_c)


def test_cfg_scale_one_equals_conditional(models: dict[str, Transformer]) -> None:
    model = models["baseline"]
    plain = sample_causal(model, LABELS, StageSettings(), gen(3))
    doubled = sample_causal(model, LABELS, StageSettings(cfg=1.0), gen(3), guidance=True)
    assert torch.equal(plain, doubled)
    coarse = sample_causal(models["coarse"], LABELS, StageSettings(), gen(0))
    fine_plain = refine(models["refiner"], coarse, LABELS, StageSettings(), gen(4))
    fine_doubled = refine(models["refiner"], coarse, LABELS, StageSettings(), gen(4), guidance=True)
    assert torch.equal(fine_plain, fine_doubled)


def test_top_k_one_is_greedy(models: dict[str, Transformer]) -> None:
    model = models["baseline"]
    codes = sample_causal(model, LABELS, StageSettings(top_k=1), gen(0))
    with torch.no_grad():
        greedy = torch.zeros(len(LABELS), 0, dtype=torch.long)
        for t in range(GRID * GRID):  # full forward on the prefix + a placeholder (the last code is never read)
            padded = torch.cat([greedy, torch.zeros(len(LABELS), 1, dtype=torch.long)], dim=1)
            greedy = torch.cat([greedy, model(padded, LABELS)[:, t].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(codes, greedy)


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_top_p(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_top_p(logits, 0.01).isfinite().sum() == 1


def test_draw_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    drawn = draw(probs.expand(40000, -1), gen(0))
    freq = torch.bincount(drawn, minlength=5) / len(drawn)
    assert freq[1] == freq[4] == 0
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


def test_masked_refiner_stays_in_cluster(models: dict[str, Transformer], hierarchy: Hierarchy) -> None:
    labels = torch.arange(CLASSES).repeat(4)
    coarse, fine = sample_ctf(models["coarse"], models["refiner"], labels, StageSettings(),
                              StageSettings(cfg=2.0, temperature=2.0), gen(0), hierarchy.member_mask)
    assert torch.equal(hierarchy.to_coarse(fine), coarse)
    # without the mask, the random refiner strays out of the cluster somewhere
    unmasked = refine(models["refiner"], coarse, labels, StageSettings(temperature=2.0), gen(0))
    assert not torch.equal(hierarchy.to_coarse(unmasked), coarse)


@pytest.mark.parametrize("settings", [StageSettings(cfg=2.0, temperature=1.5), StageSettings(top_k=3, top_p=0.8)])
def test_drawing_among_members_is_drawing_from_the_masked_logits(models: dict[str, Transformer], hierarchy: Hierarchy,
                                                                 settings: StageSettings) -> None:
    """The refiner draws among each cluster's members; masking all V logits gives the same tokens for a seed."""
    from ctfgen.sampling import apply_guidance, draw, token_probs, with_null_labels
    from ctfgen.transformer import mask_to_clusters

    refiner, labels = models["refiner"], torch.arange(CLASSES).repeat(8)
    coarse = torch.randint(0, K, (len(labels), GRID * GRID), generator=gen(3))
    with torch.no_grad():
        logits = apply_guidance(refiner(coarse.repeat(2, 1), with_null_labels(refiner, labels)), settings.cfg)
    reference = draw(token_probs(mask_to_clusters(logits, coarse, hierarchy.member_mask), settings), gen(4))
    assert torch.equal(refine(refiner, coarse, labels, settings, gen(4), hierarchy.member_mask, guidance=True),
                       reference.view(coarse.shape))
    members, is_member = cluster_members(hierarchy.member_mask)
    for k in range(K):
        assert members[k][is_member[k]].tolist() == torch.nonzero(hierarchy.member_mask[k]).view(-1).tolist()


def test_a_mask_lists_its_members_once(models: dict[str, Transformer], hierarchy: Hierarchy,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch after batch a pipeline passes its hierarchy's one mask: its members are listed once."""
    from ctfgen import sampling

    listed = []
    monkeypatch.setattr(sampling, "cluster_members", lambda mask: listed.append(mask) or cluster_members(mask))
    sampling.members_of.cache_clear()
    labels, mask = torch.arange(CLASSES), hierarchy.member_mask
    coarse = torch.randint(0, K, (CLASSES, GRID * GRID), generator=gen(5))
    first = [refine(models["refiner"], coarse, labels, StageSettings(), gen(6), mask) for _ in range(3)]
    assert len(listed) == 1 and all(torch.equal(f, first[0]) for f in first)
    refine(models["refiner"], coarse, labels, StageSettings(), gen(6), mask.clone())  # another mask object
    assert len(listed) == 2


@pytest.mark.parametrize("settings, flag", [
    (StageSettings(temperature=0.0), "--t1"),
    (StageSettings(temperature=-1.0), "--t1"),
    (StageSettings(top_k=-1), "--top-k1"),
    (StageSettings(top_k=V + 1), "--top-k1"),
    (StageSettings(top_p=0.0), "--top-p1"),
    (StageSettings(top_p=1.5), "--top-p1"),
])
def test_bad_settings_name_the_flag(models: dict[str, Transformer], settings: StageSettings, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        sample_baseline(models["baseline"], LABELS, settings, gen(0))


def test_bad_stage2_settings_and_classes(models: dict[str, Transformer]) -> None:
    with pytest.raises(ValueError, match="--top-k2"):
        sample_ctf(models["coarse"], models["refiner"], LABELS, StageSettings(), StageSettings(top_k=V + 1), gen(0))
    with pytest.raises(ValueError, match="--classes"):
        sample_baseline(models["baseline"], torch.tensor([0, CLASSES]), StageSettings(), gen(0))
    with pytest.raises(ValueError, match="--classes"):
        sample_baseline(models["baseline"], torch.tensor([-1]), StageSettings(), gen(0))


def test_guidance_needs_label_dropout() -> None:
    model = random_model("baseline", class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="--cfg1"):
        sample_baseline(model, LABELS, StageSettings(cfg=2.0), gen(0))
    sample_baseline(model, LABELS, StageSettings(cfg=1.0), gen(0))  # no guidance: fine


# --- the pipelines --------------------------------------------------------------------------------

def test_pipeline_round_trip(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    pipe = CTFPipeline.from_pretrained(run_dir)
    out = pipe([0, 2, 4], generator=gen(5), progress=False, batch_size=2)
    assert out.tokens.shape == out.coarse.shape == (3, GRID, GRID) and out.tokens.dtype == torch.long
    assert len(out.images) == 3 and isinstance(out.images[0], Image.Image) and out.images[0].size == (16, 16)
    copy = tmp_path_factory.mktemp("copy")
    pipe.save_pretrained(copy)
    again = CTFPipeline.from_pretrained(copy)([0, 2, 4], generator=gen(5), progress=False, batch_size=2)
    assert torch.equal(out.tokens, again.tokens) and torch.equal(out.coarse, again.coarse)
    named = pipe([0, 2, 4], guidance_scale=3.0, generator=gen(5), progress=False, batch_size=2)
    assert torch.equal(named.tokens, pipe([0, 2, 4], cfg1=3.0, generator=gen(5), progress=False, batch_size=2).tokens)

    base = BaselinePipeline.from_pretrained(run_dir)
    b1 = base([1, 3], generator=gen(1), progress=False, t2=0.5)  # stage-2 settings are ignored
    base.save_pretrained(copy)
    b2 = load_pipeline(copy, "baseline")([1, 3], generator=gen(1), progress=False)
    assert b1.coarse is None and torch.equal(b1.tokens, b2.tokens)


def test_pipeline_without_refiner_draws_a_uniform_member_of_each_cluster(run_dir: Path, hierarchy: Hierarchy) -> None:
    full = CTFPipeline.from_pretrained(run_dir)
    pipe = CTFPipeline(full.tokenizer, full.hierarchy, full.coarse, None)
    out = pipe([0, 1, 2, 3], generator=gen(2), progress=False, batch_size=3)
    assert torch.equal(hierarchy.to_coarse(out.tokens), out.coarse)  # every code inside its coarse cluster
    first = pipe([0, 1, 2], generator=gen(2), progress=False)  # one batch: stage 1 draws before stage 2
    assert torch.equal(first.coarse, full([0, 1, 2], generator=gen(2), progress=False).coarse)
    assert torch.equal(out.tokens, pipe([0, 1, 2, 3], generator=gen(2), progress=False, batch_size=3).tokens)
    assert not torch.equal(out.tokens, pipe([0, 1, 2, 3], generator=gen(3), progress=False, batch_size=3).tokens)


def test_compiled_decode_step_samples_the_same(run_dir: Path) -> None:
    """One graph serves every cache position (dynamic), and the samples do not change (the eager backend
    traces as torch.compile does without generating code, which a CPU test cannot wait for)."""
    import torch._dynamo

    for kind in ("ctf", "baseline"):
        plain = load_pipeline(run_dir, kind)([0, 2, 4, 1], generator=gen(5), progress=False, batch_size=2)
        pipe = load_pipeline(run_dir, kind)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        pipe.prepare_decode(compile=True, backend="eager")
        compiled = pipe([0, 2, 4, 1], generator=gen(5), progress=False, batch_size=2)
        assert torch.equal(plain.tokens, compiled.tokens)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # two batches, 15 positions


def test_a_refiner_trained_within_clusters_is_sampled_with_the_mask_only(run_dir: Path) -> None:
    """Its scores outside a position's cluster were never trained: --no-refiner-mask is refused, not sampled."""
    from ctfgen.errors import CtfgenError

    assert not load_pipeline(run_dir, "ctf").refiner_within  # a folder that records no training: either way
    (run_dir / "refiner" / "train_info.json").write_text(json.dumps({"refiner_mask": True}))
    pipe = load_pipeline(run_dir, "ctf")
    assert pipe.refiner_within and pipe([0, 1], generator=gen(0), progress=False).tokens.shape[0] == 2
    with pytest.raises(CtfgenError, match="trained within clusters"):
        pipe([0, 1], generator=gen(0), progress=False, refiner_mask=False)


def test_pipeline_rejects_mismatched_artifacts(run_dir: Path, hierarchy: Hierarchy) -> None:
    save_hierarchy(Hierarchy(hierarchy.coarse_of, K, tokenizer_fingerprint="0123456789abcdef"), run_dir / "hierarchy")
    with pytest.raises(ArtifactError, match="fingerprint"):
        CTFPipeline.from_pretrained(run_dir)
    tok = BaselinePipeline.from_pretrained(run_dir).tokenizer
    coarse, refiner = random_model("coarse"), random_model("refiner")
    wrong_k = build_model(preset_config("tiny", role="coarse", vocab_size=2 * K, num_classes=CLASSES, grid_h=GRID, grid_w=GRID))
    with pytest.raises(ArtifactError, match="K=8"):
        CTFPipeline(tok, hierarchy, wrong_k, refiner)
    with pytest.raises(ArtifactError, match="expected a 'coarse' model"):
        CTFPipeline(tok, hierarchy, refiner, refiner)
    wrong_grid = build_model(preset_config("tiny", role="refiner", vocab_size=K, head_size=V, num_classes=CLASSES, grid_h=2, grid_w=8))
    with pytest.raises(ArtifactError, match="grid"):
        CTFPipeline(tok, hierarchy, coarse, wrong_grid)
    with pytest.raises(ArtifactError, match="codebook"):
        BaselinePipeline(tok, build_model(preset_config("tiny", role="baseline", vocab_size=2 * V, num_classes=CLASSES,
                                                        grid_h=GRID, grid_w=GRID)))


def test_cli_writes_grid_pngs_and_tokens(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("cli")
    parser = argparse.ArgumentParser()
    add_sample_args(parser)
    args = parser.parse_args(["--run", str(run_dir), "--classes", "0", "3", "--per-class", "2", "--out",
                              str(out / "grid.png"), "--out-dir", str(out / "png"), "--tokens", str(out / "t.npz"),
                              "--device", "cpu", "--quiet", "--top-k2", "4"])
    cmd_sample(args)
    assert Image.open(out / "grid.png").size == (2 * 18 + 2, 2 * 18 + 2)
    assert len(list((out / "png").glob("*.png"))) == 4
    saved = np.load(out / "t.npz")
    assert saved["tokens"].shape == saved["coarse"].shape == (4, GRID, GRID)
    assert saved["class_labels"].tolist() == [0, 0, 3, 3]


# --- the training hook ------------------------------------------------------------------------------

def write_codes(folder: Path, fingerprint: str, n: int = 16) -> Path:
    """Random codes in the CodeDataset format (what the hook draws does not depend on them)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    np.save(folder / "codes.npy", rng.integers(0, V, (n, GRID, GRID)).astype(np.int16))
    np.save(folder / "labels.npy", rng.integers(0, CLASSES, n).astype(np.int64))
    meta = {"kind": "codes", "count": n, "grid": [GRID, GRID], "codebook_size": V, "tokenizer_fingerprint": fingerprint,
            "dataset": "synthetic", "split": "train", "views": ["original"], "num_classes": CLASSES, "classes": None}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_training_writes_sample_grids(run_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ctfgen.tokenizer.model import load_tokenizer
    from ctfgen.training import TrainConfig, train

    codes = write_codes(tmp_path / "codes", load_tokenizer(run_dir / "tokenizer").fingerprint)
    common = dict(size="tiny", codes=str(codes), hierarchy=str(run_dir / "hierarchy"), steps=2, batch_size=4,
                  device="cpu", sample_every=1, sample_tokenizer=str(run_dir / "tokenizer"))
    with pytest.raises(ValueError, match="--sample-refiner"):
        train(TrainConfig(role="coarse", out=str(tmp_path / "bad"), **common), progress=False)
    out = tmp_path / "coarse-trained"  # tmp_path/coarse is the run's finished model, which train refuses to overwrite
    train(TrainConfig(role="coarse", out=str(out), sample_refiner=str(run_dir / "refiner"), **common), progress=False)
    events = EventAccumulator(str(out / "logs"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [1, 2]
