"""Benchmark of the codebook clustering methods (a script, not a test).

    python benchmarks/bench_cluster.py            # full: the figures in docs/hierarchy.md
    python benchmarks/bench_cluster.py --quick    # smaller sizes, a few seconds

Full mode:
1. k-means on 16384 x 8 unit vectors (a VQ-16-sized codebook) into 512 clusters, at most
   50 Lloyd iterations (target: under 1 s);
2. k-means on 100,000 x 256 points (1024 planted blobs) into 1024 clusters, at most
   10 Lloyd iterations (target: under 10 s);
3. every method (kmeans, balanced, agglomerative, random) on 16384 x 8, K = 512: time,
   iterations, inertia and cluster sizes.
The data are random (seeded): a uniform codebook on the unit sphere, like a freshly
initialised or a well-used trained one.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from ctfgen.hierarchy.cluster import cluster_codebook


def sphere(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def blobs(n: int, d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    return centres[torch.randint(k, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def timed(x: torch.Tensor, method: str, k: int, **params) -> dict:
    t = time.perf_counter()
    c = cluster_codebook(x, method, k, seed=0, **params)
    seconds = time.perf_counter() - t
    sizes = c.sizes
    return {"method": method, "N": len(x), "D": x.shape[1], "K": k, "seconds": round(seconds, 3),
            "iterations": c.iterations, "inertia": round(c.inertia, 3),
            "size_min": int(sizes.min()), "size_max": int(sizes.max()), "params": c.params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (4096 x 8 / 20000 x 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quick:
        small, k_small, big, k_big = (4096, 8), 128, (20000, 64), 256
    else:
        small, k_small, big, k_big = (16384, 8), 512, (100_000, 256), 1024
    codebook = sphere(*small, seed=0)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "quick": args.quick}

    timed(sphere(1024, 8, 1), "kmeans", 16)  # warm-up (thread pool, allocator)
    results["kmeans_small"] = timed(codebook, "kmeans", k_small, max_iter=50)
    results["kmeans_big"] = timed(blobs(*big, k_big, seed=1), "kmeans", k_big, max_iter=10)
    results["methods"] = [timed(codebook, m, k_small) for m in ("kmeans", "balanced", "agglomerative", "random")]

    print(f"torch {results['torch']}, {results['threads']} threads")
    for key, target in (("kmeans_small", 1.0), ("kmeans_big", 10.0)):
        r = results[key]
        goal = "" if args.quick else f", target {target:.0f} s"
        print(f"k-means {r['N']} x {r['D']} -> {r['K']}: {r['seconds']:.2f} s, {r['iterations']} iterations "
              f"(cap {r['params']['max_iter']}){goal}")
    print(f"\nall methods on {small[0]} x {small[1]}, K = {k_small}")
    print(f"{'method':<14}{'seconds':>9}{'iters':>7}{'inertia':>11}{'sizes':>10}")
    for r in results["methods"]:
        print(f"{r['method']:<14}{r['seconds']:>9.2f}{r['iterations']:>7}{r['inertia']:>11.1f}{r['size_min']:>5}..{r['size_max']:<4}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
