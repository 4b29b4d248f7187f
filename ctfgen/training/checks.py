"""Checks that run before the first training step: the artifacts must fit each other and the model.

Every failure names the artifact at fault and the mismatching values, so a run never starts on
codes, a hierarchy, a model or a checkpoint that belong to different tokenizers or vocabularies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ArtifactError, read_json
from ..data.codes import CodeDataset
from ..errors import CtfgenError
from ..hierarchy import Hierarchy, check_compatible, load_hierarchy
from ..transformer.model import MODEL_SIZES, Transformer, TransformerConfig, load_model
from .config import INFO_NAME, TrainConfig

ROLES_WITH_HIERARCHY = ("coarse", "refiner")
# Fields that may change between a checkpoint and its resumed run: they shape no weight.
REGULARISATION_FIELDS = ("class_dropout_prob", "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p")


def check_train_config(cfg: TrainConfig, world_size: int) -> None:
    """Settings that are wrong together, whatever the data (each field's own range is checked by TrainConfig)."""
    if cfg.init is None and cfg.size not in MODEL_SIZES:
        raise CtfgenError(f"--size {cfg.size!r} is not a known preset; known: {sorted(MODEL_SIZES)}")
    if not cfg.codes:
        raise CtfgenError("--codes is required: the folder written by `ctfgen extract`")
    if cfg.role in ROLES_WITH_HIERARCHY and not cfg.hierarchy:
        raise CtfgenError(f"the {cfg.role} model trains on coarse labels: give --hierarchy (the folder written by clustering)")
    if cfg.reveal and cfg.role != "refiner":
        raise CtfgenError(f"--reveal applies to the refiner only, not to --role {cfg.role}")
    stage1_reads = cfg.stage1_features or cfg.corrupt > 0
    if (stage1_reads or cfg.coarse_model) and cfg.role != "refiner":
        raise CtfgenError(f"--coarse-model, --stage1-features and --corrupt apply to the refiner only, not to --role {cfg.role}")
    if stage1_reads and not cfg.coarse_model:
        raise CtfgenError("--stage1-features and --corrupt read a trained coarse model: give --coarse-model DIR")
    if cfg.corrupt > 0 and cfg.refiner_mask:
        raise CtfgenError("--corrupt trains on coarse labels that may not hold the true codeword, so the cluster-masked "
                          "objective (the default) cannot score it; add --no-refiner-mask (the full head)")
    if cfg.sample_every and cfg.role == "refiner":
        raise CtfgenError("--sample-every: sample grids are for the coarse and baseline roles (the refiner needs a coarse model)")
    if cfg.sample_every and not cfg.sample_tokenizer:
        raise CtfgenError("--sample-every needs --sample-tokenizer DIR to turn tokens into pixels")
    if cfg.sample_every and cfg.role == "coarse" and not cfg.sample_refiner:
        raise CtfgenError("--sample-every for the coarse role needs --sample-refiner DIR")
    per_step = world_size * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise CtfgenError(f"--batch-size {cfg.batch_size} is not divisible by world size {world_size} x "
                          f"grad accumulation {cfg.grad_accum} = {per_step}")


def load_codes(folder: str, what: str = "--codes") -> CodeDataset:
    codes = CodeDataset(folder)
    if len(codes) == 0:
        raise CtfgenError(f"{what} {folder} holds no code grids: nothing to train or evaluate on")
    return codes


def check_batch_fits(codes: CodeDataset, batch_size: int) -> None:
    if len(codes) < batch_size:
        raise CtfgenError(f"--codes {codes.folder} holds {len(codes)} items, fewer than one global batch of {batch_size}")


def load_matching_hierarchy(cfg: TrainConfig, codes: CodeDataset) -> Hierarchy | None:
    """The hierarchy, checked against the codes' tokenizer and codebook (None for a baseline without one)."""
    if not cfg.hierarchy:
        return None
    h = load_hierarchy(cfg.hierarchy)
    check_compatible(h, fingerprint=codes.fingerprint, codebook_size=codes.codebook_size,
                     source=f"the code array {codes.folder}")
    return h


def resolve_num_classes(override: int | None, codes: CodeDataset) -> int:
    num_classes = codes.num_classes if override is None else override
    check_labels(codes, num_classes, "--num-classes" if override is not None else f"{codes.folder}/meta.json")
    return num_classes


def check_labels(codes: CodeDataset, num_classes: int, source: str) -> None:
    """Every class label must have its own row in the model's class table (the last row is the null class)."""
    labels = np.asarray(codes.labels)
    if labels.min() < 0:
        raise CtfgenError(f"{codes.folder}: class labels must be >= 0, found {int(labels.min())}")
    if labels.max() >= num_classes:
        raise CtfgenError(f"{codes.folder}: class labels go up to {int(labels.max())}, but the model has "
                          f"num_classes={num_classes} (from {source})")


def check_val_codes(val: CodeDataset, train: CodeDataset, num_classes: int) -> None:
    if val.fingerprint != train.fingerprint:
        raise ArtifactError(f"--val-codes {val.folder} came from tokenizer {val.fingerprint}, "
                            f"but --codes {train.folder} from {train.fingerprint}")
    if val.codebook_size != train.codebook_size or val.grid != train.grid:
        raise ArtifactError(f"--val-codes {val.folder} has codebook {val.codebook_size} and grid {val.grid}, "
                            f"--codes {train.folder} has {train.codebook_size} and {train.grid}")
    check_labels(val, num_classes, "the training run")


def role_vocabularies(role: str, codes: CodeDataset, hierarchy: Hierarchy | None) -> dict[str, tuple[int, str]]:
    """(value, where it comes from) of the input and output vocabularies a role needs."""
    V = (codes.codebook_size, f"V of the codes {codes.folder}")
    if role == "baseline":
        return {"vocab_size": V, "head_size": V}
    assert hierarchy is not None
    K = (hierarchy.K, "K of the hierarchy")
    return {"vocab_size": K, "head_size": K if role == "coarse" else V}


def expected_model_fields(role: str, codes: CodeDataset, hierarchy: Hierarchy | None, reveal: bool = False,
                          feature_dim: int = 0) -> dict[str, tuple[Any, str]]:
    grid_h, grid_w = codes.grid
    return {"role": (role, "--role"), **role_vocabularies(role, codes, hierarchy),
            "grid_h": (grid_h, "grid of the codes"), "grid_w": (grid_w, "grid of the codes"),
            "reveal": (reveal, "--reveal"), "feature_dim": (feature_dim, "--stage1-features (the coarse model's width)")}


def load_stage1(cfg: TrainConfig, codes: CodeDataset, hierarchy: Hierarchy | None, device: Any) -> Transformer:
    """The coarse model a refiner reads (--coarse-model): trained on this hierarchy, for these codes."""
    model = load_model(cfg.coarse_model, device)
    source = f"--coarse-model {cfg.coarse_model}"
    check_model_fits(model.config, expected_model_fields("coarse", codes, hierarchy), source)
    check_labels(codes, model.config.num_classes, source)
    info = Path(cfg.coarse_model) / INFO_NAME
    trained = read_json(info).get("hierarchy_fingerprint") if info.is_file() else None
    if trained is not None and hierarchy is not None and trained != hierarchy.fingerprint:
        raise ArtifactError(f"{source} was trained with hierarchy {trained}, this run's is {hierarchy.fingerprint}")
    return model


def check_model_fits(config: TransformerConfig, expected: dict[str, tuple[Any, str]], source: str) -> None:
    """ArtifactError naming every field of `config` that differs from what this run needs."""
    wrong = [f"{name}={getattr(config, name)} but this run needs {value} ({why})"
             for name, (value, why) in expected.items() if getattr(config, name) != value]
    if wrong:
        raise ArtifactError(f"{source} does not fit: " + "; ".join(wrong))


def check_same_architecture(stored: TransformerConfig, current: TransformerConfig, source: str) -> None:
    """A checkpoint resumes only into the same architecture (dropout rates may change)."""
    a, b = stored.to_dict(), current.to_dict()
    wrong = [f"{k}={a[k]} (this run: {b[k]})" for k in a if k not in REGULARISATION_FIELDS and a[k] != b.get(k)]
    if wrong:
        raise ArtifactError(f"{source} holds a different model: " + "; ".join(wrong))
