"""The member-only head of a refiner trained within clusters: each position's M member rows gathered, or one
product per cluster; which `transformer.model.products_per_cluster` (the rule `Transformer.member_logits`
follows) picks, and whether that is the faster one (a script, not a test).

    python benchmarks/bench_member_product.py            # training and sampling shapes, best of 5
    python benchmarks/bench_member_product.py --quick    # fewer shapes, best of 2

Shapes: training (forward and backward) at batch 64 of 8 x 8 grids (4,096 positions) for tiny and small widths
and V in {1024, 4096, 16384} with K from 32 to 512; sampling (forward only, CFG doubles the rows) at batch 1
and 64, and GPT-B's refiner width at 16 x 16 grids. Clusters are equal-sized (V / K codewords), positions
drawn uniformly among them: a trained hierarchy's unequal clusters move the gathered side's cost (padding
to the largest) more than the grouped one's.
"""

from __future__ import annotations

import argparse
import time

import torch

from ctfgen.transformer.model import GROUPED_WORK, MemberProduct, grouped_member_product, products_per_cluster

# (what, positions, width, V, K, backward)
FULL = [("train tiny", 4096, 64, v, k, True) for v, k in ((1024, 32), (1024, 256), (4096, 64), (4096, 512),
                                                             (16384, 32), (16384, 256), (16384, 512))]
FULL += [("train small", 4096, 128, 4096, 512, True), ("train small", 4096, 128, 16384, 64, True)]
FULL += [("sample tiny b1", 128, 64, 4096, 512, False), ("sample tiny b64", 8192, 64, 4096, 512, False),
         ("sample small b64", 8192, 128, 4096, 512, False), ("sample GPT-B b1", 512, 768, 16384, 512, False),
         ("sample GPT-B b64", 32768, 768, 16384, 512, False)]
QUICK = [FULL[i] for i in (0, 3, 4, 9, 10)]


def best_of(run, rounds: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(positions: int, width: int, v: int, k: int, backward: bool, rounds: int) -> tuple[float, float, int]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(v, width, generator=g).requires_grad_(backward)
    hidden = torch.randn(positions, width, generator=g).requires_grad_(backward)
    table = torch.randperm(v, generator=g).view(k, v // k)
    clusters = torch.randint(0, k, (positions,), generator=g)
    step = max(1, 2 ** 24 // (table.shape[1] * width))

    def timed(product):
        def run():
            with torch.set_grad_enabled(backward):
                out = product()
                if backward:
                    out.sum().backward()
        return best_of(run, rounds)

    gathered = timed(lambda: MemberProduct.apply(hidden, weight, table[clusters], step))
    grouped = timed(lambda: grouped_member_product(hidden, weight, clusters, table))
    return gathered, grouped, len(torch.unique(clusters))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes, best of 2")
    args = p.parse_args()
    shapes, rounds = (QUICK, 2) if args.quick else (FULL, 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GROUPED_WORK = {GROUPED_WORK}")
    print(f"{'shape':18} {'positions':>9} {'width':>5} {'V':>6} {'K':>4} {'gathered ms':>11} {'grouped ms':>10} "
          f"{'rule picks':>10} {'picked/best':>11}")
    for what, positions, width, v, k, backward in shapes:
        gathered, grouped, present = measure(positions, width, v, k, backward, rounds)
        picks_grouped = products_per_cluster(positions, v // k, width, present, backward)
        picked = grouped if picks_grouped else gathered
        print(f"{what:18} {positions:9d} {width:5d} {v:6d} {k:4d} {gathered * 1e3:11.1f} {grouped * 1e3:10.1f} "
              f"{'grouped' if picks_grouped else 'gathered':>10} {picked / min(gathered, grouped):11.2f}")


if __name__ == "__main__":
    main()
