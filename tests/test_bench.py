"""`ctfgen bench` on the engine: grids as data, one cell run end to end at a toy budget, resume without
recomputing, compute-matched baselines, and the report's calls on records whose answer is known."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from ctfgen.bench import add_bench_args, bench_cells, cell_condition, cmd_bench, run_bench
from ctfgen.errors import CtfgenError
from ctfgen.experiments import Results, cell_key
from ctfgen.experiments.grids import GRIDS, versus
from ctfgen.experiments.protocol import Cell, Scoring, Workshop, best_point
from ctfgen.experiments.report import (floors_table, group, points_table, setup_table, setup_title, steps_to_fid,
                                       steps_to_fid_lines, verdict, write_report)
from ctfgen.hierarchy import load_hierarchy
from test_demo import fake_fashion_mnist

TOY_SCORING = Scoring(point_per_class=2, final_per_class=3, cfg=(1.0, 2.0), t1=(1.0,), t2=(1.1,), floor_per_class=2,
                      nll_items=40)
TOY = Cell(side="ctf", steps=3, size="tiny", refiner_size="tiny", batch_size=16, warmup_steps=0, k=16, codebook=64,
           tokenizer_steps=2, scoring=TOY_SCORING)


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fm")


def test_grids_are_data() -> None:
    """Every grid, full and quick, gives distinct valid cells; versus pairs every CTF with its baselines."""
    base = Cell(side="ctf", steps=1)
    for name, grid in GRIDS.items():
        for quick in (False, True):
            cells = grid(base, 2, quick, 60000)
            assert len({cell_key(c) for c in cells}) == len(cells), name
            assert {c.seed for c in cells} == {0, 1} and {c.side for c in cells} == {"ctf", "baseline"}
    cells = versus(base, (10, 20), 3, ((1.0, 1.0), (0.5, 1.0)), ((1.0, 1.0),))
    assert len(cells) == 2 * 3 * (2 + 1 + 1)
    assert [c.compute_of for c in cells if c.side == "baseline"][:2] == [None, (1.0, 1.0)]
    full_versus = GRIDS["versus"](base, 2, False, 60000)  # refiners trained within clusters, the paper's beside them
    ctf = [c for c in full_versus if c.side == "ctf"]
    assert sum(not c.refiner_mask for c in ctf) == 2 * 2 and sum(c.refiner_mask for c in ctf) == 2 * 2 * 6
    matched = [c for c in full_versus if c.side == "baseline" and c.compute_of]  # charged for the head they compute
    assert matched and all(c.refiner_mask for c in matched)
    assert not any(c.refiner_mask for c in full_versus if c.side == "baseline" and not c.compute_of)
    full_map = GRIDS["map"](base, 1, False, 60000)
    assert all(c.refiner_mask for c in full_map if c.side == "ctf")
    assert {c.codebook for c in full_map} == {1024, 4096, 16384} and "auto" in {c.k for c in full_map}
    assert {c.steps for c in full_map} == {938, 2813, 9375}  # 1, 3 and 10 epochs of 60,000 at batch 64
    # one baseline per (V, size, steps, seed): K does not change it, but its likelihood split is taken at each K
    assert sum(c.side == "baseline" for c in full_map) == 3 * 3 * 3
    assert {c.scoring.split_ks for c in full_map if c.side == "baseline"} == {(64, 128, 256)}
    with pytest.raises(ValueError, match="split_ks"):
        Scoring(split_ks=(1,))
    with pytest.raises(ValueError):
        Cell(side="ctf", steps=1, k=5000, codebook=4096)
    with pytest.raises(ValueError):
        Cell(side="gan", steps=1)


def test_cells_run_resume_and_report(tmp_path: Path, fm: Path) -> None:
    """A toy versus grid runs every piece of the protocol; a second run recomputes nothing."""
    cells = versus(TOY, (3, 4), 2, ((1.0, 1.0), (0.5, 0.5)), ((1.0, 1.0),))
    out = tmp_path / "bench"
    meta = {"grid": "toy", "data": "fashion-mnist", "seeds": 2}
    summary = run_bench(out, cells, meta, data_dir=str(fm), classifier_epochs=1, classifier_limit=128)
    records = Results(out / "cells.jsonl").load()
    assert [r["key"] for r in records] == [cell_key(c) for c in cells]
    by_label = {(r["result"]["label"], r["cell"]["seed"]): r["result"] for r in records if r["cell"]["steps"] == 3}
    ctf = by_label[("CTF", 0)]
    assert set(ctf["train"]) == {"coarse", "refiner"} and ctf["train"]["refiner"]["steps"] == 3
    assert by_label[("CTF (refiner 0.5x depth, 0.5x steps)", 0)]["train"]["refiner"]["steps"] == 2  # round(3 * 0.5)
    assert len(ctf["points"]) == 2 and ctf["final"]["n"] == 3 * 10
    assert ctf["final"]["settings"] in [p["settings"] for p in ctf["points"]]  # the best point, drawn again
    assert ctf["final"]["fid"] == pytest.approx(ctf["final"]["fid"]) and ctf["final"]["images_per_s"] > 0
    assert abs(ctf["nll"]["coarse"] + ctf["nll"]["within"] - ctf["nll"]["nll"]) < 1e-6
    assert set(ctf["floors"]) == {"reconstruction", "true-coarse+refiner", "true-coarse+uniform"}
    base, matched = by_label[("baseline, equal steps", 0)], by_label[("baseline, compute of CTF", 0)]
    assert "floors" not in base and base["train"]["baseline"]["steps"] == 3
    assert matched["train"]["baseline"]["steps"] > 3 and matched["flops"] >= ctf["flops"] > base["flops"]
    # the same CTF coarse model serves both refiners: trained once
    assert len(list((out / "models").glob("coarse-*"))) == 2 * 2  # one per seed and budget
    for name in ("BENCHMARKS.md", "summary.json", "fid_vs_recall.png", "is_vs_fid.png", "samples.png",
                 "fid_vs_steps.png"):
        assert (out / name).is_file(), name
    report = (out / "BENCHMARKS.md").read_text()
    assert "FID at own best (n=30)" in report and "true-coarse+uniform" in report
    assert "| side | 3 steps | 4 steps |" in report  # FID against the budget, each budget its own run
    assert "CTF reaches the FID the baseline has at 4 steps" in report
    assert "CTF (refiner 0.5x depth, 0.5x steps) reaches" not in report  # steps to FID: full-size refiners only
    assert len(summary["setups"]) == 2 and any("equal steps" in v for v in summary["setups"][0]["verdict"])

    calls = []
    workshop = Workshop(out, str(fm), classifier_limit=128)
    from ctfgen.experiments import run_grid

    run_grid(cells, lambda c: calls.append(c) or {}, Results(out / "cells.jsonl"))
    assert calls == [] and workshop.baseline_steps(cells[0], workshop.artifacts(cells[0])) == 3

    # a grid run in parts (`--only`): the report covers the part run, or with report_also the whole grid done
    part = [c for c in cells if c.steps == 4]
    run_bench(out, part, meta, data_dir=str(fm), resume=True)
    assert f"- cells: {len(part)}," in (out / "BENCHMARKS.md").read_text()
    run_bench(out, part, meta, data_dir=str(fm), resume=True, report_also=cells)
    report = (out / "BENCHMARKS.md").read_text()
    assert f"- cells: {len(cells)}," in report and "| side | 3 steps | 4 steps |" in report

    # report only: nothing runs (not even cells missing from the folder), the folder's state stays as it was
    from ctfgen.outputs import STATUS_NAME
    (out / STATUS_NAME).write_text((out / STATUS_NAME).read_text().replace('"finished": true', '"finished": false'))
    missing = replace(cells[0], seed=7)
    run_bench(out, [*part, missing], meta, data_dir=str(fm), report_only=True)
    assert f"- cells: {len(part)}," in (out / "BENCHMARKS.md").read_text()
    assert '"finished": false' in (out / STATUS_NAME).read_text() and len(Results(out / "cells.jsonl").load()) == len(cells)
    with pytest.raises(CtfgenError, match="holds no results of these cells"):
        run_bench(out, [missing], meta, data_dir=str(fm), report_only=True)
    with pytest.raises(CtfgenError, match="empty: does not exist; nothing to report"):
        run_bench(tmp_path / "empty", [missing], meta, data_dir=str(fm), report_only=True)


def test_refiner_options_are_cells_too(tmp_path: Path, fm: Path) -> None:
    """A CTF whose refiner reads decided codes, stage-1 features and corrupted labels, sampled in 2 passes, and
    one trained within clusters: trained on the same coarse model as the plain CTF, charged for reading it,
    labelled by its options."""
    plain = TOY
    options = replace(TOY, refiner_reveal=True, refine_steps=2, refiner_features=True, refiner_corrupt=0.2)
    two_pass_only = replace(options, refine_steps=1)  # the same refiner, sampled in one pass
    within = replace(TOY, refiner_mask=True)
    out = tmp_path / "bench"
    meta = {"grid": "toy", "data": "fashion-mnist", "seeds": 1}
    run_bench(out, [plain, options, two_pass_only, within], meta, data_dir=str(fm), classifier_epochs=1, classifier_limit=128)
    records = {r["result"]["label"]: r["result"] for r in Results(out / "cells.jsonl").load()}
    label = "CTF (refiner reads decided codes, 2 passes, reads stage-1 features, trained on 20% corrupted labels)"
    assert set(records) == {"CTF", label, label.replace(" 2 passes,", ""), "CTF (refiner trained within clusters)"}
    assert len(list((out / "models").glob("coarse-*"))) == 1 and len(list((out / "models").glob("refiner-*"))) == 3
    trained_within = [json.loads(f.read_text())["refiner_mask"] for f in (out / "models").glob("refiner-*/train_info.json")]
    assert sorted(trained_within) == [False, False, True]
    assert records[label]["train"]["refiner"]["flops"] > records["CTF"]["train"]["refiner"]["flops"]
    nll = records[label]["nll"]  # sampled in 2 passes: also the exact NLL of scoring in 2 (random-order) passes
    assert nll["nll_in_passes"] == pytest.approx(nll["coarse"] + nll["within_in_passes"])
    assert "nll_in_passes" not in records["CTF"]["nll"]
    with pytest.raises(ValueError, match="refiner_reveal"):
        replace(TOY, refine_steps=4)
    with pytest.raises(ValueError, match="true coarse labels"):
        replace(TOY, refiner_mask=True, refiner_corrupt=0.2)


def test_the_baseline_split_at_each_ctf_k_compares_the_parts(tmp_path: Path, fm: Path) -> None:
    """A baseline cell with `split_ks` also splits its NLL at the hierarchy of each of those K (the one the CTF
    cell of that K uses), and the verdict compares CTF's parts with it there; without it, it compares totals only."""
    from ctfgen.data.codes import CodeDataset
    from ctfgen.experiments.likelihood import nll_split
    from ctfgen.transformer import load_model

    ctf = replace(TOY, k=8)
    plain = replace(TOY, side="baseline")  # split at its own K = 16
    split = replace(plain, scoring=replace(TOY_SCORING, split_ks=(8, 16)))
    meta = {"grid": "toy", "data": "fashion-mnist", "seeds": 1}
    out = tmp_path / "bench"
    run_bench(out, [ctf, plain], meta, data_dir=str(fm), classifier_epochs=1, classifier_limit=128)
    assert not [line for line in verdict(group(Results(out / "cells.jsonl").load())[0]) if "coarse part" in line]
    run_bench(out, [ctf, split], meta, data_dir=str(fm), resume=True, classifier_epochs=1, classifier_limit=128)
    records = {r["key"]: r["result"] for r in Results(out / "cells.jsonl").load()}
    c, b, b8 = records[cell_key(ctf)], records[cell_key(plain)], records[cell_key(split)]
    assert b8["nll"]["coarse"] == b["nll"]["coarse"] and set(b8["nll"]["at_k"]) == {"8"}  # its own K: the table's
    model = load_model(next((out / "models").glob("baseline-*")))
    direct = nll_split(CodeDataset(c["artifacts"]["codes_test"]), load_hierarchy(c["artifacts"]["hierarchy"]),
                       baseline=model, limit=TOY_SCORING.nll_items)["baseline"]
    assert b8["nll"]["at_k"]["8"] == pytest.approx(direct)
    assert b8["nll"]["at_k"]["8"]["nll"] == pytest.approx(b["nll"]["nll"])  # the total does not depend on K
    (setup,) = group([{"key": k, "cell": cell, "result": records[k]} for k, cell in
                      ((cell_key(ctf), dataclasses.asdict(ctf)), (cell_key(split), dataclasses.asdict(split)))])
    (line,) = [line for line in verdict(setup) if "coarse part" in line]
    assert f"vs {b8['nll']['at_k']['8']['coarse']:.3f}" in line and "the baseline split at K=8" in line
    assert (f"The baseline's NLL split at each CTF row's K (the table's at K=16), coarse + within: K=8: "
            f"{b8['nll']['at_k']['8']['coarse']:.3f} + {b8['nll']['at_k']['8']['within']:.3f}.") in "\n".join(setup_table(setup))


def test_stage_2_over_all_v_is_a_cell_of_the_same_models(tmp_path: Path, fm: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A CTF whose stage 2 draws over all V codewords (no cluster mask): the masked CTF's models and likelihood
    split, its own samples, drawn with the mask off; only a refiner trained with the full head may be sampled so."""
    from ctfgen.experiments import protocol

    over_all_v = replace(TOY, stage2_mask=False)
    meta = {"grid": "toy", "data": "fashion-mnist", "seeds": 1}
    out = tmp_path / "bench"
    run_bench(out, [TOY], meta, data_dir=str(fm), classifier_epochs=1, classifier_limit=128)
    drawn = []
    sample_with = protocol.sample_with
    monkeypatch.setattr(protocol, "sample_with",
                        lambda pipe, n, seed, **settings: drawn.append(settings) or sample_with(pipe, n, seed, **settings))
    run_bench(out, [TOY, over_all_v], meta, data_dir=str(fm), resume=True, classifier_epochs=1, classifier_limit=128)
    masked, unmasked = (r["result"] for r in Results(out / "cells.jsonl").load())
    assert (masked["label"], unmasked["label"]) == ("CTF", "CTF (refiner sampled over all V)")
    assert drawn and all(settings["refiner_mask"] is False for settings in drawn)  # only the new cell sampled
    assert unmasked["nll"] == masked["nll"] and unmasked["train"] == masked["train"]
    assert len(list((out / "models").glob("refiner-*"))) == 1
    for needs_full_head in (dict(refiner_mask=True), dict(side="baseline")):
        with pytest.raises(ValueError, match="full head"):
            replace(TOY, stage2_mask=False, **needs_full_head)


def test_a_rescored_cell_takes_only_the_measurements_its_new_option_changes(tmp_path: Path, fm: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Guidance past the grid gives the cell a new key; its likelihood split, grid points and floors come from
    the first cell's measurements, and only the new point (and a final set, if the best point moved) is drawn."""
    from ctfgen.experiments import protocol

    at_edge = replace(TOY, scoring=replace(TOY_SCORING, cfg=(2.0,)))  # one point: the best sits at the grid's edge
    rescored = replace(at_edge, scoring=replace(at_edge.scoring, beyond_cfg=(3.0,)))
    meta = {"grid": "toy", "data": "fashion-mnist", "seeds": 1}
    out = tmp_path / "bench"
    run_bench(tmp_path / "first", [at_edge], meta, data_dir=str(fm), classifier_epochs=1, classifier_limit=128)
    (tmp_path / "first").rename(out)  # a moved (or merged) folder keeps its measurements
    drawn, floors = [], []
    sample_with, floor_sets = protocol.sample_with, protocol.floor_sets
    monkeypatch.setattr(protocol, "sample_with",
                        lambda pipe, n, seed, **settings: drawn.append(settings) or sample_with(pipe, n, seed, **settings))
    monkeypatch.setattr(protocol, "floor_sets", lambda *a, **kw: floors.append(a) or floor_sets(*a, **kw))
    run_bench(out, [at_edge, rescored], meta, data_dir=str(fm), resume=True, classifier_epochs=1, classifier_limit=128)
    first, second = (r["result"] for r in Results(out / "cells.jsonl").load())
    assert second["nll"] == first["nll"] and second["floors"] == first["floors"] and floors == []
    assert second["points"][0] == first["points"][0] and second["points"][1]["settings"]["cfg1"] == 3.0
    moved = second["final"]["settings"] != first["final"]["settings"]
    assert drawn[0] == {"cfg1": 3.0, "t1": 1.0, "t2": 1.1, "refine_steps": 1, "refiner_mask": True} and len(drawn) == 1 + moved
    if not moved:  # the same final set: its figures and sample grid
        assert second["final"] == first["final"] and second["samples"] == first["samples"]
    assert len(list((out / "measurements").glob("point-*.json"))) == 2


def test_measurements_kept_under_in_place_artifact_paths_are_still_found(tmp_path: Path) -> None:
    """Measurements taken before artifact paths were portable were hashed with the folder's own path."""
    from ctfgen.experiments.protocol import IN_FOLDER, Artifacts

    workshop = Workshop(tmp_path)
    art = Artifacts(*(str(tmp_path / "artifacts" / name) for name in ("tok", "train", "test", "h")), "/elsewhere/c")
    portable = workshop.portable(art)
    assert portable["tokenizer"] == f"{IN_FOLDER}/artifacts/tok" and portable["classifier"] == "/elsewhere/c"
    assert workshop.measured("nll", {"artifacts": dataclasses.asdict(art), "seed": 0}, lambda: {"nll": 1.0}) == {"nll": 1.0}
    assert workshop.measured("nll", {"artifacts": portable, "seed": 0}, lambda: pytest.fail("taken again")) == {"nll": 1.0}
    assert workshop.measured("nll", {"artifacts": portable, "seed": 1}, lambda: {"nll": 2.0}) == {"nll": 2.0}


def test_decode_precision_cells_share_the_models_and_are_compared_with_fp32(tmp_path: Path, fm: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from ctfgen import pipeline

    used, prepare = [], pipeline._Pipeline.prepare_decode
    monkeypatch.setattr(pipeline._Pipeline, "prepare_decode",
                        lambda pipe, precision="fp32", **kw: used.append((pipe.ar_name, precision)) or prepare(pipe, precision, **kw))
    cells = [replace(TOY, side=side, decode_precision=p, scoring=replace(TOY_SCORING, floor_per_class=0))
             for side in ("ctf", "baseline") for p in ("fp32", "int8")]
    out = tmp_path / "bench"
    run_bench(out, cells, {"grid": "toy", "data": "fashion-mnist", "seeds": 1}, data_dir=str(fm), classifier_epochs=1,
              classifier_limit=128)
    records = {r["result"]["label"]: r["result"] for r in Results(out / "cells.jsonl").load()}
    assert set(records) == {"CTF", "CTF, int8 decoding", "baseline, equal steps", "baseline, equal steps, int8 decoding"}
    assert len(list((out / "models").glob("coarse-*"))) == 1 and len(list((out / "models").glob("baseline-*"))) == 1
    assert records["CTF, int8 decoding"]["nll"] == records["CTF"]["nll"]  # the likelihood is the trained model's,
    assert len(list((out / "measurements").glob("nll-*.json"))) == 2  # scored once for both precisions
    assert used == [("coarse", "fp32"), ("coarse", "int8"), ("model", "fp32"), ("model", "int8")]  # sampled so
    (setup,) = group(Results(out / "cells.jsonl").load())
    lines = verdict(setup)
    assert sum("int8 decoding against fp32" in line for line in lines) == 2
    assert setup.baseline.cell["decode_precision"] == "fp32"  # the reference rows are the fp32 ones


def test_an_auto_k_cell_shares_the_models_and_measurements_of_the_k_it_picks(tmp_path: Path, fm: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`k="auto"` picks a K whose hierarchy is the fixed-K one (same method and seed): the cell of that K
    trains and measures nothing again, and both records give the same figures."""
    from ctfgen.experiments import protocol

    trained, train = [], protocol.train
    monkeypatch.setattr(protocol, "train", lambda config, **kw: trained.append(config.out) or train(config, **kw))
    auto = replace(TOY, k="auto", scoring=replace(TOY_SCORING, floor_per_class=0))
    meta = {"grid": "toy", "data": "fashion-mnist", "seeds": 1}
    out = tmp_path / "bench"
    run_bench(out, [auto], meta, data_dir=str(fm), classifier_epochs=1, classifier_limit=128)
    (first,) = Results(out / "cells.jsonl").load()
    k = first["result"]["K"]
    assert len(trained) == 2  # a coarse model and a refiner
    assert Path(first["result"]["auto_hierarchy"]).name.endswith("Kauto")
    measurements = sorted((out / "measurements").iterdir())
    run_bench(out, [auto, replace(auto, k=k)], meta, data_dir=str(fm), resume=True)
    _, fixed = Results(out / "cells.jsonl").load()
    assert len(trained) == 2 and sorted((out / "measurements").iterdir()) == measurements
    assert fixed["cell"]["k"] == k and fixed["result"]["final"] == first["result"]["final"]
    assert fixed["result"]["nll"] == first["result"]["nll"] and "auto_hierarchy" not in fixed["result"]


def test_a_field_added_with_a_default_keeps_the_keys() -> None:
    """Results recorded before a cell field existed are still found: a default value is not hashed."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Cell:  # noqa: F811 (two versions of one type, as a project sees them over time)
        a: int
        b: int = 2

    before = cell_key(Cell(1))

    @dataclass(frozen=True)
    class Cell:  # noqa: F811
        a: int
        b: int = 2
        c: bool = False

    assert cell_key(Cell(1)) == before and cell_key(Cell(1, c=True)) != before and cell_key(Cell(1, 3)) != before


def test_compute_matched_steps(tmp_path: Path, fm: Path) -> None:
    """The matched baseline's steps reach the named CTF's FLOPs; a cheaper refiner buys it fewer."""
    workshop = Workshop(tmp_path, str(fm), classifier_limit=128)
    cell = replace(TOY, side="baseline", steps=100)
    art = workshop.artifacts(cell)
    full = workshop.baseline_steps(replace(cell, compute_of=(1.0, 1.0)), art)
    cheap = workshop.baseline_steps(replace(cell, compute_of=(0.5, 0.5)), art)
    assert workshop.baseline_steps(cell, art) == 100 < cheap < full
    coarse, refiner = workshop._ctf_specs(cell, 1.0, 1.0)
    ctf = 100 * (workshop.flops_per_step(coarse, art) + workshop.flops_per_step(refiner, art))
    per_step = workshop.flops_per_step(workshop._spec(cell, "baseline", 1), art)
    assert (full - 1) * per_step < ctf <= full * per_step
    # a refiner trained within clusters is charged for the M = largest-cluster head rows it computes, not V
    _, within = workshop._ctf_specs(replace(cell, side="ctf", refiner_mask=True), 1.0, 1.0)
    config, m = workshop._config(refiner, art), int(load_hierarchy(art.hierarchy).sizes.max())
    tokens = refiner.batch_size * config.grid_h * config.grid_w
    assert workshop.flops_per_step(refiner, art) - workshop.flops_per_step(within, art) == pytest.approx(
        6 * (config.head_size - m) * config.dim * tokens)
    assert workshop.baseline_steps(replace(cell, compute_of=(1.0, 1.0), refiner_mask=True), art) < full
    with pytest.raises(ValueError, match="refiner_mask only with compute_of"):
        replace(cell, refiner_mask=True)


def test_train_items_takes_a_class_balanced_share_and_names_its_own_codes_and_models(tmp_path: Path, fm: Path) -> None:
    """The quick grids' `train_items`: codes of that many training images, as evenly over the classes as
    they allow, in their own folder; models trained on them in their own folders; the test codes whole."""
    import numpy as np

    workshop = Workshop(tmp_path, str(fm), classifier_limit=128)
    share, whole = replace(TOY, train_items=40), TOY
    a, b = workshop.artifacts(share), workshop.artifacts(whole)
    assert a.codes_train != b.codes_train and a.codes_test == b.codes_test and a.tokenizer == b.tokenizer
    labels = np.load(Path(a.codes_train) / "labels.npy")
    assert len(labels) == 40 and np.bincount(labels, minlength=10).tolist() == [4] * 10
    assert len(np.load(Path(b.codes_train) / "labels.npy")) == 256
    assert workshop.model_folder(workshop._spec(share, "coarse", 3)) != workshop.model_folder(workshop._spec(whole, "coarse", 3))


def test_a_clustering_method_builds_its_own_hierarchy_and_coarse_models_and_is_a_row_of_its_own(
        tmp_path: Path, fm: Path) -> None:
    """`clustering` groups the codewords of the same tokenizer by another method: its own hierarchy folder (k-means
    keeps the name it had), its own stage-1 and refiner models, the same baseline; the report gives it a row of the
    setup, and compares its likelihood parts with the baseline's split only where both are of k-means clusters."""
    workshop = Workshop(tmp_path, str(fm), classifier_limit=128)
    grouped = replace(TOY, clustering="agglomerative")
    a, b = workshop.artifacts(TOY), workshop.artifacts(grouped)
    assert (a.tokenizer, a.codes_train) == (b.tokenizer, b.codes_train)
    assert Path(a.hierarchy).name == "hierarchy-V64-2steps-K16"
    assert Path(b.hierarchy).name == "hierarchy-V64-2steps-K16-agglomerative"
    assert load_hierarchy(b.hierarchy).method == "agglomerative" and load_hierarchy(b.hierarchy).K == 16
    folder = workshop.model_folder
    for role in ("coarse", "refiner"):
        assert folder(workshop._spec(TOY, role, 3)) != folder(workshop._spec(grouped, role, 3))
    baseline = replace(TOY, side="baseline")
    assert workshop._spec(baseline, "baseline", 3) == workshop._spec(replace(baseline, clustering="random"),
                                                                     "baseline", 3)
    ctfs = [record("ctf", 0, 10.0, 4.0), record("ctf", 0, 12.0, 4.2, clustering="agglomerative")]
    for rec, uniform in zip(ctfs, (6.0, 9.0)):  # the uniform member's floor depends on the hierarchy
        rec["result"]["floors"] = {name: {"fid": fid, "n": 10} for name, fid in
                                   (("reconstruction", 4.0), ("true-coarse+uniform", uniform), ("true-coarse+refiner", 7.0))}
    (setup,) = group(ctfs + [record("baseline", 0, 11.0, 4.1)])
    uniform = [line for line in floors_table(setup) if "true-coarse+uniform" in line]
    assert [line.split(" | ")[1:3] for line in uniform] == [["tokenizer, hierarchy (K=16, kmeans)", "6.00"],
                                                           ["tokenizer, hierarchy (K=16, agglomerative)", "9.00"]]
    assert sorted(r.label(False) for r in setup.rows) == ["CTF", "CTF, agglomerative clusters", "baseline, equal steps"]
    lines = verdict(setup)
    assert [("coarse part" in line) for line in lines if "against the baseline, equal steps" in line] == [True, False]
    assert not [line for line in lines if line.startswith("Cheapest")]  # another clustering is not a smaller refiner


def record(side: str, seed: int, fid: float, nll: float, flops: float = 1.0, refiner: tuple = (1.0, 1.0),
           compute_of: list | None = None, k: int = 16, lite0: float | None = None, **options: object) -> dict:
    cell = {**json.loads(json.dumps(TOY.__dict__, default=lambda o: o.__dict__)), "side": side, "seed": seed,
            "refiner_depth": refiner[0], "refiner_steps": refiner[1], "compute_of": compute_of, **options}
    final = {"fid": fid, "n": 100, "settings": {"cfg1": 1.0}, "images_per_s": 10.0}
    if lite0 is not None:  # scored so too: a cell whose scoring differs only there
        cell["scoring"] = {**cell["scoring"], "also_features": ["effnet-lite0"], "also_per_class": 10}
        final["features"] = {"effnet-lite0": {"fid": lite0, "n": 100}}
    return {"key": f"{side}{seed}{refiner}{compute_of}{options}", "cell": cell, "wall_s": 1.0, "result": {
        "label": side, "K": k, "flops": flops, "final": final, "artifacts": {"tokenizer": "t", "classifier": "c"}, "points": [{"settings": {"cfg1": c}, "fid": fid + c - 1, "n": 50} for c in (1.0, 2.0)],
        "nll": {"coarse": nll / 2, "within": nll / 2, "nll": nll}, "samples": "x.png"}}


def test_a_refiner_of_a_smaller_preset_is_a_smaller_refiner_of_the_same_setup() -> None:
    small = dict(size="small", refiner_size="small", refiner_mask=True)
    records = ([record("ctf", s, 5.0 + 0.1 * s, 3.0, **small) for s in range(3)]
               + [record("baseline", s, 7.0 + 0.1 * s, 3.5, **small) for s in range(3)]
               # the tiny preset's refiner at the full share of its layers: not the full-size refiner
               + [record("ctf", s, 5.1 + 0.1 * s, 3.0, flops=0.4, **{**small, "refiner_size": "tiny"}) for s in range(3)]
               # a baseline given the compute of a full-depth refiner of the small preset: not the tiny one's match
               + [record("baseline", s, 6.0, 3.4, compute_of=[1.0, 1.0], **small) for s in range(3)])
    (setup,) = group(records)
    narrow = "CTF (refiner tiny, trained within clusters)"
    assert [r.label(False) for r in setup.rows] == ["CTF (refiner trained within clusters)", "baseline, equal steps",
                                                   narrow, "baseline, compute of CTF (refiner trained within clusters)"]
    assert not setup.rows[2].full_size
    lines = verdict(setup)
    # the cheapest refiner against each baseline it has (not the one matched to another refiner's compute)
    assert [line.split(":")[0] for line in lines if line.startswith(f"{narrow} against")] == [
        f"{narrow} against the baseline, equal steps"]
    tiny_match = [record("baseline", s, 6.0, 3.4, compute_of=[1.0, 1.0], **{**small, "refiner_size": "tiny"})
                  for s in range(3)]
    (setup,) = group(records + tiny_match)
    assert setup.rows[-1].label(False) == "baseline, compute of CTF (refiner tiny, trained within clusters)"
    assert [line.split(":")[0] for line in verdict(setup) if line.startswith(f"{narrow} against")] == [
        f"{narrow} against the baseline, equal steps",
        f"{narrow} against the baseline, compute of CTF (refiner tiny, trained within clusters)"]
    assert lines[-1] == (f"Cheapest refiner whose FID is not worse than the full one's (beyond the spread): {narrow}, "
                         "0.40x the training FLOPs of CTF (refiner trained within clusters) (against the baselines: "
                         "above).")
    assert setup_title(setup).startswith("V=64, small models, 3 steps")


def test_the_map_compares_every_k_and_the_k_auto_picked(tmp_path: Path) -> None:
    """The full map's CTFs train their refiners within clusters; each K is a row of its own (not a smaller
    refiner of another K), and the best K by FID is set against the one `auto` picked."""
    def at(k: int | str, picked: int, fids: tuple, refiner: tuple = (1.0, 1.0), flops: float = 1.0) -> list[dict]:
        records = [record("ctf", s, fid, 3.0, flops, refiner, k=picked, refiner_mask=True) for s, fid in enumerate(fids)]
        for r in records:
            r["cell"]["k"], r["key"] = k, f"{r['key']}{k}"
        return records

    records = (at(16, 16, (5.0, 5.1, 5.2)) + at(32, 32, (6.0, 6.1, 6.2)) + at(48, 48, (5.1, 5.2, 5.3))
               + at("auto", 24, (5.5, 5.6, 5.7)) + at(32, 32, (5.9, 6.0, 6.1), (0.5, 1.0), 0.6)
               + [record("baseline", s, 7.0 + 0.1 * s, 3.5) for s in range(3)])
    (setup,) = group(records)
    Image.new("L", (16, 16)).save(tmp_path / "x.png")
    write_report(records, {"grid": "map", "data": "d", "command": "c", "machine": "m", "date": "t"}, tmp_path)
    report = (tmp_path / "BENCHMARKS.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| 64 | tiny | 3 | CTF (refiner trained within")]
    assert [row.split(" | ")[4] for row in rows] == ["16", "32", "48", "24 (auto)"]
    assert "| -2.00 +- 0.20 | CTF better |" in rows[0]
    assert ("- V=64, tiny, 3 steps, CTF (refiner trained within clusters): best FID at K=16 (5.10 +- 0.10), tied by "
            "K=48; `auto` picked K=24: FID 5.60 +- 0.10 -> the best K better.") in report
    assert (tmp_path / "map_fid_gap.png").is_file()
    lines = verdict(setup)  # the half-depth refiner is the cheaper one at its own K only
    assert [line for line in lines if line.startswith("Cheapest")] == [
        "Cheapest refiner whose FID is not worse than the full one's (beyond the spread): CTF (refiner 0.5x depth, "
        "trained within clusters), K=32, 0.60x the training FLOPs of CTF (refiner trained within clusters), K=32 "
        "(against the baselines: above)."]


def test_only_keeps_the_grid_cells_with_those_values(fm: Path) -> None:
    def only(*conditions: str, **overrides: object) -> list[Cell]:
        return bench_cells("cpu", 3, False, "fashion-mnist", str(fm), **overrides,
                           only=[cell_condition(c) for c in conditions])

    depths = only("size=small", "refiner_mask=true")  # the refiners of three sizes, 3 seeds
    assert len(depths) == 9 and {(c.refiner_size, c.refiner_depth) for c in depths} == {
        ("small", 1.0), ("small", 0.25), ("tiny", 0.5)}
    matched = only("compute_of=[1.0, 0.25]", "seed=0")  # JSON lists are the cells' tuples
    assert [(c.side, c.seed, c.compute_of) for c in matched] == [("baseline", 0, (1.0, 0.25))]
    assert [c.steps for c in only("steps=3200", "side=baseline", steps=50)] == [50, 50, 50]  # chosen, then set
    with pytest.raises(CtfgenError, match='--only size="GPT-XL": no cell of the cpu grid has that '
                       r'\(size takes "small", "tiny" there\)'):
        only("size=GPT-XL")
    with pytest.raises(CtfgenError, match=r"has that \(each value is there, not all together\)"):
        only("size=small", "steps=200")
    with pytest.raises(argparse.ArgumentTypeError, match="FIELD one of batch_size, clustering, codebook"):
        cell_condition("flavour=sweet")


def test_guidance_beyond_the_grid_only_while_the_best_point_sits_at_its_edge() -> None:
    def scored(point: dict) -> dict:
        return {"settings": point, "fid": abs(point["cfg1"] - optimum) + point["t1"]}

    grid = Scoring(cfg=(1.0, 2.0, 4.0), t1=(1.0, 1.1), t2=(), beyond_cfg=(6.0, 8.0, 12.0))
    for optimum, best_cfg, extra in ((7.0, 6.0, [6.0, 8.0]), (30.0, 12.0, [6.0, 8.0, 12.0]), (3.0, 2.0, [])):
        points = [scored(p) for p in grid.points("baseline")]
        best = best_point(points, grid.beyond_cfg, scored)
        assert best["settings"] == {"cfg1": best_cfg, "t1": 1.0}  # (4 and 2 tie at optimum 3: the first)
        assert [p["settings"]["cfg1"] for p in points[6:]] == extra  # at the best point's temperatures
    with pytest.raises(ValueError, match="beyond_cfg must rise"):
        Scoring(beyond_cfg=(3.0,))
    with pytest.raises(ValueError, match="beyond_cfg must rise"):
        Scoring(beyond_cfg=(8.0, 6.0))
    assert cell_key(replace(TOY, scoring=replace(TOY_SCORING, beyond_cfg=()))) == cell_key(TOY)


def test_a_scoring_field_older_records_lack_does_not_split_a_setup() -> None:
    old, new = record("ctf", 0, 5.0, 3.0), record("baseline", 0, 6.0, 3.1)
    old["cell"]["scoring"].pop("beyond_cfg")  # recorded before the field existed; the new one spells out []
    (setup,) = group([old, new])
    assert [r.cell["side"] for r in setup.rows] == ["ctf", "baseline"]


def test_steps_to_fid_interpolates_in_log_steps() -> None:
    curve = [(100, 60.0), (400, 40.0), (1600, 30.0)]
    assert steps_to_fid(curve, 50.0) == pytest.approx(200.0)  # halfway in FID, halfway in log steps
    assert steps_to_fid(curve, 60.0) == 100 and steps_to_fid(curve, 35.0) == pytest.approx(800.0)
    assert steps_to_fid(curve, 29.0) is None and steps_to_fid([(100, 20.0)], 25.0) == 100


def test_steps_to_fid_at_the_smallest_budget_is_a_bound() -> None:
    records = [record("baseline", s, fid, 3.0, steps=steps) for steps, fid in ((200, 20.0), (400, 10.0)) for s in range(2)]
    records += [record("ctf", s, 9.0, 3.0, steps=400) for s in range(2)]  # one budget only, already below 10
    assert steps_to_fid_lines(group(records)) == [
        "Steps to FID (mean FIDs, interpolated linearly in log steps between the budgets):", "",
        "- CTF reaches the FID the baseline has at 400 steps (10.00) in 400 steps or fewer (its smallest budget "
        "measured; at most 1.00x as many).",
        "- The baseline reaches the FID CTF has at 400 steps (9.00) in none of the budgets.", ""]


def test_budgets_are_reported_for_every_family_and_a_k_joins_its_budgets(tmp_path: Path) -> None:
    """A map run at two budgets for two V: each V gets its budget table; K=16, one row among several K at the
    first budget and the only K at the second, is one series (its steps to FID interpolated between the two)."""
    def at(v: int, steps: int, side: str, k: int, fid: float) -> list[dict]:
        records = [record(side, s, fid + 0.1 * s, 3.0, k=k, codebook=v, steps=steps) for s in range(2)]
        for r in records:
            r["cell"]["k"], r["key"] = k, f"{r['key']}{v}{steps}{k}"
        return records

    records = []
    for v in (64, 128):
        records += at(v, 3, "ctf", 16, 10.0) + at(v, 3, "ctf", 32, 12.0) + at(v, 3, "baseline", 16, 20.0)
        records += at(v, 9, "ctf", 16, 5.0) + at(v, 9, "baseline", 16, 8.0)
    Image.new("L", (16, 16)).save(tmp_path / "x.png")
    write_report(records, {"grid": "map", "data": "d", "command": "c", "machine": "m", "date": "t"}, tmp_path)
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "### V=64" in report and "### V=128" in report
    assert report.count("| CTF, K=16 | 10.05 +- 0.07 | 5.05 +- 0.07 |") == 2
    assert report.count("- CTF, K=16 reaches the FID the baseline has at 9 steps (8.05) in about") == 2
    assert (tmp_path / "fid_vs_steps.png").is_file()


def test_report_calls_gaps_only_beyond_the_spread(tmp_path: Path) -> None:
    records = ([record("ctf", s, fid, 3.0 + 0.01 * s) for s, fid in enumerate((5.0, 5.2, 4.8))]
               + [record("baseline", s, fid, 3.5 + 0.01 * s) for s, fid in enumerate((7.0, 7.3, 6.9))]
               + [record("baseline", s, fid, 3.0, compute_of=[1.0, 1.0], flops=2.0) for s, fid in enumerate((5.1, 4.6, 5.5))]
               + [record("ctf", s, fid, 3.2, flops=0.6, refiner=(0.5, 1.0)) for s, fid in enumerate((5.1, 4.9, 5.3))]
               # an option is not a smaller refiner, even where its FLOPs were counted lower
               + [record("ctf", s, 5.0, 3.0, flops=0.3, refiner_features=True) for s in range(3)]
               # a cheap refiner with a baseline given its own compute, both also scored in Lite0 features
               + [record("ctf", s, 5.0 + 0.1 * s, 3.0, flops=0.5, refiner=(1.0, 0.25), lite0=20.0 + s, refiner_mask=True)
                  for s in range(3)]
               + [record("baseline", s, 9.0 + 0.1 * s, 3.4, compute_of=[1.0, 0.25], lite0=40.0 + s) for s in range(3)]
               + [record("ctf", s, 5.05 + 0.05 * s, 2.9, flops=1.0, refiner_mask=True) for s in range(3)]
               # the baseline given that cheap refiner's compute counted with its member-only head
               + [record("baseline", s, 9.5, 3.5, compute_of=[1.0, 0.25], lite0=45.0 + s, refiner_mask=True)
                  for s in range(3)])
    (setup,) = group(records)  # the Lite0 scoring does not split the setup
    lines = verdict(setup)
    assert "equal steps: FID 5.00 +- 0.20 vs 7.07 +- 0.21 (0.71x) -> CTF better" in lines[0]
    assert "NLL 3.010 +- 0.010 vs 3.510 +- 0.010 nats/token -> CTF better" in lines[0]
    assert "compute of CTF: FID 5.00 +- 0.20 vs 5.07 +- 0.45 (0.99x) -> tie (within the spread)" in lines[1]
    cheapest = [line for line in lines if line.startswith("Cheapest refiner")]
    assert len(cheapest) == 2 and "0.5x depth" in cheapest[0] and "0.60x the training FLOPs of CTF (" in cheapest[0]
    assert cheapest[1].endswith("CTF (refiner 0.25x steps, trained within clusters), 0.50x the training FLOPs of "
                                "CTF (refiner trained within clusters) (against the baselines: above).")
    cheap = [line for line in lines if line.startswith("CTF (refiner 0.25x steps, trained within clusters) against")]
    assert len(cheap) == 3 and "effnet-lite0" not in cheap[0]  # the equal-steps baseline was not scored so
    assert cheap[2].startswith("CTF (refiner 0.25x steps, trained within clusters) against the baseline, compute of "
                               "CTF (refiner 0.25x steps, trained within clusters): FID 5.10 +- 0.10 vs 9.50 +- 0.00")
    charged = [line for line in lines if "against the baseline, compute of CTF (refiner 0.25x steps, trained" in line]
    assert charged == cheap[2:]  # that baseline is no match for a CTF whose refiner computes all V head rows
    assert ("compute of CTF (refiner 0.25x steps): FID 5.10 +- 0.10 vs 9.10 +- 0.10 (0.56x) -> CTF better; FID in "
            "effnet-lite0 features (n=100) 21.00 +- 1.00 vs 41.00 +- 1.00 (0.51x) -> CTF better; NLL") in cheap[1]
    # an option at full size is compared with each baseline too, and so is the cheapest smaller refiner
    assert any(line.startswith("CTF (refiner reads stage-1 features) against the baseline, compute of CTF: FID 5.00")
               for line in lines)
    assert [line.split(":")[0] for line in lines if "0.5x depth) against" in line] == [
        "CTF (refiner 0.5x depth) against the baseline, equal steps"]
    worse = [record("ctf", s, 5.0, 3.0) for s in range(3)] + [record("ctf", s, 6.0, 3.0, refiner=(0.5, 1.0))
                                                               for s in range(3)]
    assert verdict(group(worse)[0])[-1] == "No smaller refiner keeps the FID of CTF (beyond the spread)."
    one_seed = [record("ctf", 0, 1.0, 1.0), record("baseline", 0, 9.0, 9.0)]
    assert "tie (within the spread)" in verdict(group(one_seed)[0])[0]  # one seed proves nothing
    at_edge = [record("ctf", 0, 1.0, 1.0), record("baseline", 0, 9.0, 9.0), record("baseline", 1, 9.0, 9.0)]
    at_edge[1]["result"]["final"]["settings"]["cfg1"] = 2.0  # the toy grid's strongest guidance
    assert "baseline, equal steps: best point at the largest CFG scored (2) for 1 of 2 seeds; its FID might be lower " \
           "with stronger guidance." in verdict(group(at_edge)[0])
    at_edge[1]["result"]["points"].append({"settings": {"cfg1": 3.0}, "fid": 9.5, "n": 50})  # scored beyond the grid
    assert not any("largest CFG" in line for line in verdict(group(at_edge)[0]))
    at_edge[1]["result"]["final"]["settings"]["cfg1"] = 3.0
    assert any("largest CFG scored (3) for 1 of 2" in line for line in verdict(group(at_edge)[0]))
    table, _ = points_table(group(at_edge)[0])
    baseline = next(line for line in table if line.startswith("| baseline"))  # a point some seeds lack says so
    assert '{"cfg1": 2.0}: 10.00, {"cfg1": 3.0}: 9.50 (1 of 2 seeds) |' in baseline
    assert not any("largest CFG" in line for line in lines)
    other_k = [record("ctf", 0, 1.0, 1.0), record("baseline", 0, 9.0, 9.0, k=64)]
    assert "coarse part" in lines[0] and "coarse part" not in verdict(group(other_k)[0])[0]  # split needs one K
    Image.new("L", (16, 16)).save(tmp_path / "x.png")
    summary = write_report(records, {"grid": "g", "data": "d", "command": "c", "machine": "m", "date": "t"}, tmp_path)
    assert summary["setups"][0]["verdict"] == lines
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| baseline, equal steps | 3 |" in report and "5.00 +- 0.20" in report
    assert "FID in effnet-lite0 features (a class-balanced 100 of each final set against as many test images): " \
           "CTF (refiner 0.25x steps, trained within clusters) 21.00 +- 1.00; baseline, compute of CTF " in report


def test_bench_command(tmp_path: Path, fm: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    args = parser.parse_args(["--grid", "map", "--quick", "--out", str(tmp_path), "--steps", "10", "--seeds", "1",
                              "--data-dir", str(fm)])
    assert args.quick and args.steps == 10 and callable(cmd_bench)
    cells = bench_cells(args.grid, args.seeds, args.quick, args.data, args.data_dir, args.steps, "tiny")
    assert {c.steps for c in cells} == {10} and {c.codebook for c in cells} == {1024, 4096}
    assert {c.tokenizer_steps for c in cells} == {100}  # the quick grids' tokenizer
    args = parser.parse_args(["--grid", "stage2", "--tokenizer-steps", "2400", "--data-dir", str(fm),
                              "--beyond-cfg", "6", "8"])
    cells = bench_cells(args.grid, 1, False, args.data, args.data_dir, tokenizer_steps=args.tokenizer_steps,
                        beyond_cfg=args.beyond_cfg)
    assert {c.tokenizer_steps for c in cells} == {2400} and len(cells) == 6
    shallow = [c for c in cells if (c.refiner_depth, c.refiner_steps) == (0.5, 0.5) or c.compute_of == (0.5, 0.5)]
    assert sorted(c.side for c in shallow) == ["baseline", "ctf"]  # the half-depth refiner and its matched baseline
    assert len(bench_cells("stage2", 1, True, args.data, args.data_dir)) == 4  # not in the quick form
    assert {c.scoring.beyond_cfg for c in cells} == {(6.0, 8.0)}
    with pytest.raises(CtfgenError, match="--beyond-cfg: beyond_cfg must rise above the grid's largest CFG 4"):
        bench_cells("stage2", 1, False, args.data, args.data_dir, beyond_cfg=[3.0])
    with pytest.raises(SystemExit):
        parser.parse_args(["--tokenizer-steps", "0"])
    with pytest.raises(CtfgenError, match="does not go with --force"):
        cmd_bench(parser.parse_args(["--report-only", "--force", "--out", str(tmp_path), "--data-dir", str(fm)]))


def test_final_set_also_scored_in_other_features(tmp_path: Path, fm: Path) -> None:
    """`Scoring.also_features` scores a class-balanced share of the final set in another extractor's
    features; fields added to Scoring that hold their defaults leave every earlier cell's key alone."""
    assert cell_key(TOY) == "cc16c9b6fa0ef62b"  # the key this cell had before the field existed
    also = replace(TOY_SCORING, also_features=("effnet-lite0",), also_per_class=1)
    assert cell_key(replace(TOY, scoring=also)) != cell_key(TOY)
    with pytest.raises(ValueError, match="unknown feature extractors"):
        replace(TOY_SCORING, also_features=("clip",))
    run_bench(tmp_path / "bench", [replace(TOY, scoring=also)], {"grid": "toy", "data": "fashion-mnist"},
              data_dir=str(fm), classifier_epochs=1, classifier_limit=128)
    final = Results(tmp_path / "bench" / "cells.jsonl").load()[0]["result"]["final"]
    lite0 = final["features"]["effnet-lite0"]
    assert lite0["n"] == 10 and lite0["fid"] > 0  # one sample of each of the 10 classes
    floors = Results(tmp_path / "bench" / "cells.jsonl").load()[0]["result"]["floors"]
    for floor in floors.values():  # the floors in those features too, on every floor image (2 of each class)
        assert floor["features"]["effnet-lite0"]["n"] == 20 and floor["features"]["effnet-lite0"]["fid"] > 0
    report = (tmp_path / "bench" / "BENCHMARKS.md").read_text()
    assert "FID in effnet-lite0 features (a class-balanced" in report
    assert "| floor | from | FID | IS | FID in effnet-lite0 |" in report


def test_tokenizer_seeds_are_instances_whose_cells_pool_in_one_row(tmp_path: Path, fm: Path) -> None:
    """`--tokenizer-seeds 2`: every cell on each of two tokenizer instances (seed 0's keys as before, so earlier
    results still count); the report pools an instance's cells with the other's in one row (the spread covers
    the tokenizer) and shows each instance apart."""
    one = bench_cells("stage2", 2, True, "fashion-mnist", str(fm))
    two = bench_cells("stage2", 2, True, "fashion-mnist", str(fm), tokenizer_seeds=2)
    assert [cell_key(c) for c in two[:len(one)]] == [cell_key(c) for c in one] and len(two) == 2 * len(one)
    assert {c.tokenizer_seed for c in two[len(one):]} == {1}
    picked = bench_cells("stage2", 2, True, "fashion-mnist", str(fm), tokenizer_seeds=2,
                         only=[cell_condition("tokenizer_seed=1"), cell_condition("seed=0")])
    assert picked and all(c.tokenizer_seed == 1 and c.seed == 0 for c in picked)

    records = [record("ctf", s, 5.0 + t, 3.0, tokenizer_seed=t, lite0=20.0 + 4 * t) for t in (0, 1) for s in range(2)]
    records += [record("baseline", s, 8.0 + t, 3.5, tokenizer_seed=t, lite0=30.0) for t in (0, 1) for s in range(2)]
    for r in records:
        r["key"] += str(r["cell"]["tokenizer_seed"])
    (setup,) = group(records)
    assert [len(row.records) for row in setup.rows] == [4, 4]
    assert verdict(setup)[0].startswith("CTF against the baseline, equal steps: FID 5.50 +- 0.58 vs 8.50 +- 0.58")
    Image.new("L", (16, 16)).save(tmp_path / "x.png")
    write_report(records, {"grid": "g", "data": "d", "command": "c", "machine": "m", "date": "d"}, tmp_path)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| side | tokenizer seed | seeds | FID | FID in effnet-lite0 | NLL |" in text
    assert "| CTF | 1 | 2 | 6.00 +- 0.00 | 24.00 +- 0.00 | 3.000 +- 0.000 |" in text
    assert "| 1 (tokenizer 1) | 1 |" in text  # the cells table names the instance
    # and the verdict on each instance alone: tokenizer 1's CTF is 6.00 against 9.00 (0.67x), 24 against 30 in Lite0
    assert "- tokenizer 1: CTF against the baseline, equal steps: FID 6.00 +- 0.00 vs 9.00 +- 0.00 (0.67x)" in text
    assert "(n=100) 24.00 +- 0.00 vs 30.00 +- 0.00 (0.80x)" in text


def test_a_tokenizer_seed_trains_its_own_tokenizer_and_models(tmp_path: Path, fm: Path) -> None:
    workshop = Workshop(tmp_path, str(fm), classifier_limit=128)
    a, b = workshop.artifacts(TOY), workshop.artifacts(replace(TOY, tokenizer_seed=1))
    assert Path(b.tokenizer).name == Path(a.tokenizer).name + "-seed1" and b.classifier == a.classifier
    assert b.codes_train != a.codes_train and b.hierarchy != a.hierarchy
    assert json.loads((Path(b.tokenizer) / "train_config.json").read_text())["seed"] == 1
    from ctfgen.tokenizer.model import load_tokenizer
    assert load_tokenizer(a.tokenizer).fingerprint != load_tokenizer(b.tokenizer).fingerprint
    spec = workshop._spec(TOY, "coarse", 3)
    assert workshop.model_folder(spec) != workshop.model_folder(workshop._spec(replace(TOY, tokenizer_seed=1), "coarse", 3))
    assert workshop.model_folder(spec) == workshop.model_folder(replace(spec, tokenizer_seed=0))


def test_parts_of_a_grid_merge_into_one_folder_that_needs_nothing_run_again(tmp_path: Path, fm: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two parts (the second started from a copy of the first, so they share its artifacts) fold into a new
    folder: both cells' results, models and measurements, so the whole grid resumed there trains and measures
    nothing; a part whose artifacts differ is refused before anything is copied."""
    import shutil

    from ctfgen.experiments import protocol

    sample_with = protocol.sample_with
    meta, kw = {"grid": "toy", "data": "fashion-mnist", "seeds": 2}, dict(data_dir=str(fm), classifier_epochs=1,
                                                                          classifier_limit=128)
    cells = [TOY, replace(TOY, seed=1)]
    run_bench(tmp_path / "a", cells[:1], meta, **kw)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run_bench(tmp_path / "b", cells[1:], meta, resume=True, **kw)
    summary = run_bench(tmp_path / "all", cells, meta, merge=[tmp_path / "a", tmp_path / "b"], **kw)
    records = Results(tmp_path / "all" / "cells.jsonl").load()
    assert sorted(r["cell"]["seed"] for r in records) == [0, 1] and summary["setups"]
    assert all(p.startswith(str(tmp_path / "all")) for r in records for p in r["result"]["artifacts"].values())
    monkeypatch.setattr(protocol, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(protocol, "sample_with", lambda *a, **k: pytest.fail("sampled again"))
    run_bench(tmp_path / "all", cells, meta, resume=True, **kw)  # every cell done: nothing runs
    rescored = [replace(c, scoring=replace(c.scoring, final_per_class=2)) for c in cells]  # new keys, same models
    monkeypatch.setattr(protocol, "sample_with", sample_with)
    run_bench(tmp_path / "all", rescored, meta, resume=True, **kw)  # measures anew, trains nothing

    other = tmp_path / "c"
    shutil.copytree(tmp_path / "b", other)
    (other / "artifacts" / "classifier" / "model.safetensors").write_bytes(b"another classifier")
    before = (tmp_path / "all" / "cells.jsonl").read_text()
    with pytest.raises(CtfgenError, match="artifacts/classifier differs from the one in"):
        run_bench(tmp_path / "all", cells, meta, merge=[other], **kw)
    assert (tmp_path / "all" / "cells.jsonl").read_text() == before
    with pytest.raises(CtfgenError, match="that is --out itself"):
        run_bench(tmp_path / "all", cells, meta, merge=[tmp_path / "all"], **kw)
    with pytest.raises(CtfgenError, match="not a folder `ctfgen bench` wrote"):
        run_bench(tmp_path / "new", cells, meta, merge=[fm], **kw)
    assert not (tmp_path / "new").exists()
