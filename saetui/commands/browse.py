"""Handlers of the commands that read an index: open (the TUI), query, postings, compare."""

from __future__ import annotations

import argparse
import json
from typing import Any

from saetui.commands.common import check_index, has_terminal, say
from saetui.errors import SaetuiInputError


def cmd_open(args: argparse.Namespace) -> int:
    """Browse an existing index (the model loads lazily, only for the probe)."""
    from saetui.tui.app import check_openable, run_app

    check_openable(args.index, args.feature)
    if not has_terminal():
        raise SaetuiInputError(
            "saetui open needs a terminal (stdin and stderr must be a tty); run it in a "
            "terminal, or use saetui export for a batch job."
        )
    return run_app(args.index, feature=args.feature, compare=args.compare)


def cmd_postings(args: argparse.Namespace) -> int:
    """Build (or continue, or extend) the per-feature postings of an index."""
    from saetui.index.postings import build_postings

    check_index(args.index)
    if args.part_nnz < 1:
        raise SaetuiInputError(f"--part-nnz {args.part_nnz} must be at least 1 nonzero.")
    report = build_postings(args.index, part_nnz=args.part_nnz)
    verb = "rebuilt" if report.rebuilt else "built"
    print(
        f"{verb} postings of {args.index}: {report.windows} windows, {report.nnz} nonzeros "
        f"({report.new_nnz} new, {report.nnz_per_s:,.0f}/s), {report.bytes / 1e6:.1f} MB on "
        f"disk ({report.bytes_per_nnz:.2f} B/nonzero)"
    )
    return 0


def _shade(tokens: list[str], focus: int, values: Any, radius: int) -> str:
    """The window's tokens around ``focus``: the match [[in brackets]] with its value, other
    tokens where the first feature fires marked with its value."""
    lo, hi = max(0, focus - radius), min(len(tokens), focus + radius + 1)
    out = []
    for i in range(lo, hi):
        text = json.dumps(tokens[i])[1:-1]
        value = float(values[i]) if values is not None else 0.0
        mark = f"{{{value:.3g}}}" if value > 0 else ""
        out.append(f"[[{text}]]{mark}" if i == focus else f"{text}{mark}")
    return "".join(out)


def cmd_query(args: argparse.Namespace) -> int:
    """Answer a query expression from an index's postings."""
    from saetui.index.query import open_query, parse_query

    check_index(args.index)
    if args.limit < 0:
        raise SaetuiInputError(f"--limit {args.limit} must be >= 0: pass a page size.")
    if args.offset < 0:
        raise SaetuiInputError(f"--offset {args.offset} must be >= 0: pass where to start.")
    parse_query(args.expr)  # a malformed expression is reported before anything opens
    reader, engine = open_query(args.index)
    try:
        page = engine.query(args.expr, limit=args.limit, offset=args.offset, order=args.by)
        contexts = engine.contexts(page)
        covered, committed = engine.coverage()
    finally:
        engine.close()
        reader.close()
    if covered < committed:  # on stderr: --json output stays one JSON document
        say(
            f"saetui: note: the postings cover {covered} of the index's {committed} windows; "
            f"run `saetui postings {args.index}` to add the rest."
        )
    if args.json:
        print(
            json.dumps(
                {
                    "expression": page.expression,
                    "total": page.total,
                    "counts": page.counts,
                    "pmi": page.pmi,
                    "features": page.features,
                    "matches": [
                        {
                            "shard": c.shard,
                            "global_index": c.global_index,
                            "window": c.window,
                            "position": c.position,
                            "token": c.tokens[c.position],
                            "values": [float(v) for v in page.values[i]],
                            "context": c.tokens,
                        }
                        for i, c in enumerate(contexts)
                    ],
                }
            )
        )
        return 0
    counts = ", ".join(f"{k}: {v}" for k, v in page.counts.items())
    pmi = "" if page.pmi is None else f", PMI {page.pmi:.3f}"
    print(f"{page.expression}: {page.total} matches ({counts}{pmi})")
    for i, c in enumerate(contexts):
        row = zip(page.features, page.values[i], strict=True)
        values = ", ".join(f"f:{f}={float(v):.3g}" for f, v in row)
        shaded = _shade(c.tokens, c.position, c.activations[0] if page.features else None, 12)
        where = f"shard {c.shard} " if reader.meta.n_shards > 1 else ""
        print(f"{where}window {c.window} pos {c.position} {values}: {shaded}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare two SAEs (index or SAE directories): matched features, splits, unmatched."""
    from saetui.analysis.compare_report import compare, load_side, summary, write_json

    if args.top < 1:
        raise SaetuiInputError(f"--top {args.top} must be at least 1 neighbour per feature.")
    report = compare(load_side(args.a), load_side(args.b), top_n=args.top)
    print(summary(report))
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0
