"""Fixtures that several test modules share (pytest hands them to every module under tests/; a module that
imported them instead would shadow each one with its own name). The builders they use live in the modules
that test those parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.tokenizer.model import save_tokenizer
from ctfgen.transformer import Transformer, save_model
from test_sampling import K, V, gen, random_model, tiny_tokenizer
from test_training import write_codes, write_hierarchy


@pytest.fixture(scope="module")
def models() -> dict[str, Transformer]:
    """Random tiny models of the three roles (4x4 grid, V = 32, K = 8, 5 classes)."""
    return {role: random_model(role, seed=i) for i, role in enumerate(("coarse", "refiner", "baseline"))}


@pytest.fixture(scope="module")
def hierarchy() -> Hierarchy:
    return Hierarchy(torch.randperm(V, generator=gen(0)) % K, K)


@pytest.fixture()
def run_dir(tmp_path: Path, models: dict[str, Transformer], hierarchy: Hierarchy) -> Path:
    """A run folder as `ctfgen demo` leaves one: tokenizer, hierarchy and the three models."""
    run = tmp_path / "run"
    tok = tiny_tokenizer()
    save_tokenizer(tok, run / "tokenizer")
    save_hierarchy(Hierarchy(hierarchy.coarse_of, K, tokenizer_fingerprint=tok.fingerprint), run / "hierarchy")
    for role, model in models.items():
        save_model(model, run / role)
    return run


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads spin-wait (40x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic training codes, held-out codes and a hierarchy (4x4 grid, V = 32, K = 8, 4 classes)."""
    root = tmp_path_factory.mktemp("data")
    return {"codes": write_codes(root / "codes"), "val": write_codes(root / "val", n=32, seed=1),
            "hierarchy": write_hierarchy(root / "hierarchy")}
