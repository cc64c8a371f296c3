"""Handlers of the commands that make indexes: collect, demo (and demo --compare), merge,
info."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from saetui.commands.common import has_terminal, say
from saetui.errors import SaetuiInputError


def cmd_info(args: argparse.Namespace) -> int:
    """Print what an SAE directory holds, or which SAEs an index folder holds."""
    from saetui.sae import describe, load_sae

    if (args.path is None) == (args.sae is None):
        raise SaetuiInputError(
            "saetui info describes an SAE directory (--sae SAE) or an index folder (PATH): "
            "give one of the two."
        )
    if args.path is not None:
        return _info_indexes(args.path, args.json)
    sae = load_sae(args.sae)
    facts = describe(sae)
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def _info_indexes(path: Path, as_json: bool) -> int:
    """The SAEs an index (or a folder of one index per SAE) holds: name, hook, width, tokens."""
    from saetui.index import format as fmt
    from saetui.index import open_index

    listed = fmt.read_several(path)
    if listed is None:
        fmt.read_marker(path)  # no index: one sentence
        listed = [{"name": None}]
    rows = []
    for entry in listed:
        where = path / str(entry["name"]) if entry.get("name") is not None else path
        row: dict[str, Any] = {"name": entry.get("name") or path.name, "index": str(where)}
        try:
            with open_index(where) as index:
                progress, config = index.progress(), index.meta.run_config
                row.update(
                    sae=config.get("sae_path"),
                    hook=config.get("hook"),
                    d_sae=index.meta.d_sae,
                    tokens=progress.tokens,
                    state="finished" if progress.finished else "partial (resumable)",
                )
        except SaetuiInputError:
            row.update(sae=entry.get("sae"), hook=entry.get("hook"), state="not collected yet")
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if len(rows) > 1:
        print(f"{path}: {len(rows)} SAEs collected together, one index each")
    for row in rows:
        facts = [str(row.get(key)) for key in ("hook",) if row.get(key)]
        if "d_sae" in row:
            facts += [f"d_sae {row['d_sae']:,}", f"{row['tokens']:,} tokens"]
        facts.append(str(row["state"]))
        print(f"{row['name']:<16}  {'  '.join(facts)}  {row['index']}  (SAE {row.get('sae')})")
    return 0


def _collect_config(args: argparse.Namespace, out: Path) -> Any:
    from saetui.collect.inputs import RunInputs
    from saetui.collect.pipeline import CollectConfig

    saes = list(args.sae or [args.sae_default])
    inputs = RunInputs.from_namespace(args)
    inputs.sae = saes[0]
    return CollectConfig(
        out=out,
        inputs=inputs,
        metrics_tokens=args.metrics_tokens,
        overwrite=args.overwrite,
        shard_dir=args.shard_dir,
        gather=args.gather,
        postings=args.postings,
        saes=tuple(saes) if len(saes) > 1 else (),
    )


def demo_index_path() -> Path:
    """Where ``saetui demo`` keeps its index (reused and resumed across runs)."""
    from saetui.lm.embedded import cache_root

    return cache_root() / "indexes" / "demo"


def _run_collection(args: argparse.Namespace, out: Path) -> int:
    """Headless, or the TUI with the collection in a child process; the request is checked
    first, so bad options never open the TUI or load a model."""
    from saetui.collect.distributed import launched_by_torchrun
    from saetui.collect.job import check_request

    config = _collect_config(args, out)
    if launched_by_torchrun() and config.several:
        raise SaetuiInputError(
            "several --sae cannot run under torchrun yet: run one torchrun job per SAE, or "
            "collect the SAEs together in one process (without torchrun)."
        )
    if launched_by_torchrun():  # one rank of a torchrun job: no TUI, one rank prints
        from saetui.collect.headless import run_distributed

        try:
            code = run_distributed(config, say=say)
        except SaetuiInputError as error:
            say(f"saetui: error: {error}")
            code = SaetuiInputError.exit_code
        _end_rank(code)
    if args.shard_dir is not None or args.gather:
        raise SaetuiInputError(
            "--shard-dir and --gather are for runs under torchrun (torchrun --nproc-per-node N "
            "-m saetui collect ...): leave them out for a single process."
        )
    check_request(config)
    if config.several and not args.headless:
        say("saetui: several SAEs are collected headless; open each index afterwards")
        args.headless = True
    if not args.headless and not has_terminal():
        say("saetui: no terminal to draw on (stdin or stderr is not a tty): running headless")
        args.headless = True
    if args.headless:
        from saetui.collect.headless import run_headless

        return run_headless(config, say=say)
    from saetui.tui.app import run_app

    return run_app(out, collect=config)


def _end_rank(code: int) -> NoReturn:
    """End a torchrun rank now that its shard is closed and the process group destroyed:
    interpreter finalisation can abort the process (SIGABRT, "terminate called without an
    active exception") while gloo's worker threads release their last tensors, which
    torchrun would report as a failed job."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job on the embedded sample (model, SAE, corpus)."""
    out = args.out or demo_index_path()
    if args.postings is None:  # the sample is small (about a second): the query bar works
        args.postings = True
    if args.compare is not None:
        return _demo_compare(args, out)
    if args.headless:
        say(f"demo index: {out}")
    return _run_collection(args, out)


def compare_index_path(out: Path, sae: Path) -> Path:
    """Where ``saetui demo --compare`` keeps the second SAE's index: beside the first."""
    return out.with_name(f"{out.name}-{sae.resolve().name}")


def _collect_each(args: argparse.Namespace, runs: list[tuple[Path, Path]]) -> int:
    """Collect one index per (SAE, index directory) over the same corpus windows, headless,
    one after the other (each run is resumable and skipped once finished). One pass for
    several SAEs (collect --sae A --sae B) can replace this loop; the indexes stay the same."""
    from saetui.collect.headless import run_headless
    from saetui.collect.job import check_request

    if args.shard_dir is not None or args.gather:
        raise SaetuiInputError(
            "--shard-dir and --gather are for torchrun runs, not demo --compare."
        )
    configs = [
        _collect_config(argparse.Namespace(**{**vars(args), "sae": [sae]}), out)
        for sae, out in runs
    ]
    for config in configs:  # every request is checked before any model loads
        check_request(config)
    for (sae, out), config in zip(runs, configs, strict=True):
        say(f"demo index of {sae.name}: {out}")
        code = run_headless(config, say=say)
        if code != 0:
            return code
    return 0


def _demo_compare(args: argparse.Namespace, out: Path) -> int:
    """The demo index for two SAEs (the sample's two by default), then their comparison:
    the compare screen in the TUI, or its summary with --headless."""
    first = args.sae or [args.sae_default]
    if len(first) > 1:
        raise SaetuiInputError(
            f"demo --compare compares one SAE with {args.compare}: pass one --sae, or compare "
            "indexes of several SAEs with `saetui compare OUT/a OUT/b` after `saetui collect`."
        )
    if not Path(args.compare).is_dir():
        raise SaetuiInputError(
            f"--compare {args.compare} is not an SAE directory: pass the directory of the "
            "second SAE (sae_core, SAELens, sparsify or Gemma Scope), or --compare alone for "
            "the sample's second SAE."
        )
    second = compare_index_path(out, args.compare)
    code = _collect_each(args, [(first[0], out), (args.compare, second)])
    if code != 0:
        return code
    if not args.headless and not has_terminal():
        say("saetui: no terminal to draw on (stdin or stderr is not a tty): running headless")
        args.headless = True
    if args.headless:
        from saetui.analysis.compare_report import compare, load_side, summary

        print(summary(compare(load_side(out), load_side(second))), flush=True)
        print(f"browse it: saetui open {out} --compare {second}", flush=True)
        return 0
    from saetui.tui.app import run_app

    return run_app(out, compare=second)


def cmd_collect(args: argparse.Namespace) -> int:
    """Collect an index from a model, an SAE and a corpus."""
    return _run_collection(args, args.out)


def cmd_merge(args: argparse.Namespace) -> int:
    """Copy the finished shards of a distributed run into one index directory."""
    from saetui.index.merge import merge_indexes

    report = merge_indexes(args.shards, args.out, replace=args.overwrite)
    for shard in report.copied:
        print(f"copied shard {shard} into {args.out}")
    print(report.summary())
    return 0
