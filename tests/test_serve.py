"""`ctfgen serve`: the page's generate function as a plain function, on tiny random runs (full and partial),
and end to end: the server started on a free port, the page opened in headless Chromium, Generate clicked."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.errors import CtfgenError
from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.pipeline import CTFPipeline, make_generator
from ctfgen.serve import DISPLAY_PX, Showroom, check_port_free, cluster_palette
from ctfgen.tokenizer.model import save_tokenizer
from ctfgen.transformer import save_model
from test_sampling import GRID, K, V, random_model, tiny_tokenizer

ROLES = ("coarse", "refiner", "baseline")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("serve") / "run"
    tok = tiny_tokenizer()
    save_tokenizer(tok, run / "tokenizer")
    save_hierarchy(Hierarchy(torch.randperm(V, generator=torch.Generator().manual_seed(0)) % K, K,
                             tokenizer_fingerprint=tok.fingerprint), run / "hierarchy")
    for i, role in enumerate(ROLES):
        save_model(random_model(role, seed=i), run / role)
    return run


def partial_run(run: Path, tmp_path: Path, drop: tuple[str, ...]) -> Path:
    part = tmp_path / "part"
    shutil.copytree(run, part)
    for name in drop:
        shutil.rmtree(part / name)
    return part


def test_generate_shows_every_part_and_matches_the_pipeline(run: Path) -> None:
    room = Showroom(run, max_images=8)
    g = room.generate(2, seed=5, count=3, cfg1=1.5)
    assert [len(x) for x in (g.ctf, g.coarse_maps, g.uniform, g.baseline)] == [3, 3, 3, 3]
    side = DISPLAY_PX // 16 * 16  # 16 px images, enlarged by a whole factor
    assert all(im.size == (side, side) for im in g.ctf + g.coarse_maps + g.uniform + g.baseline)
    assert set(g.seconds) == {"CTF", "baseline"} and "3 x class 2, seed 5" in g.message
    assert room.class_names == [f"class {i}" for i in range(5)]

    # the same samples as the pipeline for that seed, nearest-neighbour enlarged
    pipe = CTFPipeline.from_pretrained(run)
    out = pipe([2] * 3, cfg1=1.5, generator=make_generator(5), progress=False)
    assert np.array_equal(np.asarray(g.ctf[1]), np.asarray(out.images[1].resize((side, side), Image.NEAREST)))
    # the coarse map: one palette colour per cluster, one block per grid position
    block = side // GRID
    colours = cluster_palette(K)
    mapped = np.asarray(g.coarse_maps[0])
    for r in range(GRID):
        for c in range(GRID):
            assert (mapped[r * block + block // 2, c * block + block // 2] == colours[out.coarse[0, r, c]]).all()
    # seeded: again the same, another seed differs
    assert np.array_equal(np.asarray(room.generate(2, seed=5, count=3, cfg1=1.5).baseline[2]), np.asarray(g.baseline[2]))
    assert not np.array_equal(np.asarray(room.generate(2, seed=6, count=3, cfg1=1.5).ctf[0]), np.asarray(g.ctf[0]))


def test_animation_fills_the_coarse_map_in_raster_order_then_shows_the_sample(run: Path) -> None:
    g = Showroom(run).generate(0, seed=1, count=1)
    with Image.open(g.animation) as gif:
        frames = [np.asarray(f.convert("RGB")) for f in _frames(gif)]
    assert len(frames) == GRID * GRID + 1 + 4  # every position, the full map, four blend steps
    block = frames[0].shape[0] // GRID
    assert (frames[0] == frames[0][0, 0]).all()  # nothing decided yet: one flat colour
    assert not (frames[1][:block, :block] == frames[0][:block, :block]).all()  # the first position, in raster order
    assert (frames[1][block:, :] == frames[0][block:, :]).all()
    assert np.abs(frames[-1].astype(int) - np.asarray(g.ctf[0].convert("RGB")).astype(int)).max() <= 8  # GIF palette


def _frames(gif: Image.Image):
    for i in range(gif.n_frames):
        gif.seek(i)
        yield gif.copy()


def test_a_run_without_refiner_or_baseline_shows_what_it_has(run: Path, tmp_path: Path) -> None:
    no_refiner = Showroom(partial_run(run, tmp_path / "a", ("refiner",)))
    g = no_refiner.generate(1, seed=0, count=2)
    assert not g.ctf and len(g.uniform) == 2 and len(g.coarse_maps) == 2 and len(g.baseline) == 2
    assert "no refiner" in g.message
    only_baseline = Showroom(partial_run(run, tmp_path / "b", ("coarse", "refiner", "hierarchy")))
    g = only_baseline.generate(1, seed=0, count=2)
    assert not g.ctf and not g.coarse_maps and not g.uniform and len(g.baseline) == 2 and g.animation is None
    g = Showroom(partial_run(run, tmp_path / "c", ("baseline",))).generate(1, seed=0, count=2)
    assert len(g.ctf) == 2 and not g.baseline and set(g.seconds) == {"CTF"}
    with pytest.raises(CtfgenError, match="nothing to sample"):
        Showroom(partial_run(run, tmp_path / "d", ("coarse", "refiner", "baseline")))
    with pytest.raises(CtfgenError, match="no tokenizer"):
        Showroom(run / "hierarchy")


@pytest.mark.parametrize("call, message", [
    (dict(label=7), "class must be in 0..4"),
    (dict(label=1.5), "class must be a whole number"),
    (dict(seed=-1), "seed must be in"),
    (dict(seed="x"), "seed must be a whole number"),
    (dict(count=0), "images must be in 1..16"),
    (dict(count=17), "images must be in 1..16"),
    (dict(cfg1=-1.0), "--cfg1 must be >= 0"),
    (dict(t2=0.0), "--t2 must be > 0"),
    (dict(top_p1=0.0), "--top-p1 must lie in"),
    (dict(top_k1=10**6), "--top-k1: top-k must be in 0..8"),
    (dict(top_k2=2.5), "top_k2 must be a whole number"),
    (dict(bogus=1), "unknown settings"),
    (dict(refine_steps=0), "--refine-steps must be >= 1"),
    (dict(refine_steps=2), "needs a refiner trained with --reveal"),
])
def test_bad_settings_are_one_message(run: Path, call: dict, message: str) -> None:
    room = Showroom(run)
    args = dict(label=1, seed=0, count=1)
    args.update(call)
    with pytest.raises(CtfgenError, match=message.replace("(", r"\(").replace("+", r"\+")):
        room.generate(args.pop("label"), args.pop("seed"), args.pop("count"), **args)


def test_a_busy_port_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(CtfgenError, match="--port picks another"):
            check_port_free("127.0.0.1", s.getsockname()[1])


# --- in a real browser ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_page_in_headless_chromium(run: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    pytest.importorskip("gradio", reason="Gradio is not installed (pip install -e '.[demo]')")
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ctfgen.cli", "serve", str(run), "--port", str(port),
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, server)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            page.goto(url)
            page.fill("#top_k1 input", "100000")  # a bad setting: a message in the page, no images
            page.click("#generate")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Error')", timeout=60_000)
            assert "--top-k1" in page.inner_text("#status")
            page.fill("#top_k1 input", "0")
            page.click("#generate")
            for part in ("ctf", "baseline", "coarse", "uniform"):
                page.wait_for_function(f"document.querySelectorAll('#{part} img').length >= 4", timeout=60_000)
            page.wait_for_selector("#animation img", timeout=60_000)
            assert "4 x class 0, seed 0" in page.inner_text("#status")
            browser.close()
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    assert "Traceback" not in log, log


def wait_for(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited: {server.communicate()[0]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the server did not answer within {timeout} s")


def test_without_gradio_the_command_says_how_to_install_it(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import builtins

    from ctfgen.serve import add_serve_args, cmd_serve

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name.split(".")[0] == "gradio":
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    with pytest.raises(CtfgenError, match=r'pip install -e "\.\[demo\]"'):
        cmd_serve(parser.parse_args([str(run), "--port", str(free_port()), "--device", "cpu"]))
