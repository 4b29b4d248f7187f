"""The settings of one training run (`ctfgen train` makes one flag of each field)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from ..arguments import AtLeast, Count, NonNegative, OneOf, Positive, Rate, check_fields
from ..transformer.model import ROLES

INFO_NAME = "train_info.json"  # what a finished run records beside its model


@dataclass
class TrainConfig:
    role: Annotated[str, OneOf(*ROLES)] = "coarse"
    size: str = "small"  # model size preset (ctfgen.transformer.MODEL_SIZES); ignored with --init
    codes: str = ""  # extracted-code folder (required)
    hierarchy: str | None = None  # hierarchy folder (required for coarse and refiner)
    out: str | None = None  # None: runs/default/<role>
    init: str | None = None  # start from this transformer folder instead of fresh weights
    val_codes: str | None = None  # held-out code folder, scored once at the end
    val_limit: Count = 1000  # held-out items scored
    num_classes: Annotated[int | None, AtLeast(1)] = None  # None: from the codes' meta.json
    steps: Count = 2000
    batch_size: Count = 64  # global: over all processes and accumulation micro-batches
    grad_accum: Count = 1
    lr: Positive = 1e-4
    warmup_steps: NonNegative = 0
    lr_decay: Annotated[str, OneOf("none", "cosine")] = "none"
    weight_decay: Annotated[float, AtLeast(0.0)] = 0.05  # on parameters with dim >= 2 only
    beta1: Rate = 0.9
    beta2: Rate = 0.95
    grad_clip: Annotated[float, AtLeast(0.0)] = 1.0  # 0 turns clipping off
    ema_decay: Rate = 0.0  # 0 turns EMA off; when on, the EMA weights are the saved model
    class_dropout: Rate = 0.1
    dropout: Rate = 0.1  # token embedding, residual and FFN dropout
    refiner_mask: bool = True  # refiner: CE over the members of the true cluster only (--no-refiner-mask: the paper's full head)
    reveal: bool = False  # refiner: also read codewords already decided, trained with a random share shown (sample --refine-steps)
    coarse_model: str | None = None  # refiner: the trained coarse model that --stage1-features and --corrupt read
    stage1_features: bool = False  # refiner: also read the coarse model's last hidden state at each position
    corrupt: Rate = 0.0  # refiner: share of coarse labels redrawn from the coarse model's predictions (its errors)
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    save_every: Count = 500
    keep_every: NonNegative = 0  # also keep the model at every N-th step in OUT/snapshots/stepN (curves); 0 = off
    log_every: Count = 25
    sample_every: NonNegative = 0  # coarse/baseline: a sample grid in TensorBoard every N steps; 0 = off
    sample_tokenizer: str | None = None  # tokenizer folder that decodes those samples
    sample_refiner: str | None = None  # coarse role: the refiner that turns its samples into fine codes

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/default/{self.role}")
