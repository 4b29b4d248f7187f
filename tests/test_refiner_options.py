"""The refiner's options beyond the paper (issue 12): few-step refinement (`reveal`, `refine(steps=S)`),
stage-1 features (`feature_dim`, `Transformer.hidden_states`) and training on corrupted coarse labels.

Tiny models on synthetic codes (4x4 grid, V=32, K=8 with cluster k = {k, k+8, k+16, k+24}), CPU only.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctfgen.errors import CtfgenError
from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.sampling import StageSettings, decided_after, refine
from ctfgen.training import train, TrainConfig
from ctfgen.training.loop import hide_some
from ctfgen.transformer import build_model, load_model, preset_config
from test_sampling import CLASSES, GRID, K, V, gen, random_model

T = GRID * GRID
HIERARCHY = Hierarchy(torch.arange(V) % K, K, tokenizer_fingerprint="tok-a")


def reveal_refiner(seed: int = 0) -> torch.nn.Module:
    """A `reveal` refiner with a random (not zero) fine-code embedding, so the codes it reads matter."""
    torch.manual_seed(seed)
    model = build_model(preset_config("tiny", role="refiner", vocab_size=K, head_size=V, num_classes=CLASSES,
                                      grid_h=GRID, grid_w=GRID, reveal=True))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.fine_embed.weight, std=0.5)
    return model.eval()


def coarse_grids(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randint(0, K, (n, T), generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def test_one_step_is_the_papers_refiner() -> None:
    """A fresh reveal refiner (its fine-code embedding starts at zero) holding a plain refiner's weights
    draws exactly the plain refiner's samples at S = 1, guided or not, masked or not."""
    plain = random_model("refiner", seed=3)
    torch.manual_seed(0)
    revealing = build_model(preset_config("tiny", role="refiner", vocab_size=K, head_size=V, num_classes=CLASSES,
                                          grid_h=GRID, grid_w=GRID, reveal=True, class_dropout_prob=0.1))
    missing, unexpected = revealing.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["fine_embed.weight"] and not unexpected
    coarse, labels = coarse_grids()
    for settings, mask in ((StageSettings(temperature=1.1), HIERARCHY.member_mask), (StageSettings(cfg=2.0), None)):
        a = refine(plain, coarse, labels, settings, gen(7), mask)
        b = refine(revealing.eval(), coarse, labels, settings, gen(7), mask, steps=1)
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_steps_follow_the_schedule_and_never_change_a_decided_code(steps: int) -> None:
    model = reveal_refiner()
    coarse, labels = coarse_grids()
    revealed = torch.full_like(coarse, model.config.hidden_id)
    known = torch.rand(coarse.shape, generator=gen(1)) < 0.3
    revealed[known] = HIERARCHY.random_members(coarse, gen(2))[known]
    states: list[torch.Tensor] = []
    fine = refine(model, coarse, labels, StageSettings(cfg=1.5), gen(3), HIERARCHY.member_mask, steps=steps,
                  revealed=revealed, states_out=states)
    assert len(states) == steps and torch.equal(states[-1], fine)
    assert torch.equal(fine[known], revealed[known])  # given codes stay
    assert (fine != model.config.hidden_id).all() and torch.equal(HIERARCHY.to_coarse(fine), coarse)  # in the cluster
    hidden_at_start = (~known).sum(1)
    for step, (before, after) in enumerate(zip([revealed] + states, states), 1):
        decided_before = before != model.config.hidden_id
        assert torch.equal(after[decided_before], before[decided_before])  # a decided code never changes
        newly = ((after != model.config.hidden_id).sum(1) - known.sum(1))
        assert torch.equal(newly, decided_after(step, steps, hidden_at_start))


def test_several_steps_need_a_reveal_refiner() -> None:
    coarse, labels = coarse_grids()
    with pytest.raises(CtfgenError, match="--reveal"):
        refine(random_model("refiner"), coarse, labels, StageSettings(), gen(0), steps=2)
    with pytest.raises(CtfgenError, match="--refine-steps must be >= 1"):
        refine(reveal_refiner(), coarse, labels, StageSettings(), gen(0), steps=0)
    with pytest.raises(CtfgenError, match="--reveal"):
        random_model("refiner")(coarse, labels, fine=coarse)


def test_hide_some_is_seeded_and_hides_at_least_one() -> None:
    fine = torch.randint(0, V, (64, T), generator=gen(0))
    torch.manual_seed(5)
    shown, hidden = hide_some(fine, V)
    torch.manual_seed(5)
    again, _ = hide_some(fine, V)
    assert torch.equal(shown, again) and (hidden.sum(1) >= 1).all()
    assert torch.equal(shown[~hidden], fine[~hidden]) and (shown[hidden] == V).all()
    assert (hidden.sum(1) == T).any() and (hidden.sum(1) < T // 2).any()  # all hidden sometimes, few other times


# --- learning: a refiner that reads decided codes resolves what one pass cannot -------------------

def write_shared_choice_codes(folder: Path, n: int, seed: int) -> Path:
    """Codes whose within-cluster choice is one per item: position t holds c(t) + 8 m, m in 0..3 drawn per
    item. One pass cannot know m (its best loss is ln 4); a refiner that reads one decided code can."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    coarse = (3 * labels[:, None] + np.arange(T)[None, :]) % K
    codes = coarse + K * rng.integers(0, V // K, (n, 1))
    folder.mkdir(parents=True)
    np.save(folder / "codes.npy", codes.reshape(n, GRID, GRID).astype(np.int16))
    np.save(folder / "labels.npy", labels.astype(np.int64))
    meta = {"kind": "codes", "count": n, "grid": [GRID, GRID], "codebook_size": V, "tokenizer_fingerprint": "tok-a",
            "dataset": "synthetic", "split": "train", "views": ["original"], "num_classes": CLASSES, "classes": None}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.slow
def test_a_reveal_refiner_learns_what_one_pass_cannot(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    codes = write_shared_choice_codes(tmp_path / "codes", 512, 0)
    save_hierarchy(HIERARCHY, tmp_path / "hierarchy")
    cfg = TrainConfig(role="refiner", size="tiny", codes=str(codes), hierarchy=str(tmp_path / "hierarchy"),
                      out=str(tmp_path / "refiner"), steps=150, batch_size=32, lr=3e-3, dropout=0.0, class_dropout=0.1,
                      reveal=True, refiner_mask=True, device="cpu", save_every=1000, log_every=50)
    train(cfg, progress=False)
    model = load_model(tmp_path / "refiner")
    test = torch.from_numpy(np.load(write_shared_choice_codes(tmp_path / "test", 64, 1) / "codes.npy")).long().view(64, T)
    labels = torch.from_numpy(np.load(tmp_path / "test" / "labels.npy"))
    coarse = HIERARCHY.to_coarse(test)

    def within_loss(shown: torch.Tensor) -> float:
        with torch.no_grad():
            logits = model(coarse, labels, HIERARCHY.member_mask, shown)
        hidden = shown == model.config.hidden_id
        return torch.nn.functional.cross_entropy(logits[hidden], test[hidden]).item()

    from ctfgen.data.codes import CodeDataset
    from ctfgen.experiments.likelihood import within_in_passes
    held_out = CodeDataset(tmp_path / "test")
    assert within_in_passes(model, held_out, HIERARCHY, 4) < 0.5 * within_in_passes(model, held_out, HIERARCHY, 1)

    one_shown = torch.full_like(test, model.config.hidden_id)
    one_shown[:, 0] = test[:, 0]
    assert within_loss(torch.full_like(test, model.config.hidden_id)) > 0.8 * math.log(4)  # nothing to go on
    assert within_loss(one_shown) < 0.3 * math.log(4)  # one decided code gives the item's choice away

    def consistent(steps: int) -> float:
        fine = refine(model, coarse, labels, StageSettings(), gen(0), HIERARCHY.member_mask, steps=steps)
        choice = fine // K
        return (choice == choice[:, :1]).all(1).float().mean().item()

    one_pass, four_passes = consistent(1), consistent(4)
    print(f"items whose 16 codes share one choice: S=1 {one_pass:.2f}, S=4 {four_passes:.2f}")
    assert four_passes > 0.8 and four_passes > one_pass + 0.5


def test_train_and_sample_commands(tmp_path: Path) -> None:
    from ctfgen.cli import main
    from ctfgen.transformer import save_model
    from test_sampling import tiny_tokenizer
    from ctfgen.tokenizer.model import save_tokenizer

    codes = write_shared_choice_codes(tmp_path / "codes", 32, 0)
    save_hierarchy(HIERARCHY, tmp_path / "hierarchy")
    main(["train", "--role", "refiner", "--reveal", "--size", "tiny", "--codes", str(codes), "--hierarchy",
          str(tmp_path / "hierarchy"), "--steps", "2", "--batch-size", "8", "--device", "cpu", "--quiet",
          "--out", str(tmp_path / "trained")])
    assert load_model(tmp_path / "trained").config.reveal

    run = tmp_path / "run"
    tok = tiny_tokenizer()
    save_tokenizer(tok, run / "tokenizer")
    save_hierarchy(Hierarchy(HIERARCHY.coarse_of, K, tokenizer_fingerprint=tok.fingerprint), run / "hierarchy")
    save_model(random_model("coarse"), run / "coarse")
    save_model(reveal_refiner(), run / "refiner")
    main(["sample", "--run", str(run), "--refine-steps", "4", "--cfg2", "1.5", "--classes", "1", "2", "--per-class",
          "3", "--out", str(tmp_path / "grid.png"), "--tokens", str(tmp_path / "t.npz"), "--device", "cpu", "--quiet"])
    with np.load(tmp_path / "t.npz") as f:
        tokens, coarse = f["tokens"], f["coarse"]
    assert tokens.shape == (6, GRID, GRID) and (HIERARCHY.coarse_of[torch.from_numpy(tokens)].numpy() == coarse).all()


# --- stage-1 features and corrupted coarse labels ---------------------------------------------------

@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_hidden_states_while_sampling_equal_the_teacher_forced_ones(cfg: float) -> None:
    """What the refiner reads at sampling (collected as stage 1 samples) is what it was trained on
    (teacher-forced over the same grid): one definition, two ways to compute it."""
    coarse_model = random_model("coarse", seed=4)
    _, labels = coarse_grids()
    hidden: list[torch.Tensor] = []
    from ctfgen.sampling import sample_causal
    codes = sample_causal(coarse_model, labels, StageSettings(cfg=cfg), gen(0), hidden_out=hidden)
    collected = torch.stack(hidden, dim=1)
    assert collected.shape == (len(labels), T, coarse_model.config.dim)
    torch.testing.assert_close(collected, coarse_model.hidden_states(codes, labels), atol=1e-5, rtol=1e-4)
    # and their head gives the coarse model's logits
    torch.testing.assert_close(coarse_model.head_logits(collected), coarse_model(codes, labels), atol=1e-5, rtol=1e-4)


def test_a_fresh_feature_refiner_samples_as_a_plain_one_and_needs_its_features() -> None:
    coarse_model, plain = random_model("coarse", seed=4), random_model("refiner", seed=3)
    torch.manual_seed(0)
    reading = build_model(preset_config("tiny", role="refiner", vocab_size=K, head_size=V, num_classes=CLASSES,
                                        grid_h=GRID, grid_w=GRID, feature_dim=coarse_model.config.dim))
    reading.load_state_dict(plain.state_dict(), strict=False)
    reading.eval()
    from ctfgen.sampling import sample_ctf
    _, labels = coarse_grids()
    a = sample_ctf(coarse_model, plain, labels, StageSettings(cfg=1.5), StageSettings(), gen(9), HIERARCHY.member_mask)
    b = sample_ctf(coarse_model, reading, labels, StageSettings(cfg=1.5), StageSettings(), gen(9), HIERARCHY.member_mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    coarse, _ = coarse_grids()
    with pytest.raises(CtfgenError, match="reads stage-1 features"):
        reading(coarse, labels)
    with pytest.raises(CtfgenError, match="--stage1-features"):
        plain(coarse, labels, features=torch.zeros(len(labels), T, 64))


def test_corruption_redraws_the_share_asked_from_the_coarse_model() -> None:
    from ctfgen.training.loop import stage1_view
    coarse_model = random_model("coarse", seed=4)
    coarse, labels = coarse_grids(n=400)
    torch.manual_seed(0)
    same, features = stage1_view(coarse_model, coarse, labels, 0.0, True)
    assert torch.equal(same, coarse) and features.shape == (400, T, coarse_model.config.dim)
    torch.manual_seed(0)
    corrupted, none = stage1_view(coarse_model, coarse, labels, 0.5, False)
    assert none is None
    probs = coarse_model(coarse, labels).softmax(-1)
    p_same = probs.gather(-1, coarse[..., None]).mean().item()  # a redraw may land on the true label
    changed = (corrupted != coarse).float().mean().item()
    assert changed == pytest.approx(0.5 * (1 - p_same), abs=0.02)


def _train_refiner(tmp_path: Path, name: str, seed: int, **options) -> Path:
    codes = tmp_path / "codes"
    if not codes.exists():
        write_shared_choice_codes(codes, 64, 0)
        save_hierarchy(HIERARCHY, tmp_path / "hierarchy")
        train(TrainConfig(role="coarse", size="tiny", codes=str(codes), hierarchy=str(tmp_path / "hierarchy"),
                          out=str(tmp_path / "coarse"), steps=3, batch_size=8, device="cpu"), progress=False)
    out = tmp_path / name
    train(TrainConfig(role="refiner", size="tiny", codes=str(codes), hierarchy=str(tmp_path / "hierarchy"), out=str(out),
                      steps=3, batch_size=8, device="cpu", seed=seed, coarse_model=str(tmp_path / "coarse"),
                      val_codes=str(codes), val_limit=16, **options), progress=False)
    return out


def test_corrupted_label_training_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    from ctfgen.artifacts import load_tensors
    runs = [_train_refiner(tmp_path, name, seed, corrupt=0.3, refiner_mask=False) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (load_tensors(run / "model.safetensors") for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    info = json.loads((runs[0] / "train_info.json").read_text())
    assert info["corrupt"] == 0.3 and info["stage1"] == str(tmp_path / "coarse") and info["stage1_fingerprint"]


def test_a_feature_refiner_trains_scores_and_samples_with_its_coarse_model(tmp_path: Path) -> None:
    from ctfgen.pipeline import CTFPipeline
    from ctfgen.artifacts import ArtifactError
    from ctfgen.tokenizer.model import save_tokenizer
    from test_sampling import tiny_tokenizer

    refiner = _train_refiner(tmp_path, "refiner", 0, stage1_features=True, corrupt=0.2, reveal=True, refiner_mask=False)
    info = json.loads((refiner / "train_info.json").read_text())
    assert info["held_out"]["loss"] > 0 and load_model(refiner).config.feature_dim == 64
    run = tmp_path / "run"
    tok = tiny_tokenizer()
    save_tokenizer(tok, run / "tokenizer")
    save_hierarchy(Hierarchy(HIERARCHY.coarse_of, K, tokenizer_fingerprint=tok.fingerprint), run / "hierarchy")
    shutil.copytree(tmp_path / "coarse", run / "coarse")
    shutil.copytree(refiner, run / "refiner")
    out = CTFPipeline.from_pretrained(run)([0, 1, 2], refine_steps=3, generator=gen(0), progress=False)
    assert torch.equal(HIERARCHY.to_coarse(out.tokens), out.coarse)
    from ctfgen.transformer import save_model
    save_model(random_model("coarse", seed=8), run / "coarse")  # another coarse model: its features mean nothing
    with pytest.raises(ArtifactError, match="reads the hidden states of the coarse model"):
        CTFPipeline.from_pretrained(run)


def test_scoring_in_passes(tmp_path: Path) -> None:
    """One pass is the refiner's masked held-out loss; with passes, a refiner that reads decided codes scores
    the shared-choice codes far better (the first group gives the item's choice away)."""
    from ctfgen.data.codes import CodeDataset
    from ctfgen.experiments.likelihood import within_in_passes
    from ctfgen.training.loop import evaluate

    codes = CodeDataset(write_shared_choice_codes(tmp_path / "codes", 48, 3))
    model = reveal_refiner()
    one = within_in_passes(model, codes, HIERARCHY, 1, batch_size=16)
    assert one == pytest.approx(evaluate(model, codes, "refiner", HIERARCHY, 48, 16)["loss_masked"], rel=1e-5)
    assert within_in_passes(model, codes, HIERARCHY, 4, seed=1) == within_in_passes(model, codes, HIERARCHY, 4, seed=1)
    with pytest.raises(ValueError, match="reveal"):
        within_in_passes(random_model("refiner"), codes, HIERARCHY, 2)
