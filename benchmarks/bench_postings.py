"""Benchmark of the per-feature postings (INDEX/postings) and the queries they answer.

Writes a synthetic index straight through IndexWriter (Zipf feature frequencies,
log-normal values, as benchmarks/bench_index.py; the per-feature summaries are skipped,
the postings do not read them), builds its postings, then prints bytes on disk per
nonzero, the build rate (nonzeros/s), peak RSS and p50/p99 latencies of the first page
(20 matches by value) of ``f:A``, ``f:A & f:B``, ``f:A & !f:B`` and ``tok:"..."``.

Features are drawn two ways: uniformly over the features that fire ("typical") and in
proportion to how often they fire ("by firing": the frequent features a researcher meets
first, whose postings are long).

    .venv/bin/python benchmarks/bench_postings.py                          # ~1 minute
    .venv/bin/python benchmarks/bench_postings.py --tokens 10000000 --d-sae 65536 --k 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import MemorySampler, make_pool, percentiles

from saetui.index import IndexWriter, open_index
from saetui.index.postings import KIND_FEATURE, KIND_TOKEN, build_postings
from saetui.index.query import QueryEngine

GOALS = {"bytes_per_nnz": 3.0, "first_page_p99_ms": 50.0}


def write_index(path: Path, tokens: int, d_sae: int, k: int, ctx: int, zipf: float) -> float:
    """A synthetic index of ``tokens`` tokens; returns the seconds the write took."""
    n_windows = max(1, tokens // ctx)
    pool_tokens = min(1 << 17, n_windows * ctx)
    ids, values, token_ids = make_pool(pool_tokens, d_sae, k, zipf, seed=0)
    vocab = [f"tok{i}" for i in range(49152)]
    vocab[:4] = ["<bos>", " the", " photo", "photos"]
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    writer = IndexWriter.create_or_resume(
        path, {"model": "synthetic-bench", "zipf": zipf}, d_sae, ctx, vocab, overwrite=True
    )
    with writer:
        w, batch = 0, 80
        while w < n_windows:
            n = min(batch, n_windows - w)
            n_tok = n * ctx
            start = int(rng.integers(0, pool_tokens - n_tok + 1))
            sl = slice(start, start + n_tok)
            mask = np.ones(n_tok, bool)
            mask[::ctx] = False  # BOS at the start of each window
            # documents of 3 windows, so doc: and the docs table see multi-window documents
            segments = [[((w + i) // 3, ((w + i) % 3) * ctx, 0, ctx)] for i in range(n)]
            writer._summaries.next_window += n  # summaries are not what this measures
            writer.add_windows(
                np.arange(w, w + n),
                token_ids[sl].reshape(n, ctx),
                segments,
                ids[sl],
                values[sl],
                mask,
                lengths=np.full(n, ctx),
                summaries_done=True,
            )
            w += n
        writer.finish()
    return time.perf_counter() - t0


def first_pages(engine: QueryEngine, exprs: list[str], limit: int = 20) -> dict[str, float]:
    """p50/p99 of one first page each (cold header cache for the first of each feature)."""
    times = []
    for expr in exprs:
        t = time.perf_counter()
        engine.query(expr, limit=limit, order="value")
        times.append(time.perf_counter() - t)
    return percentiles(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--part-nnz", type=int, default=16_000_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--path", type=Path, default=None, help="where to build (default: temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the index afterwards")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)

    root = args.path or Path(tempfile.mkdtemp(prefix="saetui-bench-postings-"))
    path = root / "index"
    if path.exists():
        shutil.rmtree(path)
    write_s = write_index(path, args.tokens, args.d_sae, args.k, args.ctx_len, args.zipf)

    sampler = MemorySampler()
    report = build_postings(path, part_nnz=args.part_nnz)
    peaks = sampler.stop()

    result: dict = {
        "tokens": args.tokens,
        "d_sae": args.d_sae,
        "k": args.k,
        "nonzeros": report.nnz,
        "index_write_s": round(write_s, 2),
        "build_s": round(report.seconds, 2),
        "build_nnz_per_s": report.nnz_per_s,
        "postings_bytes": report.bytes,
        "bytes_per_nnz": report.bytes_per_nnz,
        "build_peak_rss_anon_mb": peaks["RssAnon"],
    }
    with open_index(path) as reader, QueryEngine.open(reader) as engine:
        post = engine.postings
        counts = np.array([post.counts(KIND_FEATURE, f) for f in range(args.d_sae)], np.float64)
        alive = np.flatnonzero(counts)
        rng = np.random.default_rng(2)
        n = args.queries
        typical = rng.choice(alive, (n, 2))
        by_firing = rng.choice(args.d_sae, (n, 2), p=counts / counts.sum())
        vocab = reader.vocab
        tok_counts = np.array(
            [post.counts(KIND_TOKEN, t) for t in range(min(len(vocab), 49152))], np.float64
        )
        toks = rng.choice(len(tok_counts), n, p=tok_counts / tok_counts.sum())
        for name, pairs in (("typical", typical), ("by_firing", by_firing)):
            result[f"f:A {name}"] = first_pages(engine, [f"f:{a}" for a, _ in pairs])
            result[f"f:A & f:B {name}"] = first_pages(engine, [f"f:{a} & f:{b}" for a, b in pairs])
            result[f"f:A & !f:B {name}"] = first_pages(
                engine, [f"f:{a} & !f:{b}" for a, b in pairs]
            )
        result["tok:"] = first_pages(engine, ["tok:" + json.dumps(vocab[t]) for t in toks])
        result["mean_postings_by_firing"] = float(counts[by_firing[:, 0]].mean())
        result["mean_postings_typical"] = float(counts[typical[:, 0]].mean())

    print(
        f"tokens {args.tokens:,}  nonzeros {report.nnz:,}  d_sae {args.d_sae}  k {args.k}  "
        f"(index written in {write_s:.1f} s)"
    )
    print(
        f"postings: {report.bytes / 1e6:.1f} MB = {report.bytes_per_nnz:.2f} B/nonzero "
        f"(goal <= {GOALS['bytes_per_nnz']}); build {report.seconds:.1f} s = "
        f"{report.nnz_per_s / 1e6:.2f} M nonzeros/s, peak anonymous RSS "
        f"{peaks['RssAnon']} MB"
    )
    print(f"first page (20 by value), {args.queries} queries each:")
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"  {key:28s} p50 {value['p50_ms']:8.2f} ms   p99 {value['p99_ms']:8.2f} ms")
    print(
        f"mean postings per f:A: typical {result['mean_postings_typical']:,.0f}, "
        f"by firing {result['mean_postings_by_firing']:,.0f}"
    )
    result["load_avg_1m"] = os.getloadavg()[0]
    print(f"(load average at the end: {result['load_avg_1m']:.2f} on {os.cpu_count()} cores)")
    if args.json:
        print(json.dumps(result))
    if not args.keep and args.path is None:
        shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
