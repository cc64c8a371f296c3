"""Benchmark of the neighbours phase at scale on synthetic SAE activations (no model).

For each d_sae, builds a synthetic index (default 1M tokens, k 64, Zipf-distributed feature
frequencies as in bench_index.py, fresh draws for every token), then measures, each in a
fresh process so its peak RSS is its own:

- co-occurrence neighbours through the pipeline's code path (collect/neighbours.py: one
  pass over the forward index in groups, bounded candidate tables);
- decoder-cosine neighbours of a random decoder [d_sae, d_in] (chunked products);

and prints time, peak RSS (anonymous and file-backed) and the growth rates: time and
memory against d_sae over the sizes run, and against tokens from a second run at
``--tokens / 4`` for the middle size.

    .venv/bin/python benchmarks/bench_neighbours.py                    # 16k, 65k, 131k
    .venv/bin/python benchmarks/bench_neighbours.py --tokens 200000 --d-sae 16384 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import MemorySampler

RSS_TARGET_MB = 2048


def fresh_rows(rng: np.random.Generator, cdf: np.ndarray, perm: np.ndarray, n: int, k: int):
    """n token rows of k distinct Zipf-distributed feature ids (as bench_index.make_pool)."""
    d_sae = len(cdf)
    raw = np.searchsorted(cdf, rng.random((n, k)))
    raw.sort(axis=1)
    raw = (np.maximum.accumulate(raw - np.arange(k), axis=1) + np.arange(k)) % d_sae
    return perm[raw].astype(np.int32)


def build_index(path: Path, tokens: int, d_sae: int, k: int, ctx: int, zipf: float) -> float:
    """Write a synthetic index of ``tokens`` tokens; returns seconds."""
    from saetui.index import IndexWriter

    rng = np.random.default_rng(d_sae)
    p = 1.0 / np.arange(1, d_sae + 1) ** zipf
    cdf = np.cumsum(p / p.sum())
    perm = rng.permutation(d_sae)
    scale = rng.lognormal(0.0, 0.7, d_sae).astype(np.float32)
    n_windows = max(1, tokens // ctx)
    started = time.perf_counter()
    with IndexWriter.create_or_resume(
        path, {"model": "synthetic-neighbours", "zipf": zipf}, d_sae, ctx,
        [f"tok{i}" for i in range(1024)], overwrite=True,
    ) as writer:  # fmt: skip
        batch = 64
        for w in range(0, n_windows, batch):
            n = min(batch, n_windows - w)
            ids = fresh_rows(rng, cdf, perm, n * ctx, k)
            values = scale[ids] * rng.lognormal(0.0, 0.6, ids.shape).astype(np.float32)
            mask = np.ones(n * ctx, bool)
            mask[::ctx] = False  # BOS
            writer.add_windows(
                np.arange(w, w + n),
                rng.integers(0, 1024, (n, ctx)).astype(np.uint32),
                [[(w + i, 0, 0, ctx)] for i in range(n)],
                ids,
                values,
                mask,
                lengths=np.full(n, ctx),
            )
        writer.finish()
    return time.perf_counter() - started


def worker_cooccurrence(index_path: Path) -> dict:
    from saetui.collect.distributed import Team
    from saetui.collect.job import CollectProgress  # noqa: F401 - the phase's progress type
    from saetui.collect.neighbours import ForwardSource, cooccurrence_rows
    from saetui.index import open_index

    sampler = MemorySampler()
    started = time.perf_counter()
    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
        columns = index._load_columns()  # per-feature counts, as the writer's summaries
        progress = index.progress()
        result = cooccurrence_rows(
            index,
            ForwardSource(0, None, progress.windows),
            columns.count,
            columns.counted_tokens,
            Team(),
            (0, d_sae),
            top_n=16,
            min_count=3,
            check_stop=lambda: None,
            report=lambda *a, **k: None,
            state_dir=Path(tempfile.mkdtemp(prefix="saetui-nbr-state-")),
        )
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    return {
        "seconds": seconds,
        "peak_rss_mb": peak["RssAnon"] + peak["RssFile"],
        "peak_anon_mb": peak["RssAnon"],
        "overflowed": result.overflowed,
        "with_neighbours": int((result.ids["npmi"][:, 0] >= 0).sum()),
    }


def worker_decoder(d_sae: int, d_in: int) -> dict:
    import torch

    from saetui.analysis.neighbours import decoder_cosine_neighbours

    sampler = MemorySampler()
    w_dec = torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    decoder_cosine_neighbours(w_dec, top_n=16)
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    return {
        "seconds": seconds,
        "peak_rss_mb": peak["RssAnon"] + peak["RssFile"],
        "peak_anon_mb": peak["RssAnon"],
        "gflop_per_s": 2.0 * d_sae * d_sae * d_in / seconds / 1e9,
    }


def in_child(*args: str) -> dict:
    """Run this script's worker mode in a fresh process and return its JSON line."""
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def exponent(x0: float, y0: float, x1: float, y1: float) -> float:
    return math.log(y1 / y0) / math.log(x1 / x0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", default="16384,65536,131072", help="comma-separated sizes")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--d-in", type=int, default=512, help="decoder width for decoder cosine")
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--no-decoder", action="store_true", help="co-occurrence only")
    ap.add_argument("--path", type=Path, help="where to build the indexes (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the indexes")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        out = (
            worker_cooccurrence(Path(rest[0]))
            if kind == "cooc"
            else worker_decoder(int(rest[0]), int(rest[1]))
        )
        print(json.dumps(out))
        return out

    sizes = [int(s) for s in args.d_sae.split(",")]
    root = args.path or Path(tempfile.mkdtemp(prefix="saetui-bench-nbr-"))
    runs = [(d, args.tokens) for d in sizes]
    if len(sizes) > 1:
        runs.append((sizes[len(sizes) // 2], args.tokens // 4))  # growth in tokens
    rows = []
    try:
        for d_sae, tokens in runs:
            path = root / f"d{d_sae}-t{tokens}-k{args.k}"
            build_s = None
            if not (path / "saetui-index.json").exists():
                build_s = build_index(path, tokens, d_sae, args.k, args.ctx_len, args.zipf)
            cooc = in_child("cooc", str(path))
            row = {"d_sae": d_sae, "tokens": tokens, "build_s": build_s, "cooccurrence": cooc}
            if not args.no_decoder and tokens == args.tokens:
                row["decoder_cosine"] = in_child("dec", str(d_sae), str(args.d_in))
            rows.append(row)
            line = (
                f"d_sae {d_sae:>7,}  tokens {tokens:>9,}  co-occurrence {cooc['seconds']:7.1f} s "
                f"peak RSS {cooc['peak_rss_mb']:5,} MB (anon {cooc['peak_anon_mb']:,})"
            )
            if "decoder_cosine" in row:
                dec = row["decoder_cosine"]
                line += (
                    f"  | decoder cosine {dec['seconds']:6.1f} s peak RSS "
                    f"{dec['peak_rss_mb']:,} MB ({dec['gflop_per_s']:.0f} GFLOP/s)"
                )
            print(line, flush=True)
            if not args.keep:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        if not args.keep and args.path is None:
            shutil.rmtree(root, ignore_errors=True)
    full = [r for r in rows if r["tokens"] == args.tokens]
    growth: dict[str, float] = {}
    if len(full) > 1:
        a, b = full[0], full[-1]
        growth["cooc_time_vs_d_sae"] = exponent(
            a["d_sae"], a["cooccurrence"]["seconds"], b["d_sae"], b["cooccurrence"]["seconds"]
        )
        growth["cooc_rss_vs_d_sae"] = exponent(
            a["d_sae"], a["cooccurrence"]["peak_rss_mb"], b["d_sae"],
            b["cooccurrence"]["peak_rss_mb"],
        )  # fmt: skip
        if "decoder_cosine" in a and "decoder_cosine" in b:
            growth["decoder_time_vs_d_sae"] = exponent(
                a["d_sae"], a["decoder_cosine"]["seconds"], b["d_sae"],
                b["decoder_cosine"]["seconds"],
            )  # fmt: skip
    quarter = [r for r in rows if r["tokens"] != args.tokens]
    if quarter:
        q = quarter[0]
        f = next(r for r in full if r["d_sae"] == q["d_sae"])
        growth["cooc_time_vs_tokens"] = exponent(
            q["tokens"], q["cooccurrence"]["seconds"], f["tokens"], f["cooccurrence"]["seconds"]
        )
    worst = max(r["cooccurrence"]["peak_rss_mb"] for r in rows)
    worst = max(
        [worst] + [r["decoder_cosine"]["peak_rss_mb"] for r in rows if "decoder_cosine" in r]
    )
    for name, value in growth.items():
        print(f"growth {name:24s} ~ x^{value:.2f}")
    print(
        f"peak RSS {worst:,} MB  target <= {RSS_TARGET_MB:,}: "
        f"{'met' if worst <= RSS_TARGET_MB else 'MISSED'}"
    )
    load = os.getloadavg()[0]
    print(f"(load average during the run: {load:.2f} on {os.cpu_count()} cores)")
    result = {"runs": rows, "growth": growth, "peak_rss_mb": worst, "load_avg_1m": load}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
