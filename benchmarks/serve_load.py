"""Load check of `ctfgen serve`: many visitors press Generate at once; every one must get its images.

    python benchmarks/serve_load.py --quick            # 20 requests on a random tiny run (seconds)
    python benchmarks/serve_load.py                    # 200 requests on a random tiny run
    python benchmarks/serve_load.py --run runs/demo    # 200 requests on a trained run

The server runs as its own process (`ctfgen serve`, default settings); the requests come from
`--clients` local Gradio clients, all submitted at once, each asking for `--images` images of a class
chosen by its index. Prints how many were answered with the right number of images, how many failed
or were lost, and the median and worst latency (submit to result). Exit status 1 if any was not
answered. Without --run, a tiny run with random weights is built in a temporary folder: the check
is about the server (queue, concurrency), not about the images.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ctfgen.hierarchy import Hierarchy, save_hierarchy
from ctfgen.tokenizer.model import VQConfig, VQTokenizer, save_tokenizer
from ctfgen.transformer import build_model, preset_config, save_model


def random_run(folder: Path, v: int = 64, k: int = 8, classes: int = 10, grid: int = 4) -> Path:
    """tokenizer/, hierarchy/, coarse/, refiner/, baseline/ with random weights (16 px grey images)."""
    torch.manual_seed(0)
    tok = VQTokenizer(VQConfig(image_size=16, in_channels=1, base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=1,
                               z_channels=8, codebook_size=v, codebook_dim=4, norm_groups=4, attention=False))
    save_tokenizer(tok, folder / "tokenizer")
    save_hierarchy(Hierarchy(torch.arange(v) % k, k, tokenizer_fingerprint=tok.fingerprint), folder / "hierarchy")
    for role, vocab, head in (("coarse", k, k), ("refiner", k, v), ("baseline", v, v)):
        save_model(build_model(preset_config("tiny", role=role, vocab_size=vocab, head_size=head, num_classes=classes,
                                             grid_h=grid, grid_w=grid)), folder / role)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, server: subprocess.Popen, timeout: float = 180) -> None:
    """Until the local server accepts connections on `port` (127.0.0.1 only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited:\n{server.communicate()[0]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"the server did not answer within {timeout} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run folder to serve (default: a random tiny run)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=20, help="Gradio clients the requests are spread over")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a request may wait in all")
    p.add_argument("--quick", action="store_true", help="20 requests")
    args = p.parse_args()
    requests = 20 if args.quick else args.requests
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else random_run(Path(tmp) / "run")
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        server = subprocess.Popen([sys.executable, "-m", "ctfgen.cli", "serve", str(run), "--port", str(port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
        try:
            wait_until_up(port, server)
            clients = [Client(url, verbose=False) for _ in range(min(args.clients, requests))]

            def one(i: int) -> tuple[float, str]:
                start = time.perf_counter()
                try:
                    job = clients[i % len(clients)].submit(i % 10, i, args.images, 2.0, 1.1, 0, 1.0, 1.0, 1.1, 0, 1.0,
                                                           True, 1, api_name="/generate")
                    ctf, coarse, uniform, baseline, animation, status = job.result(timeout=args.timeout)
                except Exception as e:  # counted and reported: a lost request is the finding
                    return time.perf_counter() - start, f"failed: {type(e).__name__}: {e}"
                answered = len(ctf) == args.images and len(baseline) == args.images and f"seed {i}" in status
                return time.perf_counter() - start, "ok" if answered else f"wrong answer: {status!r}"

            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=requests) as pool:  # all submitted at once
                results = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - start
        finally:
            server.terminate()
            log = server.communicate(timeout=60)[0]
    latencies = sorted(t for t, outcome in results if outcome == "ok")
    problems = [outcome for _, outcome in results if outcome != "ok"]
    print(f"{requests} concurrent requests from {len(clients)} clients, {args.images} image(s) each, run "
          f"{args.run or '(random tiny run)'}")
    print(f"answered {len(latencies)} / {requests}; failed or lost {len(problems)}; wall {wall:.1f} s "
          f"({requests * args.images / wall:.1f} images/s)")
    if latencies:
        print(f"latency: median {statistics.median(latencies):.2f} s, worst {latencies[-1]:.2f} s")
    for outcome in sorted(set(problems))[:5]:
        print(" ", outcome)
    if "Traceback" in log:
        print("the server log has a traceback:\n" + log)
    sys.exit(1 if problems or "Traceback" in log else 0)


if __name__ == "__main__":
    main()
