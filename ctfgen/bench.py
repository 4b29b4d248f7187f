"""`ctfgen bench`: CTF against the baseline on Fashion-MNIST (or `--data`), same tokenizer, same hierarchy.

Both sides train at the same stage-1 size, batch and steps, in segments (train to s1, score,
resume to s2, score, ...) so FID can be plotted against the step; a constant learning rate makes
resume-extending exact. A second baseline gets CTF's total training compute (its run continued).
Then: a class-balanced final set scored with `domain` (and `effnet-lite0`), sampling speed of both
at batch 1 and 64 with CFG on, a slimmer refiner and CFG at both stages, every side scored over a
grid of operating points (CFG x t1, x t2 for CTF) and compared at its own best, the floors, and the
likelihood split. Writes OUT/BENCHMARKS.md, OUT/bench.json and PNG plots. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw

from .arguments import Count, arg_type
from .artifacts import CONFIG_NAME
from .data.codes import CODES_KIND, CodeDataset
from .data.datasets import Subset, balanced_subset, build_dataset, check_data, dataset_labels, take_images
from .data.transforms import image_grid
from .errors import CtfgenError
from .evaluate import ImageSet, Reference, sample_with, score
from .experiments import floor_sets, nll_split
from .hierarchy import load_hierarchy
from .hierarchy.artifact import HIERARCHY_KIND
from .metrics import get_extractor
from .metrics.classifier import KIND as CLASSIFIER_KIND
from .outputs import add_output_flags, is_finished, open_output, plan_output
from .pipeline import DEFAULTS, BaselinePipeline, CTFPipeline, make_generator
from .sampling import StageSettings, refine, sample_causal
from .tokenizer.model import TOKENIZER_KIND, load_tokenizer
from .transformer import MODEL_SIZES, build_model, load_model, save_model

BENCH_KIND = "bench"  # the kind of the folder `ctfgen bench` writes (ctfgen.outputs)


@dataclass
class BenchBudget:
    size: str = "small"  # stage 1: the coarse AR model and the baseline
    refiner_size: str = "small"
    steps: int = 1000  # small models at batch 64: about 0.6 s a step on the 2-core CPU
    checkpoints: int = 4  # scored training steps: steps * i / checkpoints
    batch_size: int = 64
    lr: float = 1e-3  # constant (resume-extending must not change the schedule)
    warmup_steps: int = 50
    curve_per_class: int = 30  # samples per class at each checkpoint
    per_class: int = 100  # the final class-balanced set
    effnet_per_class: int = 20  # 0 skips effnet-lite0 (about 10-20 images/s on a CPU)
    effnet_ref_images: int = 1000
    sweep_per_class: int = 30
    # the operating points (the evidence protocol's grid): every CFG x t1 (x t2 for CTF)
    sweep_cfg: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
    sweep_t1: tuple[float, ...] = (1.0, 1.1)
    sweep_t2: tuple[float, ...] = (1.0, 1.1)
    speed_images_b1: int = 8  # images sampled one at a time
    speed_big_batch: int = 64
    speed_repeats: int = 3
    tokenizer_steps: int = 600  # only when no tokenizer is reused
    classifier_epochs: int = 2
    classifier_limit: int | None = 20000
    k: int = 512
    nll_items: int = 2000  # test code grids in the likelihood split
    seed: int = 0


FULL = BenchBudget()
QUICK = BenchBudget(size="tiny", refiner_size="tiny", steps=300, checkpoints=2, batch_size=32, warmup_steps=20,
                    curve_per_class=20, per_class=20, effnet_per_class=0, sweep_per_class=10,
                    sweep_cfg=(1.0, 2.0, 3.0), sweep_t1=(1.0, 1.1), sweep_t2=(1.1,), speed_images_b1=4,
                    speed_repeats=1, tokenizer_steps=200, classifier_epochs=1, classifier_limit=10000)

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- artifacts: one tokenizer, one hierarchy, one classifier ------------------------------------------

@dataclass
class Artifacts:
    tokenizer: str
    codes_train: str
    codes_test: str
    hierarchy: str
    classifier: str


def _reuse_or_build(name: str, run: Path | None, out: Path, kind: str, build: Callable[[Path], None]) -> str:
    """RUN/name when it is complete, else OUT/name built by `build` (and reused on a second call)."""
    for folder in ([run / name] if run else []) + [out / name]:
        if is_finished(folder, kind):
            return str(folder)
    log(f"building {out / name}")
    build(out / name)
    return str(out / name)


def prepare_artifacts(run: str | Path | None, out: Path, budget: BenchBudget, data_dir: str | None,
                      data: str = "fashion-mnist") -> Artifacts:
    from .hierarchy import build_hierarchy, save_hierarchy
    from .metrics.classifier import train_classifier
    from .tokenizer.extract import extract_codes
    from .tokenizer.train import TokenizerTrainConfig, train_tokenizer

    run_dir = Path(run) if run else None

    def tokenizer(folder: Path) -> None:
        train_tokenizer(TokenizerTrainConfig(out=str(folder), data=data, data_dir=data_dir, steps=budget.tokenizer_steps,
                                             report_limit=1000), resume=True, progress=False)

    tok_dir = _reuse_or_build("tokenizer", run_dir, out, TOKENIZER_KIND, tokenizer)

    def codes(split: str) -> Callable[[Path], None]:
        def build(folder: Path) -> None:
            tok = load_tokenizer(tok_dir)
            ds = build_dataset(data, split, tok.config.image_size, tok.config.in_channels, data_dir=data_dir)
            extract_codes(tok, ds, folder, dataset_name=data, split=split, progress=False)
        return build

    def hierarchy(folder: Path) -> None:
        tok = load_tokenizer(tok_dir)
        h = build_hierarchy(tok, "kmeans", min(budget.k, tok.config.codebook_size // 4))
        open_output(folder, HIERARCHY_KIND).write(lambda path: save_hierarchy(h, path))

    def classifier(folder: Path) -> None:
        train_classifier(out=str(folder), data=data, epochs=budget.classifier_epochs, limit=budget.classifier_limit,
                         data_dir=data_dir, device="cpu")

    return Artifacts(tok_dir, _reuse_or_build("codes-train", run_dir, out, CODES_KIND, codes("train")),
                     _reuse_or_build("codes-test", run_dir, out, CODES_KIND, codes("test")),
                     _reuse_or_build("hierarchy", run_dir, out, HIERARCHY_KIND, hierarchy),
                     _reuse_or_build("classifier", run_dir, out, CLASSIFIER_KIND, classifier))


# --- training in segments, with its compute -------------------------------------------------------------

@dataclass
class Compute:
    steps: int = 0
    cpu_s: float = 0.0  # time.process_time of the training calls (all threads of this process)
    wall_s: float = 0.0
    parameters: int = 0  # all parameters
    matmul_parameters: int = 0  # without the input embeddings (a table look-up costs no FLOPs); the head counts
    tokens: int = 0  # training tokens seen: steps x batch x sequence length

    @property
    def flops(self) -> float:
        """The usual 6 x parameters x tokens estimate (forward + backward; attention scores left out)."""
        return 6.0 * self.matmul_parameters * self.tokens


def matmul_parameters(model: torch.nn.Module) -> int:
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - embeddings


def train_to(role: str, folder: Path, steps: int, art: Artifacts, budget: BenchBudget, compute: Compute,
             size: str | None = None, init: str | None = None) -> None:
    """Train (or resume) one model up to `steps`, adding the cost of this segment to `compute`."""
    from .training import TrainConfig, train

    cfg = TrainConfig(role=role, size=size or budget.size, codes=art.codes_train, out=str(folder), init=init,
                      hierarchy=None if role == "baseline" else art.hierarchy, steps=steps, batch_size=budget.batch_size,
                      lr=budget.lr, warmup_steps=budget.warmup_steps, lr_decay="none", seed=budget.seed, device="cpu",
                      save_every=max(steps, 1), log_every=max(1, min(25, steps)))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    info = train(cfg, resume=True, progress=False)
    if info.get("interrupted"):
        raise KeyboardInterrupt
    compute.cpu_s += time.process_time() - cpu0
    compute.wall_s += time.perf_counter() - wall0
    done = steps - compute.steps
    compute.steps, compute.parameters = steps, info["parameters"]
    compute.matmul_parameters = matmul_parameters(load_model(folder))
    grid = info["grid"]
    compute.tokens += done * budget.batch_size * grid[0] * grid[1]


def copy_model(src: Path, dst: Path) -> None:
    """Keep the weights of a model at this step (its run goes on training)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, "model.safetensors", "train_info.json"):
        shutil.copy2(src / name, dst / name)


def slim_init(refiner_dir: Path, folder: Path, seed: int) -> str:
    """Fresh weights for a refiner of half the depth of the trained one (same width, head, grid)."""
    config = load_model(refiner_dir).config
    torch.manual_seed(seed)
    save_model(build_model(replace(config, n_layer=max(1, config.n_layer // 2))), folder)
    return str(folder)


# --- sampling and scoring -----------------------------------------------------------------------------

class Sides:
    """Loads the pipelines of the bench's model folders around one tokenizer and hierarchy."""

    def __init__(self, art: Artifacts):
        self.tokenizer = load_tokenizer(art.tokenizer)
        self.hierarchy = load_hierarchy(art.hierarchy, tokenizer=self.tokenizer)

    def ctf(self, coarse: Path, refiner: Path) -> CTFPipeline:
        return CTFPipeline(self.tokenizer, self.hierarchy, load_model(coarse), load_model(refiner))

    def baseline(self, folder: Path) -> BaselinePipeline:
        return BaselinePipeline(self.tokenizer, load_model(folder))


def domain_score(pipe: CTFPipeline | BaselinePipeline, per_class: int, art: Artifacts, ref: Reference,
                 seed: int, **settings: Any) -> tuple[dict[str, Any], ImageSet]:
    images = sample_with(pipe, per_class, seed, **settings)
    return score(images.images, images.labels, get_extractor("domain", path=art.classifier), ref), images


def brief(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("fid", "is_mean", "is_std", "precision", "recall", "class_consistency", "n")
    return {k: m[k] for k in keys if k in m}


# --- sampling speed -------------------------------------------------------------------------------------

def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def stage(settings: dict[str, Any], n: int) -> StageSettings:
    """Stage n's settings out of the pipeline's flat keyword names (cfg1, t1, top_k1, top_p1, ...)."""
    return StageSettings(settings[f"cfg{n}"], settings[f"t{n}"], settings[f"top_k{n}"], settings[f"top_p{n}"])


def time_ctf(pipe: CTFPipeline, labels: torch.Tensor, settings: dict[str, Any], seed: int) -> dict[str, float]:
    """Seconds in stage 1, stage 2 and the decoder for one batch."""
    gen = make_generator(seed)
    s1, s2 = stage(settings, 1), stage(settings, 2)
    coarse, t1 = _timed(lambda: sample_causal(pipe.coarse, labels, s1, gen))
    fine, t2 = _timed(lambda: refine(pipe.refiner, coarse, labels, s2, gen, pipe.hierarchy.member_mask))
    _, td = _timed(lambda: pipe.decode(pipe._grid(fine)))
    return {"stage1_s": t1, "stage2_s": t2, "decode_s": td}


def time_baseline(pipe: BaselinePipeline, labels: torch.Tensor, settings: dict[str, Any], seed: int) -> dict[str, float]:
    gen = make_generator(seed)
    s1 = stage(settings, 1)
    fine, t1 = _timed(lambda: sample_causal(pipe.model, labels, s1, gen))
    _, td = _timed(lambda: pipe.decode(pipe._grid(fine)))
    return {"stage1_s": t1, "stage2_s": 0.0, "decode_s": td}


def measure_speed(pipes: dict[str, CTFPipeline | BaselinePipeline], batch: int, images: int, repeats: int,
                  settings: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Images/s of each pipeline, interleaved (so load changes hit all alike); median over repeats."""
    labels = torch.arange(batch) % next(iter(pipes.values())).num_classes
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
    for name, pipe in pipes.items():  # warm-up
        (time_ctf if isinstance(pipe, CTFPipeline) else time_baseline)(pipe, labels[:1], settings, 0)
    for r in range(repeats):
        for name, pipe in pipes.items():
            timer = time_ctf if isinstance(pipe, CTFPipeline) else time_baseline
            parts = [timer(pipe, labels, settings, r * 1000 + i) for i in range(max(1, images // batch))]
            runs[name].append({k: sum(p[k] for p in parts) for k in parts[0]})
    result = {}
    for name, rs in runs.items():
        rs.sort(key=lambda p: sum(p.values()))
        mid = rs[len(rs) // 2]
        total = sum(mid.values())
        n = max(1, images // batch) * batch
        result[name] = {"images_per_s": n / total, **{k: v / n for k, v in mid.items()},
                        "stage2_share": mid["stage2_s"] / total, "stage1_share": mid["stage1_s"] / total}
    return result


# --- the sweep ----------------------------------------------------------------------------------------

def sweep_points(budget: BenchBudget, ctf: bool) -> list[dict[str, float]]:
    """Every combination of CFG and t1 (and t2 for CTF): each side is compared at its own best point, and
    the points trace its fidelity/diversity trade-off."""
    t2s = budget.sweep_t2 if ctf else (None,)
    return [{"cfg1": c, "t1": t1, **({"t2": t2} if t2 is not None else {})}
            for c in budget.sweep_cfg for t1 in budget.sweep_t1 for t2 in t2s]


def run_sweep(pipe: CTFPipeline | BaselinePipeline, budget: BenchBudget, art: Artifacts, ref: Reference) -> dict[str, Any]:
    rows = []
    for point in sweep_points(budget, isinstance(pipe, CTFPipeline)):
        m, _ = domain_score(pipe, budget.sweep_per_class, art, ref, budget.seed, **point)
        rows.append({"settings": point, **brief(m)})
    best = min(rows, key=lambda r: r["fid"])
    return {"rows": rows, "best": best}


def trade_off(sweep: dict[str, dict[str, Any]], x: str, y: str) -> dict[str, tuple[list[float], list[float]]]:
    """Each side's points as (xs, ys), ordered by x, for a trade-off plot (FID against recall, IS against FID)."""
    out = {}
    for name, sw in sweep.items():
        pts = sorted((r[x], r[y]) for r in sw["rows"] if r.get(x) is not None and r.get(y) is not None)
        out[name] = ([a for a, _ in pts], [b for _, b in pts])
    return out


# --- plots and report -------------------------------------------------------------------------------------

def plot_curves(curves: dict[str, list[dict[str, Any]]], key: str, ylabel: str, path: Path) -> None:
    xs_ys = {name: ([p["step"] for p in pts], [p[key] for p in pts]) for name, pts in curves.items() if pts}
    plot_lines(xs_ys, "training step", ylabel, path)


def plot_lines(xs_ys: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_with_pil(xs_ys, xlabel, ylabel, path)
        return
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, (xs, ys) in xs_ys.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_with_pil(xs_ys: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, path: Path) -> None:
    """A plain line plot for machines without matplotlib."""
    w, h, m = 520, 360, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    xs = [x for a, _ in xs_ys.values() for x in a] or [0, 1]
    ys = [y for _, b in xs_ys.values() for y in b] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    sx = lambda x: m + (x - x0) / max(x1 - x0, 1e-9) * (w - 2 * m)  # noqa: E731
    sy = lambda y: h - m - (y - y0) / max(y1 - y0, 1e-9) * (h - 2 * m)  # noqa: E731
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, 10), f"{ylabel} ({y0:.3g} .. {y1:.3g}) against {xlabel} ({x0:.3g} .. {x1:.3g})", fill="black")
    colors = ["blue", "red", "green", "orange"]
    for i, (name, (a, b)) in enumerate(xs_ys.items()):
        pts = [(sx(x), sy(y)) for x, y in zip(a, b)]
        if len(pts) > 1:
            d.line(pts, fill=colors[i % 4], width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colors[i % 4])
        d.text((w - m - 150, m + 5 + 12 * i), name, fill=colors[i % 4])
    im.save(path)


def side_by_side(sets: dict[str, ImageSet], per_row: int, path: Path) -> None:
    """One grid per side (one row per class), titled, next to each other."""
    grids = []
    for name, s in sets.items():
        keep = torch.cat([torch.nonzero(s.labels == c).view(-1)[:per_row] for c in s.labels.unique()])
        grid = image_grid(s.images[keep], nrow=per_row).convert("RGB")
        titled = Image.new("RGB", (grid.width, grid.height + 14), "white")
        titled.paste(grid, (0, 14))
        ImageDraw.Draw(titled).text((2, 1), name, fill="black")
        grids.append(titled)
    canvas = Image.new("RGB", (sum(g.width for g in grids) + 8 * (len(grids) - 1), max(g.height for g in grids)), "white")
    x = 0
    for g in grids:
        canvas.paste(g, (x, 0))
        x += g.width + 8
    canvas.save(path)


def machine() -> str:
    cpu = " ".join(filter(None, (platform.machine(), platform.processor())))
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_report(result: dict[str, Any], out: Path) -> Path:
    r, fid, is_ = result, result["labels"]["fid"], result["labels"]["is"]
    lines = [f"# CTF against the baseline on {r.get('data', 'fashion-mnist')} ({r['mode']})", "",
             f"- command: `{r['command']}`", f"- machine: {r['machine']}", f"- date: {r['date']}",
             f"- wall time: {r['wall_s'] / 60:.1f} min", f"- artifacts: {json.dumps(r['artifacts'])}",
             f"- budget: {json.dumps(r['budget'])}", f"- sampling: {json.dumps(r['settings'])}; seed {r['budget']['seed']}, same seeds for every side",
             "", "## Training compute", "",
             "| side | models | steps | batch | parameters (without input embeddings) | CPU-s | wall-s | est. FLOPs (6 N D) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in r["compute"].items():
        lines.append(f"| {name} | {c['models']} | {c['steps']} | {r['budget']['batch_size']} | {c['parameters']:,} ({c['matmul_parameters']:,}) | "
                     f"{c['cpu_s']:.0f} | {c['wall_s']:.0f} | {c['flops']:.3g} |")
    lines += ["", f"CTF / baseline FLOPs at equal steps: {r['flop_ratio']:.2f} (6 x parameters without the input "
              f"embeddings x tokens); the compute-matched baseline is the baseline run at step {r['matched_steps']}.", "", f"## {fid} and {is_} against training step", "",
              f"{r['budget']['curve_per_class']} samples per class at each checkpoint. Plots: `fid_vs_step.png`, `is_vs_step.png`.",
              "", f"| side | step | {fid} | {is_} | precision | recall | class consistency |", "|---|---|---|---|---|---|---|"]
    for name, pts in r["curves"].items():
        for p in pts:
            lines.append(f"| {name} | {p['step']} | {_f(p['fid'])} | {_f(p.get('is_mean'))} | {_f(p['precision'], 3)} | "
                         f"{_f(p['recall'], 3)} | {_f(100 * p['class_consistency'], 1)}% |")
    lines += ["", "## Final class-balanced set", "",
              f"{r['budget']['per_class']} samples per class (effnet-lite0: {r['budget']['effnet_per_class']} per class), "
              "same seeds for every side. Grids: `samples.png`.", "",
              "| side | extractor | n | FID (labelled) | IS (labelled) | precision | recall | class consistency |",
              "|---|---|---|---|---|---|---|---|"]
    for name, by_ext in r["final"].items():
        for ext, m in by_ext.items():
            cc = f"{100 * m['class_consistency']:.1f}%" if "class_consistency" in m else "-"
            lines.append(f"| {name} | {ext} | {m['n']} | {m['fid_label']} {m['fid']:.2f} | "
                         f"{m.get('is_label', 'IS')} {_f(m.get('is_mean'))} | {m['precision']:.3f} | {m['recall']:.3f} | {cc} |")
    lines += ["", "## Floors (real test images, class-balanced, as many as a final set)", "",
              "What a perfect generator on these tokens would score (reconstruction), what a perfect stage 1 would "
              "give with this refiner (true coarse + refiner) and with no stage-2 model at all (true coarse + a "
              "uniformly random member of each cluster).", "",
              f"| floor | n | {fid} | {is_} | precision | recall | class consistency |", "|---|---|---|---|---|---|---|"]
    for name, m in r["floors"].items():
        lines.append(f"| {name} | {m['n']} | {_f(m['fid'])} | {_f(m.get('is_mean'))} | {_f(m['precision'], 3)} | "
                     f"{_f(m['recall'], 3)} | {_f(100 * m['class_consistency'], 1)}% |")
    lines += ["", f"## Likelihood split (nats per token, {next(iter(r['nll'].values()))['items']} test code grids)", "",
              "CTF: coarse model loss + masked refiner loss given the true coarse grid (its exact NLL). Baseline: "
              "-log of its mass on the true cluster + the rest.", "",
              "| side | coarse | within cluster | NLL |", "|---|---|---|---|"]
    for name, v in r["nll"].items():
        lines.append(f"| {name} | {v['coarse']:.3f} | {v['within']:.3f} | {v['nll']:.3f} |")
    lines += ["", "## Sampling speed (token sampling + decoder, CFG on, one run, interleaved)", "",
              "| batch | pipeline | images/s | stage 1 ms/img | stage 2 ms/img | decoder ms/img | stage-2 share | vs baseline |",
              "|---|---|---|---|---|---|---|---|"]
    for batch, by_pipe in r["speed"].items():
        base = by_pipe["baseline"]["images_per_s"]
        for name, s in by_pipe.items():
            lines.append(f"| {batch} | {name} | {s['images_per_s']:.1f} | {1000 * s['stage1_s']:.2f} | {1000 * s['stage2_s']:.2f} | "
                         f"{1000 * s['decode_s']:.2f} | {100 * s['stage2_share']:.0f}% | {s['images_per_s'] / base:.2f}x |")
    lines += ["", "## CTF variants (final step, final set size)", "",
              f"| variant | refiner parameters | {fid} | {is_} | class consistency | images/s (batch {r['budget']['speed_big_batch']}) |",
              "|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['refiner_parameters']:,} | {v['fid']:.2f} | {_f(v.get('is_mean'))} | "
                     f"{100 * v['class_consistency']:.1f}% | {v['images_per_s']:.1f} |")
    lines += ["", f"## Operating points (every CFG x t1, x t2 for CTF; {r['budget']['sweep_per_class']} per class, one "
              "sampling seed): each side at its own best FID", "",
              "Trade-off plots: `fid_vs_recall.png`, `is_vs_fid.png`. A side that wins only by more guidance does not win.", "",
              f"| side | best settings | {fid} | {is_} there | all points ({fid}) |", "|---|---|---|---|---|"]
    for name, sw in r["sweep"].items():
        pts = ", ".join(f"{json.dumps(p['settings'])}: {p['fid']:.1f}" for p in sw["rows"])
        lines.append(f"| {name} | {json.dumps(sw['best']['settings'])} | {sw['best']['fid']:.2f} | "
                     f"{_f(sw['best'].get('is_mean'))} | {pts} |")
    lines += ["", "## Verdict", "", r["verdict"], ""]
    path = out / "BENCHMARKS.md"
    path.write_text("\n".join(lines))
    return path


def verdict(final: dict[str, dict[str, Any]], sweep: dict[str, dict[str, Any]]) -> str:
    d = {name: by_ext["domain"] for name, by_ext in final.items()}
    ctf, base, matched = d["ctf"], d["baseline"], d["baseline (CTF's compute)"]
    label = ctf["fid_label"]
    parts = []
    for name, other in (("the baseline's at equal steps", base), ("the baseline's at CTF's compute", matched)):
        word = "lower" if ctf["fid"] < other["fid"] else "higher"
        parts.append(f"CTF's FID is {word} than {name}: {label} {ctf['fid']:.2f} vs {other['fid']:.2f}, "
                     f"IS {_f(ctf.get('is_mean'))} vs {_f(other.get('is_mean'))}, class consistency "
                     f"{100 * ctf['class_consistency']:.1f}% vs {100 * other['class_consistency']:.1f}%.")
    best = {name: sw["best"] for name, sw in sweep.items()}
    parts.append("At each side's own best operating point: " + ", ".join(
        f"{name} {label} {b['fid']:.2f} ({json.dumps(b['settings'])})" for name, b in best.items()) + ".")
    parts.append(f"Scored on one seed of {ctf['n']} samples; at 1000 samples, seeds alone moved FID by up to 0.9 "
                 "(docs/bench.md), so read small gaps as ties (benchmarks/ablate_ctf.py scores several seeds).")
    return " ".join(parts)


# --- the whole bench ----------------------------------------------------------------------------------

def run_bench(out: str | Path, budget: BenchBudget = QUICK, run: str | Path | None = None, data_dir: str | None = None,
              cache_dir: str | None = None, mode: str = "custom", command: str | None = None, force: bool = False,
              resume: bool = False, data: str = "fashion-mnist") -> dict[str, Any]:
    """The whole bench on `data` ('fashion-mnist', an .npz or an image folder) into folder `out`: a finished
    one is replaced only with `force`, an interrupted one continues (reusing the models it trained) only with
    `resume` (see ctfgen.outputs)."""
    start = time.perf_counter()
    check_data(data, data_dir)
    output = plan_output(out, BENCH_KIND, force=force, resume=resume, resumable=True).open()
    out = output.path
    art = prepare_artifacts(run, out, budget, data_dir, data)
    ref = Reference(data, "test", None, data_dir, cache_dir)
    settings = dict(DEFAULTS)
    compute = {"coarse": Compute(), "refiner": Compute(), "baseline": Compute()}
    curves: dict[str, list[dict[str, Any]]] = {"ctf": [], "baseline": []}
    sides = Sides(art)
    checkpoints = sorted({max(1, round(budget.steps * i / budget.checkpoints)) for i in range(1, budget.checkpoints + 1)})

    def score_point(name: str, pipe: CTFPipeline | BaselinePipeline, step: int) -> None:
        m, _ = domain_score(pipe, budget.curve_per_class, art, ref, budget.seed)
        curves[name].append({"step": step, **brief(m)})
        log(f"{name} step {step}: {m['fid_label']} {m['fid']:.2f}, IS {_f(m.get('is_mean'))}")

    for step in checkpoints:
        for role in ("coarse", "refiner"):
            log(f"training {role} to step {step}")
            train_to(role, out / role, step, art, budget, compute[role],
                     size=budget.refiner_size if role == "refiner" else budget.size)
        score_point("ctf", sides.ctf(out / "coarse", out / "refiner"), step)

    # The baseline's first segment gives its size, hence the FLOP ratio and the compute-matched step
    # count; that baseline is the same run continued (constant lr makes resume-extending exact).
    flop_ratio, matched_steps, snapshots = 0.0, budget.steps, {}
    schedule = list(checkpoints)
    while schedule:
        step = schedule.pop(0)
        log(f"training baseline to step {step}")
        train_to("baseline", out / "baseline", step, art, budget, compute["baseline"])
        if not flop_ratio:
            flop_ratio = (compute["coarse"].flops + compute["refiner"].flops) / compute["baseline"].flops * step / budget.steps
            matched_steps = max(step, round(budget.steps * flop_ratio))  # no earlier than the first checkpoint
            schedule = sorted(set(schedule) | {matched_steps} - {step})
        snapshots[step] = replace(compute["baseline"])
        copy_model(out / "baseline", out / f"baseline-step{step}")
        score_point("baseline", sides.baseline(out / f"baseline-step{step}"), step)
    equal_steps_dir, matched_dir = out / f"baseline-step{budget.steps}", out / f"baseline-step{matched_steps}"
    matched = snapshots[matched_steps]

    pipes: dict[str, CTFPipeline | BaselinePipeline] = {
        "ctf": sides.ctf(out / "coarse", out / "refiner"), "baseline": sides.baseline(equal_steps_dir),
        "baseline (CTF's compute)": sides.baseline(matched_dir)}
    final, sets = final_scores(pipes, budget, art, ref)
    side_by_side(sets, min(8, budget.per_class), out / "samples.png")

    log("likelihood split and floors")
    test_codes = CodeDataset(art.codes_test)
    nll = nll_split(test_codes, sides.hierarchy, coarse=pipes["ctf"].coarse, refiner=pipes["ctf"].refiner,
                    limit=budget.nll_items)
    for name in ("baseline", "baseline (CTF's compute)"):
        nll[name] = nll_split(test_codes, sides.hierarchy, baseline=pipes[name].model, limit=budget.nll_items)["baseline"]
    floors = score_floors(sides, pipes["ctf"].refiner, budget, art, ref, data_dir)

    log("sampling speed")
    speed = {str(b): measure_speed({"ctf": pipes["ctf"], "baseline": pipes["baseline"]}, b,
                                   budget.speed_images_b1 if b == 1 else b, budget.speed_repeats, settings)
             for b in (1, budget.speed_big_batch)}

    log("slim refiner and CFG at both stages")
    slim = Compute()
    slim_dir = out / "refiner-slim"
    init = slim_init(out / "refiner", out / "refiner-slim-init", budget.seed)
    train_to("refiner", slim_dir, budget.steps, art, budget, slim, init=init)
    variants = measure_variants(sides, out, slim_dir, budget, art, ref, settings)

    log("sweep")
    sweep = {name: run_sweep(pipe, budget, art, ref) for name, pipe in pipes.items()}

    compute_out = {
        "ctf": _compute_row(compute["coarse"], compute["refiner"], "coarse + refiner"),
        "baseline": _compute_row(snapshots[budget.steps], None, "baseline AR"),
        "baseline (CTF's compute)": _compute_row(matched, None, "baseline AR, same run"),
        "slim refiner (extra)": _compute_row(slim, None, "refiner, half depth")}
    result = {
        "mode": mode, "data": data, "command": command or " ".join(sys.argv), "machine": machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "budget": asdict(budget), "settings": settings,
        "artifacts": asdict(art), "labels": {"fid": "FID (domain features)", "is": "IS (domain features)"},
        "compute": compute_out, "flop_ratio": flop_ratio, "matched_steps": matched_steps, "curves": curves,
        "final": final, "nll": nll, "floors": floors, "speed": speed, "variants": variants, "sweep": sweep, "verdict": verdict(final, sweep),
        "wall_s": time.perf_counter() - start}
    plot_curves(curves, "fid", "FID (domain features)", out / "fid_vs_step.png")
    plot_curves(curves, "is_mean", "IS (domain features)", out / "is_vs_step.png")
    plot_lines(trade_off(sweep, "recall", "fid"), "recall (domain features)", "FID (domain features)", out / "fid_vs_recall.png")
    plot_lines(trade_off(sweep, "fid", "is_mean"), "FID (domain features)", "IS (domain features)", out / "is_vs_fid.png")
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    write_report(result, out)
    output.finish()
    log(f"done in {result['wall_s'] / 60:.1f} min: {output.final / 'BENCHMARKS.md'}")
    return result


def _compute_row(a: Compute, b: Compute | None, models: str) -> dict[str, Any]:
    parts = [a] + ([b] if b else [])
    return {"models": models, "steps": a.steps, "parameters": sum(c.parameters for c in parts),
            "matmul_parameters": sum(c.matmul_parameters for c in parts),
            "cpu_s": sum(c.cpu_s for c in parts), "wall_s": sum(c.wall_s for c in parts),
            "tokens": sum(c.tokens for c in parts), "flops": sum(c.flops for c in parts)}


def score_floors(sides: Sides, refiner: torch.nn.Module, budget: BenchBudget, art: Artifacts, ref: Reference,
                 data_dir: str | None) -> dict[str, dict[str, Any]]:
    """The floors (ctfgen.experiments.floors) on a class-balanced set of test images as large as the final sets."""
    ds = build_dataset(ref.dataset, ref.split, sides.tokenizer.config.image_size, sides.tokenizer.config.in_channels,
                       data_dir=data_dir)
    labels = dataset_labels(ds)
    n = min(len(ds), budget.per_class * len(set(labels.tolist())))
    ds = Subset(ds, balanced_subset(labels, n, budget.seed))
    images = take_images(ds)
    sets = floor_sets(sides.tokenizer, sides.hierarchy, images, torch.from_numpy(ds.labels), refiner=refiner,
                      settings=StageSettings(temperature=DEFAULTS["t2"]), seed=budget.seed)
    extractor = get_extractor("domain", path=art.classifier)
    return {name: brief(score(x, torch.from_numpy(ds.labels), extractor, ref)) for name, x in sets.items()}


def final_scores(pipes: dict[str, CTFPipeline | BaselinePipeline], budget: BenchBudget, art: Artifacts,
                 ref: Reference) -> tuple[dict[str, dict[str, Any]], dict[str, ImageSet]]:
    """The same class-balanced, seeded set for every side; domain always, effnet-lite0 when budgeted."""
    final: dict[str, dict[str, Any]] = {}
    sets: dict[str, ImageSet] = {}
    for name, pipe in pipes.items():
        log(f"final set: {name}")
        m, sets[name] = domain_score(pipe, budget.per_class, art, ref, budget.seed)
        final[name] = {"domain": m}
        if budget.effnet_per_class > 0:
            small = sample_with(pipe, budget.effnet_per_class, budget.seed)
            final[name]["effnet-lite0"] = score(small.images, small.labels, get_extractor("effnet-lite0"),
                                                replace(ref, n=budget.effnet_ref_images))
    return final, sets


def measure_variants(sides: Sides, out: Path, slim_dir: Path, budget: BenchBudget, art: Artifacts, ref: Reference,
                     settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Quality and speed of the default CTF, a half-depth refiner, and CFG at both stages."""
    full, slim = sides.ctf(out / "coarse", out / "refiner"), sides.ctf(out / "coarse", slim_dir)
    cases = {"CFG at stage 1 only (default)": (full, settings),
             "CFG at both stages": (full, {**settings, "cfg2": settings["cfg1"]}),
             "half-depth refiner": (slim, settings)}
    variants = {}
    for name, (pipe, s) in cases.items():
        m, _ = domain_score(pipe, budget.per_class, art, ref, budget.seed, **s)
        speed = measure_speed({"ctf": pipe}, budget.speed_big_batch, budget.speed_big_batch, budget.speed_repeats, s)["ctf"]
        variants[name] = {**brief(m), "images_per_s": speed["images_per_s"], "stage2_share": speed["stage2_share"],
                          "refiner_parameters": sum(p.numel() for p in pipe.refiner.parameters())}
    return variants


# --- the `ctfgen bench` command ------------------------------------------------------------------------

def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="the 10-minute budget (tiny models, 300 steps, domain features)")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench or runs/bench-quick)")
    p.add_argument("--run", default=None, help="reuse RUN/{tokenizer,codes-train,codes-test,hierarchy,classifier} when present")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist', an .npz or an image folder with one "
                   "sub-folder per class (a set without a test split gets a seeded, class-balanced 10%% hold-out)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: the Debian package's)")
    p.add_argument("--cache-dir", default=None, help="reference-statistics cache")
    p.add_argument("--steps", type=arg_type(Count), default=None, help="override the budget's training steps")
    p.add_argument("--size", default=None, choices=sorted(MODEL_SIZES), help="override the stage-1 (and refiner) size")
    add_output_flags(p, resumable=True)


def cmd_bench(args: argparse.Namespace) -> None:
    if args.run and not Path(args.run).is_dir():  # a mistyped --run would silently mean "build everything"
        raise CtfgenError(f"--run {args.run} is not a folder")
    budget = QUICK if args.quick else FULL
    if args.steps is not None:
        budget = replace(budget, steps=args.steps)
    if args.size is not None:
        budget = replace(budget, size=args.size, refiner_size=args.size)
    out = args.out or ("runs/bench-quick" if args.quick else "runs/bench")
    result = run_bench(out, budget, args.run, args.data_dir, args.cache_dir, mode="quick" if args.quick else "full",
                       force=args.force, resume=args.resume, data=args.data)
    print(result["verdict"])
    print(f"report -> {Path(out) / 'BENCHMARKS.md'}")


__all__ = ["FULL", "QUICK", "Artifacts", "BenchBudget", "Compute", "add_bench_args", "cmd_bench", "measure_speed",
           "prepare_artifacts", "run_bench", "write_report"]
