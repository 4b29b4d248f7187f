"""The evidence protocol's pieces on toy models where the answer is known: the spread rule, the
likelihood split, uniform cluster members and the floors. CPU, seconds."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ctfgen.data.codes import CodeDataset
from ctfgen.experiments import Results, cell_key, compare, floor_sets, nll_split, run_grid, spread
from ctfgen.hierarchy import Hierarchy
from test_sampling import GRID, K, V, random_model, tiny_tokenizer
from test_training import write_codes


def test_spread_and_when_a_gap_counts() -> None:
    a, b = spread([7.0, 7.2, 7.4]), spread([8.0, 8.1, 8.2])
    assert a.mean == pytest.approx(7.2) and a.sd == pytest.approx(0.2) and a.n == 3
    assert compare(a, b) == "a better" and compare(b, a) == "b better"
    assert compare(a, b, lower_is_better=False) == "b better"  # e.g. IS
    assert compare(a, spread([7.3, 7.4, 7.5])) == "tie"  # 0.2 apart, spreads 0.2 + 0.1: overlapping
    assert compare(spread([1.0]), spread([9.0])) == "tie"  # one seed is no evidence
    assert spread([3.0]).sd == 0.0


@pytest.fixture(scope="module")
def codes(tmp_path_factory: pytest.TempPathFactory) -> CodeDataset:
    return CodeDataset(write_codes(tmp_path_factory.mktemp("nll") / "codes", n=24))


def uniform(role: str):
    model = random_model(role)
    torch.nn.init.zeros_(model.head.weight)  # every logit 0: a uniform prediction
    return model


def test_the_split_of_uniform_models_is_known(codes: CodeDataset) -> None:
    h = Hierarchy(torch.arange(V) % K, K)  # K clusters of V/K members
    split = nll_split(codes, h, coarse=uniform("coarse"), refiner=uniform("refiner"), baseline=uniform("baseline"))
    for side in ("ctf", "baseline"):
        assert split[side]["coarse"] == pytest.approx(math.log(K), abs=1e-5)
        assert split[side]["within"] == pytest.approx(math.log(V // K), abs=1e-5)
        assert split[side]["nll"] == pytest.approx(math.log(V), abs=1e-5)
    unmasked = nll_split(codes, h, coarse=uniform("coarse"), refiner=uniform("refiner"), masked=False)
    assert unmasked["ctf"]["within"] == pytest.approx(math.log(V), abs=1e-5)  # no mask: all V codewords compete


def test_the_baseline_split_adds_up_and_matches_a_direct_sum(codes: CodeDataset) -> None:
    h = Hierarchy(torch.randperm(V, generator=torch.Generator().manual_seed(3)) % K, K)
    model = random_model("baseline", seed=5)
    split = nll_split(codes, h, baseline=model)["baseline"]
    assert split["coarse"] + split["within"] == pytest.approx(split["nll"])
    fine, labels = codes.batch(torch.arange(len(codes)))
    with torch.no_grad():
        probs = model(fine, labels).double().softmax(-1)  # [N, T, V]
    cluster_mass = torch.stack([probs[..., h.members(k)].sum(-1) for k in range(K)], -1)  # [N, T, K]
    expected = -cluster_mass.gather(-1, h.to_coarse(fine)[..., None]).log().mean().item()
    assert split["coarse"] == pytest.approx(expected, rel=1e-5)
    assert 0 < split["coarse"] < split["nll"]


def test_random_members_are_uniform_members_of_each_cluster() -> None:
    h = Hierarchy(torch.tensor([0, 1, 1, 2, 2, 2, 2, 0]), 3)
    coarse = torch.tensor([1, 2, 0]).repeat(4000).view(4, -1)
    fine = h.random_members(coarse, torch.Generator().manual_seed(0))
    assert fine.shape == coarse.shape and torch.equal(h.to_coarse(fine), coarse)
    counts = torch.bincount(fine.flatten(), minlength=8).float()
    for k in range(3):  # each cluster's members drawn equally often (4000 draws per cluster and grid row)
        share = counts[h.members(k)] / counts[h.members(k)].sum()
        assert torch.allclose(share, torch.full_like(share, 1 / len(share)), atol=0.03)
    assert torch.equal(fine, h.random_members(coarse, torch.Generator().manual_seed(0)))


def test_floor_sets() -> None:
    tok = tiny_tokenizer()
    h = Hierarchy(torch.arange(V) % K, K)
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    sets = floor_sets(tok, h, images, labels, refiner=random_model("refiner"), batch_size=4)
    assert set(sets) == {"reconstruction", "true-coarse+refiner", "true-coarse+uniform"}
    assert all(s.shape == images.shape and torch.isfinite(s).all() for s in sets.values())
    assert torch.equal(sets["reconstruction"], tok.decode(tok.encode(images)))
    again = floor_sets(tok, h, images, labels, refiner=random_model("refiner"), batch_size=4)
    assert all(torch.equal(sets[k], again[k]) for k in sets)  # seeded
    assert set(floor_sets(tok, h, images, labels)) == {"reconstruction", "true-coarse+uniform"}
    assert GRID == tok.config.grid_size


# --- the engine --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ToyCell:
    k: int
    seed: int


def test_a_grid_resumes_and_never_recomputes_a_finished_cell(tmp_path) -> None:
    results = Results(tmp_path / "results.jsonl")
    runs: list[ToyCell] = []

    def run(cell: ToyCell) -> dict:
        runs.append(cell)
        if cell == ToyCell(2, 0) and len(runs) == 3:
            raise KeyboardInterrupt  # killed in the middle of the third cell
        return {"fid": 10.0 * cell.k + cell.seed}

    grid = [ToyCell(k, seed) for k in (1, 2) for seed in (0, 1)]
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, run, results)
    with open(results.path, "a") as f:
        f.write('{"key": "cut off by the ki')  # and a line half-written
    records = run_grid(grid, run, results)
    assert runs == [ToyCell(1, 0), ToyCell(1, 1), ToyCell(2, 0), ToyCell(2, 0), ToyCell(2, 1)]
    assert [r["result"]["fid"] for r in records] == [10.0, 11.0, 20.0, 21.0]
    assert run_grid(grid, run, results) == records and len(runs) == 5  # all done: nothing runs
    assert cell_key(ToyCell(1, 0)) != cell_key(ToyCell(1, 1)) == cell_key(ToyCell(1, 1))


def test_a_cell_another_process_finished_meanwhile_is_not_run_again(tmp_path) -> None:
    results = Results(tmp_path / "results.jsonl")
    grid = [ToyCell(1, seed) for seed in range(3)]
    other = {"key": cell_key(grid[1]), "cell": {"k": 1, "seed": 1}, "result": {"fid": -1.0}}

    def run(cell: ToyCell) -> dict:
        if cell == grid[0]:
            results.append(other)  # a second bench on the folder finishes the next cell first
        return {"fid": float(cell.seed)}

    records = run_grid(grid, run, results)
    assert [r["result"]["fid"] for r in records] == [0.0, -1.0, 2.0]
