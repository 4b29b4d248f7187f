"""The CTF-against-baseline protocol: what one cell of `ctfgen bench` trains and measures.

A `Cell` names one trained side (CTF with some refiner, or the baseline) at one budget and seed, with
everything that changes its numbers. `Workshop.run(cell)` trains what the cell needs (or reuses it:
artifacts and models live in folders named by what made them, so cells that share a model train it
once), then measures:
- the likelihood split on the test codes (nats per token; `likelihood.nll_split`);
- every operating point of the scoring grid (CFG x t1, x t2 for CTF), one sampling seed each;
- a final class-balanced set at the side's own best point, drawn with a different seed (picking the
  best point on the set that reports it would flatter every side), with its sampling speed;
- for CTF, the floors (`floors.floor_sets`).
Every run decays its learning rate to its own last step; a shorter budget is a separate run. Each of those
measurements is also kept under a hash of everything it depends on (`Workshop.measured`), so a cell rescored
with a new scoring option takes again only what that option changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Callable

import torch

from ..arguments import AtLeast, Count, Fraction, NonNegative, OneOf, Positive, Rate, check_fields
from ..artifacts import read_json, write_json
from ..data.codes import CODES_KIND, CodeDataset
from ..data.datasets import Subset, balanced_subset, build_dataset, dataset_labels, take_images
from ..data.transforms import image_grid
from ..evaluate import Reference, sample_with, score
from ..hierarchy import METHODS as CLUSTERINGS, build_hierarchy, load_hierarchy, save_hierarchy
from ..hierarchy.artifact import HIERARCHY_KIND
from ..metrics import extractor_names, get_extractor
from ..metrics.classifier import KIND as CLASSIFIER_KIND
from ..outputs import is_finished, open_output
from ..pipeline import DEFAULTS, BaselinePipeline, CTFPipeline
from ..sampling import StageSettings
from ..tokenizer.model import TOKENIZER_KIND, load_tokenizer
from ..training import INFO_NAME, TrainConfig, train
from ..training.checks import expected_model_fields
from ..transformer import MODEL_SIZES, Transformer, build_model, load_model, save_model
from ..transformer.model import ARTIFACT_KIND as MODEL_KIND, preset_config
from ..transformer.precision import DECODE_PRECISIONS
from .engine import LATE, cell_key
from .floors import floor_sets
from .likelihood import nll_split, within_in_passes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scoring:
    """How a cell is scored (part of the cell: changing it changes the numbers)."""

    point_per_class: Count = 30  # samples per class at each operating point
    final_per_class: Count = 1000  # the final set at the side's best point (10,000 for 10 classes)
    cfg: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
    t1: tuple[float, ...] = (1.0, 1.1)
    t2: tuple[float, ...] = (1.0, 1.1)  # CTF only
    floor_per_class: NonNegative = 100  # real test images per class for the floors (CTF cells); 0 = none
    nll_items: Count = 2000  # test code grids in the likelihood split
    # the final set's FID also in these extractors' features (e.g. "effnet-lite0"), on `also_per_class` of its
    # samples per class against as many class-balanced test images (Lite0 takes ~0.13 s an image on a CPU thread)
    also_features: tuple[str, ...] = field(default=(), metadata=LATE)
    also_per_class: Count = field(default=200, metadata=LATE)
    # guidance past the grid (ascending, above its largest CFG), scored one by one at the best point's temperatures
    # while that best point sits at the strongest guidance scored so far: a side is compared at its own best
    beyond_cfg: tuple[float, ...] = field(default=(), metadata=LATE)
    # the baseline's likelihood split also at these K (the CTF cells' K beside it): its coarse and within parts
    # depend on the clusters, so they compare with a CTF's only at that CTF's K
    split_ks: tuple[int, ...] = field(default=(), metadata=LATE)

    # fields that add a measurement and change none of the others: cells that differ only there share a setup
    ADDS_ONLY = ("also_features", "also_per_class", "split_ks")

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = sorted(set(self.also_features) - set(extractor_names()))
        if unknown:
            raise ValueError(f"unknown feature extractors {unknown}; choose from {extractor_names()}")
        if any(not isinstance(k, int) or k < 2 for k in self.split_ks):
            raise ValueError(f"split_ks are cluster counts (integers >= 2); got {self.split_ks}")
        ladder = (max(self.cfg), *self.beyond_cfg)
        if any(a >= b for a, b in zip(ladder, ladder[1:])):
            raise ValueError(f"beyond_cfg must rise above the grid's largest CFG {max(self.cfg):g}; got {self.beyond_cfg}")

    def points(self, side: str) -> list[dict[str, float]]:
        t2s = self.t2 if side == "ctf" else (None,)
        return [{"cfg1": c, "t1": t1, **({"t2": t2} if t2 is not None else {})}
                for c in self.cfg for t1 in self.t1 for t2 in t2s]


@dataclass(frozen=True)
class Cell:
    """One side at one budget and seed. The baseline ignores the refiner fields unless `compute_of` names
    a CTF refiner: then it trains for that CTF's FLOPs (coarse + a refiner of `refiner_size`) instead of `steps`
    steps, a refiner trained within clusters (`refiner_mask`) charged for the member-only head it computes."""

    side: Annotated[str, OneOf("ctf", "baseline")]
    steps: Count  # stage 1's (and the baseline's) training steps: the budget
    seed: int = 0  # initialisation, data order and dropout; the sampling seeds derive from it
    data: str = "fashion-mnist"
    codebook: Annotated[int, AtLeast(2)] = 4096  # V: one tokenizer per V
    k: int | str = 512  # clusters, or "auto" (the noise-floor criterion)
    clustering: Annotated[str, OneOf(*CLUSTERINGS)] = "kmeans"  # how the codewords are grouped into the K clusters
    size: Annotated[str, OneOf(*MODEL_SIZES)] = "small"
    refiner_size: Annotated[str, OneOf(*MODEL_SIZES)] = "small"
    refiner_depth: Fraction = 1.0  # share of refiner_size's layers
    refiner_steps: Fraction = 1.0  # share of `steps` the refiner trains for
    compute_of: tuple[float, float] | None = None  # baseline: (refiner_depth, refiner_steps) of the CTF it matches
    refiner_reveal: bool = False  # the refiner also reads decided codewords (trained with --reveal)
    refine_steps: Count = 1  # stage-2 passes when sampling (> 1 needs refiner_reveal)
    refiner_features: bool = False  # the refiner reads the coarse model's hidden states (--stage1-features)
    refiner_corrupt: Rate = 0.0  # share of coarse labels redrawn by the coarse model in refiner training (--corrupt)
    refiner_mask: bool = False  # the refiner trains on its cluster's members only (--refiner-mask), as stage 2 samples
    stage2_mask: bool = True  # stage 2 draws within each position's cluster; False: among all V (--no-refiner-mask)
    decode_precision: Annotated[str, OneOf(*DECODE_PRECISIONS)] = "fp32"  # the weights' precision while sampling
    batch_size: Count = 64
    lr: Positive = 1e-3
    warmup_steps: NonNegative = 50  # capped at a quarter of a run
    dropout: Rate = 0.0
    tokenizer_steps: Count = 600
    tokenizer_seed: int = 0  # the tokenizer's initialisation and data order: another instance of the same recipe
    train_items: Annotated[int | None, AtLeast(1)] = None  # models train on this many class-balanced images (None: all)
    scoring: Scoring = Scoring()

    def __post_init__(self) -> None:
        check_fields(self)
        if self.k != "auto" and not (isinstance(self.k, int) and 2 <= self.k <= self.codebook):
            raise ValueError(f"k must be 'auto' or an integer in [2, {self.codebook}], got {self.k!r}")
        if self.refine_steps > 1 and not self.refiner_reveal:
            raise ValueError("refine_steps > 1 needs refiner_reveal (a refiner that reads decided codewords)")
        if self.refiner_mask and self.refiner_corrupt > 0:
            raise ValueError("refiner_mask needs true coarse labels (a corrupted one's cluster may not hold the code)")
        if self.side == "baseline" and self.compute_of is None and self.refiner_mask:
            raise ValueError("a baseline reads refiner_mask only with compute_of (the CTF whose compute it gets)")
        if not self.stage2_mask and (self.side != "ctf" or self.refiner_mask):
            raise ValueError("stage2_mask=False samples a CTF refiner over all V codewords, which needs one trained "
                             "with the full head (refiner_mask=False)")

    @property
    def label(self) -> str:
        """What the report calls this side."""
        return side_label(asdict(self))


def clusters_label(clustering: str) -> str:
    """How labels name a clustering other than the default k-means: ", agglomerative clusters"."""
    return f", {clustering} clusters" if clustering != "kmeans" else ""


def side_label(cell: dict[str, Any]) -> str:
    """What the report calls a side, from a cell's fields: "CTF (refiner 0.5x depth)", "baseline, equal
    steps", "CTF (refiner reads decided codes, 4 passes)", "CTF (refiner tiny, 0.5x depth)" (a refiner of
    another size preset than stage 1's), ... (fields a record lacks take their defaults)."""
    c = {**CELL_DEFAULTS, **cell}

    def refiner(depth: float, steps: float, options: bool) -> str:
        # (a baseline's refiner_size and refiner_mask describe the CTF whose compute it gets)
        sized = [c["refiner_size"]] if c["refiner_size"] != c["size"] else []
        parts = sized + ([f"{depth:g}x depth"] if depth != 1 else []) + ([f"{steps:g}x steps"] if steps != 1 else [])
        if options:
            parts += (["reads decided codes"] if c["refiner_reveal"] else []) + (
                [f"{c['refine_steps']} passes"] if c["refine_steps"] != 1 else []) + (
                ["reads stage-1 features"] if c["refiner_features"] else []) + (
                [f"trained on {100 * c['refiner_corrupt']:g}% corrupted labels"] if c["refiner_corrupt"] else []) + (
                ["sampled over all V"] if not c["stage2_mask"] else [])
        parts += ["trained within clusters"] if c["refiner_mask"] else []
        return f" (refiner {', '.join(parts)})" if parts else ""

    decoded = f", {c['decode_precision']} decoding" if c["decode_precision"] != "fp32" else ""
    if c["side"] == "ctf":
        return "CTF" + refiner(c["refiner_depth"], c["refiner_steps"], True) + clusters_label(c["clustering"]) + decoded
    matched = c["compute_of"]
    return ("baseline, equal steps" if matched is None else "baseline, compute of CTF" + refiner(*matched, False)) + decoded


@dataclass(frozen=True)
class ModelSpec:
    """Everything that makes one trained transformer; its folder is named by it."""

    role: str
    steps: int
    seed: int
    data: str
    codebook: int
    k: int | str | None  # None for the baseline (it does not see the hierarchy)
    size: str
    depth: float
    batch_size: int
    lr: float
    warmup_steps: int
    dropout: float
    tokenizer_steps: int
    train_items: int | None = None  # (the default keeps the folder names of models trained before it existed)
    tokenizer_seed: int = 0  # (the same)
    # refiner options (defaults keep the folder names of models trained before they existed)
    reveal: bool = False
    corrupt: float = 0.0
    features: bool = False
    mask: bool = False  # the refiner's loss over its cluster's members only
    clustering: str = "kmeans"  # the hierarchy's (a baseline keeps the default: it sees none); keeps earlier names
    stage1: "ModelSpec | None" = None  # the coarse model a refiner reads (features or corrupted labels)


IN_FOLDER = "<bench>"  # how a measurement's inputs name the bench folder, so that it can move
CELL_DEFAULTS = {f.name: f.default for f in fields(Cell) if f.default is not MISSING}
# as a record spells them (tuples are JSON lists): what a record written before a field existed means by it
SCORING_DEFAULTS = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(Scoring)}


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that cost multiply-adds: all but the input embeddings (a table look-up); the head counts."""
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - embeddings


@dataclass
class Artifacts:
    tokenizer: str
    codes_train: str
    codes_test: str
    hierarchy: str
    classifier: str


FOLDERS = ("artifacts", "models", "measurements", "samples", "cache")  # what a Workshop keeps under its root


class Workshop:
    """Builds and caches what cells need under `root` (`FOLDERS`): artifacts/ (tokenizers, codes, hierarchies,
    the domain classifier), models/, measurements/, samples/ and cache/ (reference statistics). `reuse` is a
    run folder whose tokenizer/, codes-*/, hierarchy/ and classifier/ stand in for the ones a cell would build
    when their V and K match."""

    def __init__(self, root: str | Path, data_dir: str | None = None, cache_dir: str | None = None,
                 reuse: str | Path | None = None, device: str = "cpu", classifier_epochs: int = 2,
                 classifier_limit: int | None = 20000):
        self.root, self.data_dir, self.device = Path(root), data_dir, torch.device(device)
        self.cache_dir = cache_dir or str(self.root / "cache")
        self.reuse = Path(reuse) if reuse else None
        self.classifier_epochs, self.classifier_limit = classifier_epochs, classifier_limit
        self._artifacts: dict[tuple[Any, ...], Artifacts] = {}  # built or found once per (data, V, K, steps)

    # --- artifacts ------------------------------------------------------------------------------
    def _reusable(self, name: str, kind: str, fits: Any = lambda folder: True) -> Path | None:
        folder = self.reuse / name if self.reuse else None
        return folder if folder is not None and is_finished(folder, kind) and fits(folder) else None

    def _built(self, folder: Path, kind: str, build: Any) -> str:
        if not is_finished(folder, kind):
            log.info("building %s", folder)
            start = time.perf_counter()
            build(folder)
            log.info("built %s in %.1f min", folder.name, (time.perf_counter() - start) / 60)
        return str(folder)

    def artifacts(self, cell: Cell) -> Artifacts:
        key = (cell.data, cell.codebook, cell.k, cell.clustering, cell.tokenizer_steps, cell.tokenizer_seed,
               cell.train_items)
        if key not in self._artifacts:
            self._artifacts[key] = self._find_or_build(cell)
        return self._artifacts[key]

    def _find_or_build(self, cell: Cell) -> Artifacts:
        from ..metrics.classifier import train_classifier
        from ..tokenizer.extract import extract_codes
        from ..tokenizer.train import TokenizerTrainConfig, train_tokenizer

        art, v = self.root / "artifacts", cell.codebook
        # a reused tokenizer stands in for seed 0 only: another seed asks for another instance
        reused_tok = self._reusable("tokenizer", TOKENIZER_KIND, lambda f: cell.tokenizer_seed == 0
                                    and load_tokenizer(f).config.codebook_size == v)
        if reused_tok:
            tag, tok_dir = f"reused-V{v}", str(reused_tok)
        else:
            tag = f"V{v}-{cell.tokenizer_steps}steps" + (f"-seed{cell.tokenizer_seed}" if cell.tokenizer_seed else "")
            tok_dir = self._built(art / f"tokenizer-{tag}", TOKENIZER_KIND, lambda f: train_tokenizer(
                TokenizerTrainConfig(out=str(f), data=cell.data, data_dir=self.data_dir, codebook_size=v,
                                     steps=cell.tokenizer_steps, report_limit=1000, seed=cell.tokenizer_seed,
                                     device=str(self.device)),
                resume=True, progress=False))

        def codes(split: str) -> str:
            items = cell.train_items if split == "train" else None
            reused = self._reusable(f"codes-{split}", CODES_KIND, lambda f: CodeDataset(f).fingerprint
                                    == load_tokenizer(tok_dir).fingerprint) if reused_tok and items is None else None
            if reused:
                return str(reused)

            def build(folder: Path) -> None:
                tok = load_tokenizer(tok_dir)
                ds = build_dataset(cell.data, split, tok.config.image_size, tok.config.in_channels,
                                   data_dir=self.data_dir)
                if items is not None:
                    ds = Subset(ds, balanced_subset(dataset_labels(ds), min(items, len(ds)), 0))
                extract_codes(tok, ds, folder, dataset_name=cell.data, split=split, progress=False)
            return self._built(art / (f"codes-{split}-{tag}" + (f"-{items}items" if items else "")), CODES_KIND, build)

        codes_train, codes_test = codes("train"), codes("test")

        def same_clusters(folder: Path) -> bool:  # a reused run's hierarchy stands in only for the cell's own
            h = load_hierarchy(folder)
            return reused_tok is not None and cell.k != "auto" and (h.K, h.method) == (cell.k, cell.clustering)

        reused_h = self._reusable("hierarchy", HIERARCHY_KIND, same_clusters)

        def hierarchy(folder: Path) -> None:
            tok = load_tokenizer(tok_dir)
            images = None
            if cell.k == "auto":  # K is chosen on training images, never on the test split that scores it
                ds = build_dataset(cell.data, "train", tok.config.image_size, tok.config.in_channels,
                                   data_dir=self.data_dir)
                images = take_images(Subset(ds, balanced_subset(dataset_labels(ds), min(512, len(ds)), 0)))
            h = build_hierarchy(tok, cell.clustering, cell.k, images=images)
            open_output(folder, HIERARCHY_KIND).write(lambda path: save_hierarchy(h, path))

        name = f"hierarchy-{tag}-K{cell.k}" + (f"-{cell.clustering}" if cell.clustering != "kmeans" else "")
        hierarchy_dir = str(reused_h) if reused_h else self._built(art / name, HIERARCHY_KIND, hierarchy)
        reused_c = self._reusable("classifier", CLASSIFIER_KIND)
        classifier_dir = str(reused_c) if reused_c else self._built(
            art / "classifier", CLASSIFIER_KIND, lambda f: train_classifier(
                out=str(f), data=cell.data, epochs=self.classifier_epochs, limit=self.classifier_limit,
                data_dir=self.data_dir, device=str(self.device)))
        return Artifacts(tok_dir, codes_train, codes_test, hierarchy_dir, classifier_dir)

    # --- models ----------------------------------------------------------------------------------
    def _config(self, spec: ModelSpec, art: Artifacts) -> Any:
        codes = CodeDataset(art.codes_train)
        hierarchy = None if spec.role == "baseline" else load_hierarchy(art.hierarchy)
        width = self._config(spec.stage1, art).dim if spec.features else 0
        expected = expected_model_fields(spec.role, codes, hierarchy, spec.reveal, width)
        config = preset_config(spec.size, num_classes=codes.num_classes, **{k: v for k, (v, _) in expected.items()})
        return replace(config, n_layer=max(1, round(config.n_layer * spec.depth)))

    def flops_per_step(self, spec: ModelSpec, art: Artifacts) -> float:
        """6 x matmul parameters x tokens of one step (forward + backward; attention scores left out), plus
        2 x those of the coarse model a refiner reads (its forward pass, every step). A refiner trained within
        clusters multiplies each position by the head rows of its cluster's members only (padded to the largest
        cluster, M), so its head counts M x dim, not V x dim."""
        def matmuls(s: ModelSpec) -> int:
            config = self._config(s, art)
            with torch.device("meta"):  # shapes only: counting a GPT-L's parameters allocates nothing
                n = matmul_parameters(build_model(config))
            if s.mask:
                n -= (config.head_size - int(load_hierarchy(art.hierarchy).sizes.max())) * config.dim
            return n

        config = self._config(spec, art)
        tokens = spec.batch_size * config.grid_h * config.grid_w
        return (6.0 * matmuls(spec) + (2.0 * matmuls(spec.stage1) if spec.stage1 else 0.0)) * tokens

    def model_folder(self, spec: ModelSpec) -> Path:
        return self.root / "models" / f"{spec.role}-{cell_key(spec)}"

    def model(self, spec: ModelSpec, art: Artifacts) -> tuple[Path, dict[str, Any]]:
        """The trained model's folder (trained now unless an earlier cell did) and its compute."""
        folder = self.model_folder(spec)
        if not is_finished(folder, MODEL_KIND):
            init = folder.parent / f".{folder.name}.init"
            torch.manual_seed(spec.seed)
            save_model(build_model(self._config(spec, art)), init)  # fresh weights at this depth
            log.info("training %s: %s", folder.name, spec)
            start = time.perf_counter()
            train(TrainConfig(
                role=spec.role, codes=art.codes_train, hierarchy=None if spec.role == "baseline" else art.hierarchy,
                out=str(folder), init=str(init), steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                warmup_steps=min(spec.warmup_steps, spec.steps // 4), lr_decay="cosine", dropout=spec.dropout,
                reveal=spec.reveal, corrupt=spec.corrupt, stage1_features=spec.features, refiner_mask=spec.mask,
                coarse_model=str(self.model_folder(spec.stage1)) if spec.stage1 else None,
                seed=spec.seed, device=str(self.device), save_every=max(1, spec.steps // 4),
                log_every=max(1, min(25, spec.steps))), resume=True, progress=False)
            log.info("trained %s in %.1f min", folder.name, (time.perf_counter() - start) / 60)
        info = read_json(folder / INFO_NAME)
        return folder, {"steps": info["steps"], "parameters": info["parameters"],
                        "flops": self.flops_per_step(spec, art) * info["steps"], "wall_s": info["wall_s"],
                        "final_train_loss": info["final_train_loss"]}

    def _spec(self, cell: Cell, role: str, steps: int, depth: float = 1.0) -> ModelSpec:
        ctf = role != "baseline"
        return ModelSpec(role, steps, cell.seed, cell.data, cell.codebook, cell.k if ctf else None,
                         cell.refiner_size if role == "refiner" else cell.size, depth, cell.batch_size, cell.lr,
                         cell.warmup_steps, cell.dropout, cell.tokenizer_steps, cell.train_items,
                         tokenizer_seed=cell.tokenizer_seed, **({"clustering": cell.clustering} if ctf else {}))

    def _ctf_specs(self, cell: Cell, depth: float, share: float, options: bool = True) -> tuple[ModelSpec, ModelSpec]:
        """The coarse and refiner specs of a CTF; `options`: with the cell's refiner options (reveal, ...)."""
        coarse = self._spec(cell, "coarse", cell.steps)
        refiner = self._spec(cell, "refiner", max(1, round(cell.steps * share)), depth)
        if options:
            reads = cell.refiner_features or cell.refiner_corrupt > 0
            refiner = replace(refiner, reveal=cell.refiner_reveal, corrupt=cell.refiner_corrupt,
                              features=cell.refiner_features, mask=cell.refiner_mask, stage1=coarse if reads else None)
        return coarse, refiner

    def baseline_steps(self, cell: Cell, art: Artifacts) -> int:
        """`steps`, or the fewest steps whose FLOPs reach those of the CTF named by `compute_of`."""
        if cell.compute_of is None:
            return cell.steps
        coarse, refiner = self._ctf_specs(cell, *cell.compute_of, options=False)  # the plain refiner's compute,
        refiner = replace(refiner, mask=cell.refiner_mask)  # or the one trained within clusters
        ctf = self.flops_per_step(coarse, art) * coarse.steps + self.flops_per_step(refiner, art) * refiner.steps
        return math.ceil(ctf / self.flops_per_step(self._spec(cell, "baseline", 1), art))

    # --- one cell ----------------------------------------------------------------------------------
    def measured(self, what: str, inputs: dict[str, Any], measure: Callable[[], Any]) -> Any:
        """`measure()`, taken once for these inputs: its JSON result is kept in measurements/ under a hash of
        `what` and `inputs` (everything the measurement depends on: the model folders, which are named by
        what made them, the artifacts, seeds, counts and settings), so a cell rescored with a new option (say
        `beyond_cfg`) samples only what the option changes. Artifacts inside the folder count by their path in
        it (`portable`), so a moved or merged folder keeps its measurements. A change to the measuring code
        itself does not show in the hash: delete measurements/ (as models/ after a change to training) to take
        them anew."""
        path = self._measurement(what, inputs)
        if "artifacts" in inputs and not path.is_file():  # kept before artifact paths were portable (2026-12-02)
            in_place = {name: p.replace(IN_FOLDER, str(self.root), 1) for name, p in inputs["artifacts"].items()}
            legacy = self._measurement(what, {**inputs, "artifacts": in_place})
            path = legacy if legacy.is_file() else path
        if path.is_file():
            return read_json(path)["result"]
        start = time.perf_counter()
        result = measure()
        log.info("measured %s%s in %.0f s", what, f" {inputs['point']}" if "point" in inputs else "",
                 time.perf_counter() - start)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"what": what, "inputs": inputs, "result": result})
        return result

    def _measurement(self, what: str, inputs: dict[str, Any]) -> Path:
        text = json.dumps({"what": what, **inputs}, sort_keys=True)
        return self.root / "measurements" / f"{what}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"

    def portable(self, art: Artifacts) -> dict[str, str]:
        """The artifacts' paths, those inside the folder as IN_FOLDER/... (a reused `--run`'s stay as given)."""
        inside = str(self.root) + os.sep
        return {name: IN_FOLDER + os.sep + path[len(inside):] if path.startswith(inside) else path
                for name, path in asdict(art).items()}

    def with_chosen_k(self, cell: Cell) -> Cell:
        """A `k="auto"` cell as the cell of the K it picks, so that the two share their models and measurements
        (the choice clusters with the same method and seed, so the hierarchies agree; checked, not assumed)."""
        if cell.k != "auto":
            return cell
        auto = load_hierarchy(self.artifacts(cell).hierarchy)
        fixed = replace(cell, k=auto.K)
        return fixed if torch.equal(auto.coarse_of, load_hierarchy(self.artifacts(fixed).hierarchy).coarse_of) else cell

    def run(self, cell: Cell) -> dict[str, Any]:
        auto_hierarchy = self.artifacts(cell).hierarchy if cell.k == "auto" else None
        cell = self.with_chosen_k(cell)
        art = self.artifacts(cell)
        tokenizer = load_tokenizer(art.tokenizer).to(self.device)
        hierarchy = load_hierarchy(art.hierarchy, tokenizer=tokenizer)
        test_codes = CodeDataset(art.codes_test)
        s = cell.scoring
        if cell.side == "ctf":
            (coarse_dir, coarse), (refiner_dir, refiner) = (
                self.model(spec, art) for spec in self._ctf_specs(cell, cell.refiner_depth, cell.refiner_steps))
            pipe: CTFPipeline | BaselinePipeline = CTFPipeline(
                tokenizer, hierarchy, load_model(coarse_dir, self.device), load_model(refiner_dir, self.device))
            train, model_dirs = {"coarse": coarse, "refiner": refiner}, (coarse_dir, refiner_dir)
        else:
            model_dir, baseline = self.model(self._spec(cell, "baseline", self.baseline_steps(cell, art)), art)
            pipe = BaselinePipeline(tokenizer, load_model(model_dir, self.device))
            train, model_dirs = {"baseline": baseline}, (model_dir,)
        # what every measurement of this cell depends on, besides its own counts and settings; the likelihood
        # scores the models as trained, everything after it samples at the cell's decode precision
        setup = {"models": [d.name for d in model_dirs], "artifacts": self.portable(art), "data": cell.data,
                 "seed": cell.seed, "refine_steps": cell.refine_steps, "device": self.device.type}
        sampled = {**setup, "decode_precision": cell.decode_precision}
        if cell.side == "ctf" and cell.decode_precision != "fp32":  # since 2026-12-01 the refiner follows it too
            sampled["refiner_precision"] = cell.decode_precision
        if not cell.stage2_mask:  # (only then: the measurements of every earlier cell keep their names)
            sampled["stage2_mask"] = False

        def likelihood() -> dict[str, Any]:
            if cell.side == "baseline":
                return nll_split(test_codes, hierarchy, baseline=pipe.model, limit=s.nll_items)["baseline"]
            nll = nll_split(test_codes, hierarchy, coarse=pipe.coarse, refiner=pipe.refiner, limit=s.nll_items)["ctf"]
            if cell.refine_steps > 1:  # the exact NLL of sampling in that many passes (in a random order)
                nll["within_in_passes"] = within_in_passes(pipe.refiner, test_codes, hierarchy, cell.refine_steps,
                                                           s.nll_items, stage1=pipe.coarse, seed=cell.seed)
                nll["nll_in_passes"] = nll["coarse"] + nll["within_in_passes"]
            return nll

        nll = self.measured("nll", {**setup, "nll_items": s.nll_items}, likelihood)
        if cell.side == "baseline" and s.split_ks:
            nll = {**nll, "at_k": {str(k): self.split_at(cell, k, pipe.model, test_codes, setup)
                                   for k in s.split_ks if k != hierarchy.K}}
        pipe.prepare_decode(cell.decode_precision)  # after the likelihood split, which scores the model as trained
        stage2 = {"refine_steps": cell.refine_steps, "refiner_mask": cell.stage2_mask} if cell.side == "ctf" else {}
        extractor = get_extractor("domain", path=art.classifier)
        ref = Reference(cell.data, "test", None, self.data_dir, self.cache_dir)

        def scored(point: dict[str, float]) -> dict[str, Any]:
            def measure() -> dict[str, Any]:
                images = sample_with(pipe, s.point_per_class, 1000 * cell.seed + 1, **point, **stage2)
                return {"settings": point, **brief(score(images.images, images.labels, extractor, ref, self.device))}
            return self.measured("point", {**sampled, "point": point, "per_class": s.point_per_class}, measure)

        points = [scored(point) for point in s.points(cell.side)]
        best = best_point(points, s.beyond_cfg, scored)

        def final_set() -> dict[str, Any]:
            start = time.perf_counter()
            drawn = sample_with(pipe, s.final_per_class, 1000 * cell.seed + 2, **best["settings"], **stage2)
            sample_s = time.perf_counter() - start
            final = {"settings": best["settings"], "sample_s": round(sample_s, 2),
                     "images_per_s": len(drawn.labels) / sample_s,
                     **brief(score(drawn.images, drawn.labels, extractor, ref, self.device))}
            if s.also_features:
                final["features"] = self.also_scored(drawn.images, drawn.labels, ref, s.also_features, s.also_per_class)
            samples = self.root / "samples" / f"{cell_key(cell)}.png"
            samples.parent.mkdir(parents=True, exist_ok=True)
            image_grid(drawn.images[first_per_class(drawn.labels, 8)], nrow=8).save(samples)
            return {**final, "samples": str(samples.relative_to(self.root))}

        final = self.measured("final", {**sampled, "settings": best["settings"], "per_class": s.final_per_class,
                                        "also_features": s.also_features, "also_per_class": s.also_per_class}, final_set)
        samples = final.pop("samples")  # (the grid drawn when the set was: a rescored cell shows the same images)
        result = {"label": cell.label, "artifacts": asdict(art), "K": hierarchy.K, "train": train,
                  "flops": sum(t["flops"] for t in train.values()), "nll": nll, "points": points, "final": final,
                  "samples": samples}
        if auto_hierarchy:  # where the choice of K and its curve are recorded
            result["auto_hierarchy"] = auto_hierarchy
        if cell.side == "ctf" and s.floor_per_class:
            result["floors"] = self.measured(
                "floors", {**sampled, "per_class": s.floor_per_class, "also_features": s.also_features},
                lambda: self.floors(cell, pipe, extractor, ref))
        return result

    def split_at(self, cell: Cell, k: int, baseline: Transformer, test_codes: CodeDataset,
                 setup: dict[str, Any]) -> dict[str, float]:
        """The baseline's likelihood split at the K-means hierarchy of K clusters of the cell's tokenizer."""
        other = self.artifacts(replace(cell, k=k))
        inputs = {**setup, "nll_items": cell.scoring.nll_items, "split_hierarchy": self.portable(other)["hierarchy"]}
        return self.measured("nll", inputs, lambda: nll_split(test_codes, load_hierarchy(other.hierarchy),
                                                              baseline=baseline, limit=cell.scoring.nll_items)["baseline"])

    def also_scored(self, images: torch.Tensor, labels: torch.Tensor, ref: Reference, features: tuple[str, ...],
                    per_class: int | None = None) -> dict[str, Any]:
        """FID and the rest in each of `features`, on the first `per_class` images of each class (None: all)
        against as many class-balanced test images (the same subset for every cell: its seed is fixed)."""
        keep = first_per_class(labels, per_class) if per_class else torch.arange(len(labels))
        ref = replace(ref, n=len(keep))
        return {name: brief(score(images[keep], labels[keep], get_extractor(name), ref, self.device))
                for name in features}

    def floors(self, cell: Cell, pipe: CTFPipeline, extractor: Any, ref: Reference) -> dict[str, dict[str, Any]]:
        tokenizer = pipe.tokenizer
        ds = build_dataset(cell.data, "test", tokenizer.config.image_size, tokenizer.config.in_channels,
                           data_dir=self.data_dir)
        labels = dataset_labels(ds)
        n = min(len(ds), cell.scoring.floor_per_class * len(set(labels.tolist())))
        ds = Subset(ds, balanced_subset(labels, n, cell.seed))
        y = torch.from_numpy(ds.labels)
        sets = floor_sets(tokenizer, pipe.hierarchy, take_images(ds), y, refiner=pipe.refiner,
                          settings=StageSettings(temperature=DEFAULTS["t2"]), seed=1000 * cell.seed + 3,
                          coarse_model=pipe.coarse)
        floors = {name: brief(score(x, y, extractor, ref, self.device)) for name, x in sets.items()}
        if cell.scoring.also_features:  # how much room the other features leave (on every floor image)
            for name, x in sets.items():
                floors[name]["features"] = self.also_scored(x, y, ref, cell.scoring.also_features)
        return floors


def best_point(points: list[dict[str, Any]], beyond_cfg: tuple[float, ...],
               scored: Callable[[dict[str, float]], dict[str, Any]]) -> dict[str, Any]:
    """The lowest-FID point; while it sits at the strongest guidance scored, the next of `beyond_cfg` is scored
    at its temperatures and added to `points`."""
    best = min(points, key=lambda p: p["fid"])
    for cfg in beyond_cfg:
        if best["settings"]["cfg1"] < max(p["settings"]["cfg1"] for p in points):
            break  # inside what was scored
        points.append(scored({**best["settings"], "cfg1": cfg}))
        best = min(points, key=lambda p: p["fid"])
    return best


def first_per_class(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first `n` items of each class, class by class."""
    return torch.cat([torch.nonzero(labels == c).view(-1)[:n] for c in labels.unique()])


def brief(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("fid", "is_mean", "is_std", "precision", "recall", "class_consistency", "n")
    return {k: m[k] for k in keys if m.get(k) is not None}

