"""Tokenizer benchmark: training images/s and peak memory, then the default budget's report.

    python benchmarks/bench_tokenizer.py            # throughput + full default training (about 10 min on 2 cores)
    python benchmarks/bench_tokenizer.py --quick    # throughput + 100 steps, report on 1000 test images

Targets (small preset, 2-core CPU): >= 150 training images/s at batch 128; the default budget
within 10 minutes; test-split PSNR >= 26 dB and codebook usage >= 95% of 4096.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import torch

from ctfgen.tokenizer.model import VQTokenizer
from ctfgen.tokenizer.presets import preset_config
from ctfgen.tokenizer.train import TokenizerTrainConfig, reconstruction_loss, train_tokenizer


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_throughput(preset: str, batch_size: int, steps: int) -> dict:
    """Median images/s of full optimisation steps on random images (data loading excluded)."""
    torch.manual_seed(0)
    cfg = preset_config(preset)
    model = VQTokenizer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        rec, vq = model(x)
        loss = reconstruction_loss("l2", rec, x) + vq.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # the first steps allocate and warm caches
            times.append(time.perf_counter() - t)
    return {"preset": preset, "batch_size": batch_size, "images_per_s": batch_size / statistics.median(times),
            "step_s_median": statistics.median(times), "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench-tokenizer")
    args = ap.parse_args()

    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__}
    result["throughput"] = training_throughput("small", 128, 5 if args.quick else 10)
    result["throughput"]["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result["throughput"], indent=2))

    cfg = TokenizerTrainConfig(out=f"{args.out}/tokenizer")
    if args.quick:
        cfg.steps, cfg.report_limit = 100, 1000
    t = time.perf_counter()
    report = train_tokenizer(cfg)
    result["training"] = {"config": asdict(cfg), "wall_s": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib(),
                          "report": report}
    print(json.dumps(result["training"]["report"], indent=2))
    print(f"default budget ({cfg.steps} steps) took {result['training']['wall_s']:.0f} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_tokenizer.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
