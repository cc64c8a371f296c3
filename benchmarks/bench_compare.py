"""Benchmark of decoder matching between two SAEs (saetui.analysis.compare.match_decoders).

Synthetic decoders (d_in 512 by default): B is a permuted copy of A's rows (for unequal sizes,
of A's first d_b rows) plus noise, so the share of recovered pairs measures the assignment's
quality as well as its time. Sizes up to 8192 use the Hungarian assignment, larger ones the
greedy fallback; ``--greedy-check`` also runs greedy at a Hungarian size to compare.

    .venv/bin/python benchmarks/bench_compare.py                       # 2048x1024, 65536x65536
    .venv/bin/python benchmarks/bench_compare.py --sizes 4096x4096 --greedy-check
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from saetui.analysis.compare import match_decoders


def decoders(d_a: int, d_b: int, d_in: int, noise: float, seed: int = 0):
    """A [d_a, d_in], B [d_b, d_in] and truth: B's row i is A's row truth[i], noised."""
    gen = torch.Generator().manual_seed(seed)
    w_a = torch.randn(d_a, d_in, generator=gen)
    truth = torch.randperm(d_a, generator=gen)[:d_b]
    w_b = w_a[truth] + noise * torch.randn(d_b, d_in, generator=gen)
    return w_a, w_b, truth.numpy()


def run(d_a: int, d_b: int, d_in: int, noise: float, top_n: int, hungarian_max: int) -> dict:
    w_a, w_b, truth = decoders(d_a, d_b, d_in, noise)
    t0 = time.perf_counter()
    match = match_decoders(w_a, w_b, top_n=top_n, hungarian_max=hungarian_max)
    seconds = time.perf_counter() - t0
    expected = {int(t): i for i, t in enumerate(truth)}
    right = sum(expected.get(int(a)) == int(b) for a, b in match.pairs)
    return {
        "d_a": d_a,
        "d_b": d_b,
        "d_in": d_in,
        "method": match.method,
        "seconds": round(seconds, 2),
        "pairs": len(match.pairs),
        "recovered": round(right / d_b, 4),
        "mean_max_cos_ab": round(match.mean_max_cos_ab, 4),
        "mean_max_cos_ba": round(match.mean_max_cos_ba, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["2048x1024", "65536x65536"])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--noise", type=float, default=0.5, help="noise std (rows have std 1)")
    parser.add_argument("--top", type=int, default=16, help="neighbours per feature (CLI: 16)")
    parser.add_argument("--greedy-check", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.1f}")
    results = []
    for size in args.sizes:
        d_a, d_b = (int(x) for x in size.split("x"))
        results.append(run(d_a, d_b, args.d_in, args.noise, args.top, 8192))
        if args.greedy_check and max(d_a, d_b) <= 8192:
            results.append(run(d_a, d_b, args.d_in, args.noise, args.top, 0))
    for r in results:
        print(
            f"{r['d_a']:>6} x {r['d_b']:<6} d_in {r['d_in']}: {r['method']:<9} "
            f"{r['seconds']:8.2f} s, {r['pairs']} pairs, {100 * r['recovered']:.2f} % recovered, "
            f"mean max cos {r['mean_max_cos_ab']:.3f} / {r['mean_max_cos_ba']:.3f}"
        )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
