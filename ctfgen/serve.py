"""`ctfgen serve RUN`: a web page where a visitor samples a run's models and sees the coarse stage at work.

`Showroom.generate` does everything and is a plain function (the tests call it directly): CTF and the
baseline side by side with the time each took; for CTF, each sample's coarse-label map in colour (one
colour per cluster), what a uniformly random member of each cluster decodes to (what stage 2 adds is
the difference), and an animation of stage 1 filling the grid in raster order, then the refiner's pass.
A run without a refiner shows the coarse stage and the uniform pick; one without a baseline, CTF alone.

The page (`build_app`) is a thin Gradio layer over it. Requests wait in Gradio's queue and run one at
a time (the models' KV caches are shared), so concurrent visitors all get their images; a bad setting
becomes a message in the page. Gradio is an optional extra: `pip install -e ".[demo]"`.
"""

from __future__ import annotations

import argparse
import colorsys
import logging
import math
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .arguments import Between, Count, arg_type, check_typed, checked
from .artifacts import CONFIG_NAME, read_json
from .errors import CtfgenError
from .hierarchy import load_hierarchy
from .pipeline import (DEFAULTS, SETTING_TYPES, TRAIN_INFO_NAME, BaselinePipeline, CTFPipeline, check_trained_on,
                       make_generator, pil_images)
from .runtime import pick_device
from .tokenizer.model import load_tokenizer
from .transformer.model import load_model

log = logging.getLogger(__name__)

DISPLAY_PX = 192  # images are enlarged (nearest neighbour) to about this many pixels a side
MAX_SEED = 2**63 - 1
GIF_RING = 64  # animation files kept on disk
STAGE2_SWITCHES = {"refiner_mask": True, "refine_steps": 1}  # stage-2 settings besides DEFAULTS, and their defaults


@dataclass
class Generation:
    """What one press of the button shows. Lists are empty for the parts the run lacks."""
    ctf: list[Image.Image] = field(default_factory=list)  # refined CTF samples
    coarse_maps: list[Image.Image] = field(default_factory=list)  # their coarse labels, one colour per cluster
    uniform: list[Image.Image] = field(default_factory=list)  # the same coarse grids, a random member per cluster
    baseline: list[Image.Image] = field(default_factory=list)
    animation: Path | None = None  # GIF of the first CTF sample: stage 1 in raster order, then stage 2
    seconds: dict[str, float] = field(default_factory=dict)  # sampling wall time per side
    message: str = ""


def cluster_palette(k: int) -> np.ndarray:
    """uint8 [K, 3]: a fixed colour per cluster; hues step by the golden ratio so neighbouring ids differ."""
    colours = [colorsys.hsv_to_rgb((i * 0.6180339887) % 1.0, 0.45 + 0.55 * ((i * 7) % 3) / 2, 0.7 + 0.3 * (i % 2))
               for i in range(k)]
    return (np.array(colours) * 255).round().astype(np.uint8)


def enlarge(image: Image.Image, side: int = DISPLAY_PX) -> Image.Image:
    """Nearest-neighbour upscaling by a whole factor, so small images stay crisp instead of blurred."""
    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def class_names(run: Path, num_classes: int) -> list[str]:
    """The dataset's class names, from the codes the run's models were trained on, else the class ids."""
    places = [Path(read_json(run / m / TRAIN_INFO_NAME).get("codes", "")) / "meta.json"
              for m in ("coarse", "baseline") if (run / m / TRAIN_INFO_NAME).is_file()]
    for meta in places + [run / "codes-train" / "meta.json"]:
        names = read_json(meta).get("classes") if meta.is_file() else None
        if names and len(names) == num_classes:
            return [str(n) for n in names]
    return [f"class {i}" for i in range(num_classes)]


def as_whole(name: str, value: Any) -> int:
    """An integer setting that came through a web form (Gradio numbers may arrive as floats)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CtfgenError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise CtfgenError(f"{name} must be a whole number, got {value!r}")
    return int(number)


class Showroom:
    """The models of one run folder, loaded once, and the one function the page calls."""

    def __init__(self, run: str | Path, device: str | torch.device = "cpu", max_images: int = 16) -> None:
        run = Path(run)
        if not (run / "tokenizer" / CONFIG_NAME).is_file():
            raise CtfgenError(f"{run} has no tokenizer/ folder; is it a ctfgen run folder?")
        self.device, self.max_images = torch.device(device), max_images
        tokenizer = load_tokenizer(run / "tokenizer", self.device)
        self.ctf: CTFPipeline | None = None
        self.baseline: BaselinePipeline | None = None
        if (run / "coarse").is_dir() and (run / "hierarchy").is_dir():
            hierarchy = load_hierarchy(run / "hierarchy", tokenizer=tokenizer)
            parts = [name for name in ("coarse", "refiner") if (run / name).is_dir()]
            models = {name: load_model(run / name, self.device) for name in parts}
            infos = {name: check_trained_on(run / name, hierarchy, models["coarse"]) for name in parts}
            self.ctf = CTFPipeline(tokenizer, hierarchy, models["coarse"], models.get("refiner"),
                                   bool(infos.get("refiner", {}).get("refiner_mask")))
        if (run / "baseline").is_dir():
            self.baseline = BaselinePipeline(tokenizer, load_model(run / "baseline", self.device))
        if self.ctf is None and self.baseline is None:
            raise CtfgenError(f"{run} has neither coarse/ with hierarchy/ nor baseline/: nothing to sample")
        counts = {p.num_classes for p in (self.ctf, self.baseline) if p is not None}
        if len(counts) > 1:
            raise CtfgenError(f"{run}: the CTF models and the baseline know different numbers of classes {sorted(counts)}")
        self.num_classes = counts.pop()
        self.class_names = class_names(run, self.num_classes)
        self.has_refiner = self.ctf is not None and self.ctf.refiner is not None
        self._lock = threading.Lock()  # one generation at a time: the models' KV caches are shared
        self._gif_folder: Path | None = None
        self._gifs_made = 0

    def check(self, label: Any, seed: Any, count: Any, settings: dict[str, Any]) -> tuple[int, int, int]:
        """CtfgenError naming the first bad setting (the models check what depends on them when sampling)."""
        label, seed, count = as_whole("class", label), as_whole("seed", seed), as_whole("images", count)
        if not 0 <= label < self.num_classes:
            raise CtfgenError(f"class must be in 0..{self.num_classes - 1}, got {label}")
        if not 0 <= seed <= MAX_SEED:
            raise CtfgenError(f"seed must be in 0..{MAX_SEED}, got {seed}")
        if not 1 <= count <= self.max_images:
            raise CtfgenError(f"images must be in 1..{self.max_images}, got {count}")
        unknown = set(settings) - set(DEFAULTS) - set(STAGE2_SWITCHES)
        if unknown:
            raise CtfgenError(f"unknown settings {sorted(unknown)}")
        for name, value in settings.items():
            if name in SETTING_TYPES:
                check_typed(name, value, SETTING_TYPES[name])
        if "refine_steps" in settings:
            check_typed("refine_steps", as_whole("refine_steps", settings["refine_steps"]), Count)
        return label, seed, count

    def generate(self, label: int, seed: int = 0, count: int = 4, **settings: Any) -> Generation:
        """`count` images of class `label` from every part the run has; settings are `ctfgen sample`'s
        (cfg1, t1, top_k1, top_p1, cfg2, t2, top_k2, top_p2, refiner_mask, refine_steps), defaults where
        left out."""
        label, seed, count = self.check(label, seed, count, settings)
        settings = {**DEFAULTS, **STAGE2_SWITCHES, **settings}
        settings.update({k: as_whole(k, settings[k]) for k in ("top_k1", "top_k2", "refine_steps")})
        labels = [label] * count
        out = Generation()
        with self._lock:
            if self.ctf is not None:
                start = time.perf_counter()
                ctf = self.ctf(labels, **settings, generator=make_generator(seed, self.device), progress=False)
                out.seconds["CTF"] = time.perf_counter() - start
                palette = cluster_palette(self.ctf.hierarchy.K)
                out.coarse_maps = [self._coarse_map(palette, c, im.size) for c, im in zip(ctf.coarse, ctf.images)]
                if self.has_refiner:
                    out.ctf = [enlarge(im) for im in ctf.images]
                    uniform = self.ctf.hierarchy.random_members(ctf.coarse, torch.Generator().manual_seed(seed))
                    out.uniform = [enlarge(im) for im in pil_images(self.ctf.decode(uniform))]
                else:
                    out.uniform = [enlarge(im) for im in ctf.images]
                final = out.ctf[0] if out.ctf else out.uniform[0]
                out.animation = self._animation(palette, ctf.coarse[0], final)
            if self.baseline is not None:
                start = time.perf_counter()
                base = self.baseline(labels, **settings, generator=make_generator(seed, self.device), progress=False)
                out.seconds["baseline"] = time.perf_counter() - start
                out.baseline = [enlarge(im) for im in base.images]
        out.message = self._summary(label, seed, count, out.seconds)
        return out

    def _summary(self, label: int, seed: int, count: int, seconds: dict[str, float]) -> str:
        times = "; ".join(f"{side}: {s:.2f} s ({s / count * 1000:.0f} ms an image)" for side, s in seconds.items())
        text = f"{count} x {self.class_names[label]}, seed {seed}. {times}."
        if len(seconds) == 2:
            text += f" CTF took {seconds['CTF'] / seconds['baseline']:.2f}x the baseline's time."
        if self.ctf is not None and not self.has_refiner:
            text += " This run has no refiner: stage 2 is a uniformly random member of each cluster."
        return text

    def _coarse_map(self, palette: np.ndarray, coarse: torch.Tensor, size: tuple[int, int]) -> Image.Image:
        """A coarse grid [h, w] as a colour picture as large as its decoded image."""
        return enlarge(Image.fromarray(palette[coarse.numpy()]).resize(size, Image.NEAREST))

    def _animation(self, palette: np.ndarray, coarse: torch.Tensor, final: Image.Image) -> Path:
        """GIF: the coarse labels appear in stage 1's raster order, then the map fades into the sample."""
        h, w = coarse.shape
        colours = palette[coarse.numpy()].reshape(h * w, 3)
        step = max(1, math.ceil(h * w / 96))  # at most ~100 frames
        frames = []
        for done in list(range(0, h * w, step)) + [h * w]:
            grid = np.full((h * w, 3), 40, np.uint8)
            grid[:done] = colours[:done]
            frames.append(Image.fromarray(grid.reshape(h, w, 3)).resize(final.size, Image.NEAREST))
        last_map, final = frames[-1], final.convert("RGB")
        frames += [Image.blend(last_map, final, a) for a in (0.25, 0.5, 0.75, 1.0)]
        durations = [40] * (len(frames) - 5) + [600, 120, 120, 120, 2000]  # hold the full map and the sample
        if self._gif_folder is None:
            self._gif_folder = Path(tempfile.mkdtemp(prefix="ctfgen-serve-"))
        # a ring of files, so a server up for weeks does not fill its disk (Gradio copies each one it is given)
        self._gifs_made += 1
        path = self._gif_folder / f"animation-{self._gifs_made % GIF_RING}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
        return path


# --- the page -----------------------------------------------------------------------------------

INTRO = """# ctfgen: coarse-to-fine token prediction
Stage 1 samples a **coarse label** (one of K clusters of codewords) at each position in raster order;
stage 2, the refiner, picks the exact codeword of every position in one pass. Beside CTF's samples,
the baseline's (one AR model over all codewords); below them, their coarse labels (one colour per
cluster) and what a **uniformly random member** of each cluster decodes to: the difference between
the refined samples and those is what the refiner adds."""


def build_app(showroom: Showroom) -> Any:
    """The Gradio page over `showroom.generate`; every failure is a message in the page."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    import gradio as gr

    ctf, refiner, baseline = showroom.ctf is not None, showroom.has_refiner, showroom.baseline is not None
    reveal = refiner and showroom.ctf.refiner.config.reveal  # only such a refiner refines in several passes
    within = refiner and showroom.ctf.refiner_within  # trained within clusters: sampled with the mask only

    def on_generate(label, seed, count, cfg1, t1, top_k1, top_p1, cfg2, t2, top_k2, top_p2, refiner_mask, refine_steps):
        try:
            g = showroom.generate(label, seed, count, cfg1=cfg1, t1=t1, top_k1=top_k1, top_p1=top_p1, cfg2=cfg2,
                                  t2=t2, top_k2=top_k2, top_p2=top_p2, refiner_mask=bool(refiner_mask),
                                  refine_steps=refine_steps)
        except CtfgenError as e:
            return [], [], [], [], None, f"**Error:** {e}"
        except Exception:  # a bug, not a bad setting: the log has the traceback, the visitor a sentence
            log.exception("generation failed")
            return [], [], [], [], None, "**Error:** generation failed on the server; its log has the details."
        return g.ctf, g.coarse_maps, g.uniform, g.baseline, g.animation and str(g.animation), g.message

    def gallery(label: str, elem_id: str, visible: bool) -> Any:
        return gr.Gallery(label=label, elem_id=elem_id, visible=visible, columns=2, height=DISPLAY_PX * 2 + 80,
                          format="png", object_fit="contain", interactive=False)

    # delete_cache: Gradio's copies of the images are dropped after an hour (checked every 30 min)
    with gr.Blocks(title="ctfgen serve", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                label = gr.Dropdown([(n, i) for i, n in enumerate(showroom.class_names)], value=0, label="class",
                                    elem_id="class")
                seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
                count = gr.Slider(1, showroom.max_images, value=min(4, showroom.max_images), step=1, label="images",
                                  elem_id="count")
                with gr.Accordion("stage 1 (coarse AR; the baseline too)", open=True):
                    stage1 = [gr.Slider(0, 8, value=DEFAULTS["cfg1"], step=0.1, label="CFG scale (--cfg1; 1 = off)"),
                              gr.Slider(0.05, 3, value=DEFAULTS["t1"], step=0.05, label="temperature (--t1)"),
                              gr.Number(DEFAULTS["top_k1"], precision=0, label="top-k (--top-k1; 0 = off)",
                                        elem_id="top_k1"),
                              gr.Slider(0.01, 1, value=DEFAULTS["top_p1"], step=0.01, label="top-p (--top-p1; 1 = off)")]
                with gr.Accordion("stage 2 (refiner)", open=False, visible=refiner):
                    stage2 = [gr.Slider(0, 8, value=DEFAULTS["cfg2"], step=0.1, label="CFG scale (--cfg2; 1 = off)"),
                              gr.Slider(0.05, 3, value=DEFAULTS["t2"], step=0.05, label="temperature (--t2)"),
                              gr.Number(DEFAULTS["top_k2"], precision=0, label="top-k (--top-k2; 0 = off)"),
                              gr.Slider(0.01, 1, value=DEFAULTS["top_p2"], step=0.01, label="top-p (--top-p2; 1 = off)"),
                              gr.Checkbox(True, label="refiner mask: keep each code inside its cluster"
                                          + (" (this refiner was trained within clusters)" if within else ""),
                                          interactive=not within),
                              gr.Slider(1, 16, value=1, step=1, label="refinement passes (--refine-steps; 1 = the "
                                        "paper's one pass)", visible=reveal)]
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                animation = gr.Image(label="the first CTF sample: stage 1 in raster order, then stage 2",
                                     type="filepath", elem_id="animation", visible=ctf, interactive=False)
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                with gr.Row(equal_height=True):
                    refined = gallery("CTF: refined samples", "ctf", refiner)
                    base = gallery("baseline: one AR model over all V codewords", "baseline", baseline)
                with gr.Row(equal_height=True):
                    coarse = gallery("CTF: coarse labels (one colour per cluster)", "coarse", ctf)
                    uniform = gallery("the same coarse labels, a uniformly random member of each cluster", "uniform", ctf)
        outputs = [refined, coarse, uniform, base, animation, status]
        button.click(on_generate, [label, seed, count, *stage1, *stage2], outputs, api_name="generate")
    app.queue(default_concurrency_limit=1, max_size=None)  # one at a time, nobody turned away
    return app


def page_theme() -> Any:
    """Gradio's default look with the system's fonts: the default fetches web fonts, and a machine offline
    would make every visitor wait for them."""
    import gradio as gr

    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise CtfgenError(f"cannot listen on {host}:{port} ({e.strerror}); --port picks another") from None


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (tokenizer/ and any of hierarchy/ + coarse/, refiner/, baseline/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=checked(int, Between(1, 65535)), default=7860, help="(default: 7860)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--max-images", type=arg_type(Count), default=16, help="most images one request may ask for "
                   "(default: 16)")


def cmd_serve(args: argparse.Namespace) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes are not news
    device = pick_device(args.device)  # every check before the models load or the port opens
    check_port_free(args.host, args.port)
    showroom = Showroom(args.run, device, args.max_images)
    try:
        app = build_app(showroom)
    except ImportError as e:
        raise CtfgenError(f"ctfgen serve needs Gradio ({e}); install it with: pip install -e \".[demo]\"") from None
    print(f"serving {args.run} on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    app.launch(server_name=args.host, server_port=args.port, ssr_mode=False, quiet=True, theme=page_theme())


__all__ = ["Generation", "Showroom", "add_serve_args", "build_app", "cluster_palette", "cmd_serve"]
