"""The ``saetui`` command line: one subcommand per job, user errors as one sentence + exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from saetui import __version__
from saetui.errors import SaetuiInputError

# the sample ships inside the package (a link to the checkout's sample_data/ in a clone)
SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"
SAMPLE_CORPUS = SAMPLE_DATA / "corpus.json"
SAMPLE_SAE = SAMPLE_DATA / "sae"
SAMPLE_SAE_SECOND = SAMPLE_DATA / "sae_1024"  # same model and hook, d_sae 1024: demo --compare


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from saetui.lm.names import DEFAULT_MODEL, NUMERICS, NUMERICS_HELP

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded model name, Hugging Face directory or hub name (default {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--hook", help="full hook name, e.g. blocks.9.hook_resid_post (default: the SAE's)"
    )
    group.add_argument("--layer", type=int, help="block index; with --hook-name builds the hook")
    group.add_argument("--hook-name", help="hook within the block (default hook_resid_post)")
    group.add_argument(
        "--numerics",
        choices=NUMERICS,
        help=f"{NUMERICS_HELP} (default: what the SAE's format was trained on)",
    )
    group.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda:N, mps")
    group.add_argument(
        "--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16"
    )


def _add_sae_options(parser: argparse.ArgumentParser, *, default: Path | None) -> None:
    group = parser.add_argument_group("SAE")
    group.add_argument(
        "--sae",
        type=Path,
        action="append",
        required=default is None,
        help="SAE directory: sae_core, SAELens, sparsify or Gemma Scope format; repeat it to "
        "collect several SAEs of one model in one pass (one index each, in --out/<name>)"
        + (f" (default: the sample SAE {default.name})" if default else ""),
    )
    parser.set_defaults(sae_default=default)
    group.add_argument(
        "--batchtopk-mode",
        choices=("per-token", "batch", "threshold"),
        help="BatchTopK inference: per-token top-k (default), top n*k over the batch, "
        "or a global threshold",
    )
    group.add_argument(
        "--threshold", type=float, help="global threshold for --batchtopk-mode threshold"
    )


def _add_corpus_options(parser: argparse.ArgumentParser, *, default: Path | None) -> None:
    group = parser.add_argument_group("corpus")
    group.add_argument(
        "--data",
        default=str(default) if default else None,
        required=default is None,
        help="JSON list of strings, JSONL, .txt, a directory of .txt/.md, or a datasets name",
    )
    group.add_argument("--text-field", default="text", help="JSONL field holding the text")
    group.add_argument("--ctx-len", type=int, default=128, help="tokens per window (default 128)")
    group.add_argument("--batch-size", type=int, default=16, help="windows per batch")
    group.add_argument("--max-tokens", type=int, help="stop after this many tokens")


def _add_collect_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("collection")
    group.add_argument(
        "--headless", action="store_true", help="no TUI: progress lines and a metrics summary"
    )
    group.add_argument(
        "--metrics-tokens",
        type=int,
        default=None,
        help="tokens of the collection (whole windows, spread evenly) on which CE loss and KL "
        "are measured; reconstruction metrics always use every collected token "
        "(default: 1%% of the collection, at least 512, at most 20000)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing index made with a different configuration",
    )
    group.add_argument(
        "--shard-dir",
        type=Path,
        help="under torchrun: the index directory this process writes its shard to, on a disk "
        "of its own machine (default: the output directory)",
    )
    group.add_argument(
        "--postings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build the per-feature postings that `saetui query` and the TUI's query bar use, "
        "once the index has finished (default: when the index holds under 100M tokens; "
        "--no-postings skips them; later: `saetui postings INDEX`)",
    )
    group.add_argument(
        "--gather",
        action="store_true",
        help="under torchrun with --shard-dir: copy the finished shards into the output",
    )


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
            code = run_distributed(config, say=_say)
        except SaetuiInputError as error:
            _say(f"saetui: error: {error}")
            code = SaetuiInputError.exit_code
        _end_rank(code)
    if args.shard_dir is not None or args.gather:
        raise SaetuiInputError(
            "--shard-dir and --gather are for runs under torchrun (torchrun --nproc-per-node N "
            "-m saetui collect ...): leave them out for a single process."
        )
    check_request(config)
    if config.several and not args.headless:
        _say("saetui: several SAEs are collected headless; open each index afterwards")
        args.headless = True
    if not args.headless and not _has_terminal():
        _say("saetui: no terminal to draw on (stdin or stderr is not a tty): running headless")
        args.headless = True
    if args.headless:
        from saetui.collect.headless import run_headless

        return run_headless(config, say=_say)
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


def _has_terminal() -> bool:
    """Whether the TUI can run: it reads keys from stdin and draws on stderr."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job on the embedded sample (model, SAE, corpus)."""
    out = args.out or demo_index_path()
    if args.postings is None:  # the sample is small (about a second): the query bar works
        args.postings = True
    if args.compare is not None:
        return _demo_compare(args, out)
    if args.headless:
        _say(f"demo index: {out}")
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
        _say(f"demo index of {sae.name}: {out}")
        code = run_headless(config, say=_say)
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
    second = compare_index_path(out, args.compare)
    code = _collect_each(args, [(first[0], out), (args.compare, second)])
    if code != 0:
        return code
    if not args.headless and not _has_terminal():
        _say("saetui: no terminal to draw on (stdin or stderr is not a tty): running headless")
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


def cmd_open(args: argparse.Namespace) -> int:
    """Browse an existing index (the model loads lazily, only for the probe)."""
    from saetui.tui.app import check_openable, run_app

    check_openable(args.index, args.feature)
    if not _has_terminal():
        raise SaetuiInputError(
            "saetui open needs a terminal (stdin and stderr must be a tty); run it in a "
            "terminal, or use saetui export for a batch job."
        )
    return run_app(args.index, feature=args.feature, compare=args.compare)


def cmd_export(args: argparse.Namespace) -> int:
    """Write an index's analysis in the old pipeline's layout, or as JSONL."""
    from saetui.export.old_pipeline import export_jsonl, export_sae_core

    _check_index(args.index)
    if args.top_examples is not None and args.top_examples < 1:
        raise SaetuiInputError(
            f"--top-examples {args.top_examples} must be at least 1 (examples per feature)."
        )
    _check_format_options(args)
    if args.format in ECOSYSTEM_FORMATS:
        return _export_ecosystem(args)
    if args.format == "jsonl":
        if args.activation_db:
            raise SaetuiInputError(
                "--activation-db belongs to --format sae_core (the old pipeline's pickle); "
                "drop it for the JSONL export."
            )
        out = args.out if args.out.suffix == ".jsonl" else args.out / "features.jsonl"
        print(export_jsonl(args.index, out, n_examples=args.top_examples or 20))
        return 0
    paths = export_sae_core(
        args.index,
        args.out,
        top_examples=args.top_examples or 25,
        activation_db=args.activation_db,
        say=_say,
    )
    for path in paths:
        print(path)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Remove a feature on its top contexts: the loss change, as JSON."""
    from saetui.analysis.causal import CausalSession

    check_feature = _feature_in(args.index, args.feature)
    rows = CausalSession(args.index).ablate(check_feature, args.contexts)
    print(json.dumps({"feature": args.feature, "contexts": rows}, indent=1))
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    """Generate from a prompt with features steered and without, as JSON."""
    from dataclasses import asdict

    from saetui.analysis.causal import CausalSession, parse_steering

    _check_index(args.index)
    features, options = parse_steering(" ".join(args.feature))
    options.setdefault("n_tokens", args.tokens)
    options.setdefault("mode", args.mode)
    if args.clamp:
        options["clamp"] = True
    result = CausalSession(args.index).steer(args.prompt, features, **options)
    record = asdict(result)
    record.update(steered_text=result.steered_text, unsteered_text=result.unsteered_text)
    print(json.dumps(record, indent=1))
    return 0


def _feature_in(index: Path, feature: int) -> int:
    from saetui.index import open_index

    _check_index(index)
    with open_index(index) as reader:
        d_sae = reader.meta.d_sae
    if not 0 <= feature < d_sae:
        raise SaetuiInputError(f"--feature {feature} is out of range: {index} has 0-{d_sae - 1}.")
    return feature


ECOSYSTEM_FORMATS = ("html", "delphi", "neuronpedia")


# export options that only some formats read: given to another, they would be ignored
FORMAT_OPTIONS = {
    "features": ("html", "neuronpedia"),
    "splits": ("delphi",),
    "hookpoint": ("delphi",),
    "model_id": ("neuronpedia",),
    "source_set": ("neuronpedia",),
}


def _check_format_options(args: argparse.Namespace) -> None:
    for option, formats in FORMAT_OPTIONS.items():
        if getattr(args, option) is not None and args.format not in formats:
            name = "--" + option.replace("_", "-")
            raise SaetuiInputError(
                f"{name} belongs to --format {' / '.join(formats)}; drop it for --format "
                f"{args.format}."
            )


def _export_ecosystem(args: argparse.Namespace) -> int:
    """The exports other tools read: static HTML pages, delphi's latent cache, Neuronpedia's
    import bundle."""
    if args.activation_db:
        raise SaetuiInputError(
            f"--activation-db belongs to --format sae_core; drop it for --format {args.format}."
        )
    if args.format == "html":
        _export_html(args)
    elif args.format == "delphi":
        _export_delphi(args)
    else:
        _export_neuronpedia(args)
    return 0


def _export_html(args: argparse.Namespace) -> None:
    from saetui.export.html import export_html

    report = export_html(
        args.index,
        args.out,
        features=args.features,
        n_examples=args.top_examples or 20,
        say=_say,
    )
    _say(
        f"html: {report.pages:,} feature pages, {report.bytes / 1e6:.1f} MB, {report.seconds:.1f} s"
    )
    print(report.out / "index.html")


def _export_delphi(args: argparse.Namespace) -> None:
    from saetui.export.delphi import export_delphi

    report = export_delphi(
        args.index,
        args.out,
        n_splits=5 if args.splits is None else args.splits,
        hookpoint=args.hookpoint,
        say=_say,
    )
    _say(
        f"delphi: {report.nonzeros:,} activations of {report.windows:,} windows in "
        f"{len(report.files)} files, {report.bytes / 1e6:.1f} MB, {report.seconds:.1f} s; "
        f"run delphi with --name pointing here and --hookpoints {report.hookpoint}"
    )
    if report.ctx_len % 32:
        _say(
            f"delphi: its examples default to 32 tokens, which must divide the windows' "
            f"{report.ctx_len}: run it with --example_ctx_len set to a divisor of "
            f"{report.ctx_len}"
        )
    print(report.out / "latents" / report.hookpoint)


def _export_neuronpedia(args: argparse.Namespace) -> None:
    from saetui.export.neuronpedia import export_neuronpedia

    report = export_neuronpedia(
        args.index,
        args.out,
        model_id=args.model_id,
        source_set=args.source_set,
        features=args.features,
        n_examples=args.top_examples or 20,
        say=_say,
    )
    _say(
        f"neuronpedia: {report.features:,} features, {report.activations:,} activations, "
        f"{report.explanations:,} explanations in {report.batches} batches, "
        f"{report.bytes / 1e6:.1f} MB, {report.seconds:.1f} s"
    )
    print(report.source_dir)


def cmd_share(args: argparse.Namespace) -> int:
    """Write a copy of an index without local paths and timestamps, compacted."""
    from saetui.index.share import share_copy

    print(share_copy(args.index, args.out, labels=not args.no_labels))
    return 0


def cmd_labels_import(args: argparse.Namespace) -> int:
    """Read feature labels (JSONL, Neuronpedia explanations) or a delphi run's explanations
    and scores into an index."""
    from saetui.export.labels import import_annotations

    _check_index(args.index)
    report = import_annotations(args.file, args.index, hookpoint=args.hookpoint)
    scores = (
        f" and {', '.join(report.scorers)} scores of {report.scores} features"
        if report.scores
        else ""
    )
    print(f"imported {report.labels} labels{scores} into {args.index}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Copy the finished shards of a distributed run into one index directory."""
    from saetui.index.merge import merge_indexes

    report = merge_indexes(args.shards, args.out, replace=args.overwrite)
    for shard in report.copied:
        print(f"copied shard {shard} into {args.out}")
    print(report.summary())
    return 0


def cmd_postings(args: argparse.Namespace) -> int:
    """Build (or continue, or extend) the per-feature postings of an index."""
    from saetui.index.postings import build_postings

    _check_index(args.index)
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

    _check_index(args.index)
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
        _say(
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


def _check_index(path: Path) -> None:
    """A missing path or a directory that is no saetui index: one sentence, exit 2."""
    from saetui.index.format import read_marker

    read_marker(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saetui",
        description="Explore the features of sparse autoencoders trained on language models.",
    )
    parser.add_argument("--version", action="version", version=f"saetui {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="run the main job on the embedded sample model, SAE and corpus"
    )
    _add_model_options(demo)
    _add_sae_options(demo, default=SAMPLE_SAE)
    _add_corpus_options(demo, default=SAMPLE_CORPUS)
    _add_collect_options(demo)
    demo.add_argument("--out", type=Path, help="index directory (default: in the user cache)")
    demo.add_argument(
        "--compare",
        type=Path,
        nargs="?",
        const=SAMPLE_SAE_SECOND,
        metavar="SAE",
        help="also collect the index of a second SAE (default: the sample's d_sae 1024 one) "
        "beside --out, and compare the two: the compare screen, or its summary with --headless",
    )
    demo.set_defaults(handler=cmd_demo)

    collect = commands.add_parser(
        "collect", help="collect an SAE's activations over a corpus into an index"
    )
    _add_model_options(collect)
    _add_sae_options(collect, default=None)
    _add_corpus_options(collect, default=None)
    _add_collect_options(collect)
    collect.add_argument("--out", type=Path, required=True, help="index directory")
    collect.set_defaults(handler=cmd_collect)

    merge = commands.add_parser(
        "merge", help="gather the shards of a distributed collection into one index"
    )
    merge.add_argument(
        "shards", type=Path, nargs="+", help="index directories holding finished shards"
    )
    merge.add_argument("--out", type=Path, required=True, help="the index directory to fill")
    merge.add_argument(
        "--overwrite", action="store_true", help="replace shards the output holds already"
    )
    merge.set_defaults(handler=cmd_merge)

    postings = commands.add_parser(
        "postings", help="build an index's per-feature postings (resumable), for saetui query"
    )
    postings.add_argument("index", type=Path, help="index directory")
    postings.add_argument(
        "--part-nnz",
        type=int,
        default=16_000_000,
        help="nonzeros transposed at once (memory ~ 8 bytes each; default 16M)",
    )
    postings.set_defaults(handler=cmd_postings)

    query = commands.add_parser(
        "query",
        help='search an index: f:123, f:1 & !f:2, f:3 > 2.5, tok:" the", re:/get/, doc:17',
    )
    query.add_argument("index", type=Path, help="index directory (with postings)")
    query.add_argument("expr", help="query expression")
    query.add_argument("--limit", type=int, default=20, help="matches to show (default 20)")
    query.add_argument("--offset", type=int, default=0, help="skip this many matches first")
    query.add_argument(
        "--by", choices=("value", "position"), default="value", help="order of the matches"
    )
    query.add_argument("--json", action="store_true", help="print JSON")
    query.set_defaults(handler=cmd_query)

    compare = commands.add_parser(
        "compare", help="match two SAEs' features: decoder cosines, co-firing, splits"
    )
    compare.add_argument("a", type=Path, help="index directory or SAE directory")
    compare.add_argument("b", type=Path, help="index directory or SAE directory")
    compare.add_argument("--json", type=Path, metavar="OUT", help="write the comparison as JSON")
    compare.add_argument(
        "--top", type=int, default=5, help="decoder neighbours per feature (default 5)"
    )
    compare.set_defaults(handler=cmd_compare)

    open_ = commands.add_parser("open", help="browse an index in the TUI")
    open_.add_argument("index", type=Path, help="index directory")
    open_.add_argument("--feature", type=int, help="open straight onto this feature")
    open_.add_argument(
        "--compare",
        type=Path,
        metavar="INDEX",
        help="a second index of the same corpus windows (another SAE): opens the compare screen",
    )
    open_.set_defaults(handler=cmd_open)

    export = commands.add_parser(
        "export", help="write an index's analysis as the old pipeline's files or as JSONL"
    )
    export.add_argument("index", type=Path, help="index directory")
    export.add_argument(
        "--format",
        choices=("sae_core", "jsonl", *ECOSYSTEM_FORMATS),
        default="sae_core",
        help="sae_core: the old pipeline's files; jsonl: everything the feature view shows; "
        "html: static pages to share (index.html + one page per feature); delphi: "
        "delphi's latent cache (safetensors per latent range); neuronpedia: the bundle "
        "Neuronpedia imports (gzipped JSONL batches)",
    )
    export.add_argument("--out", type=Path, required=True, help="output directory (or .jsonl)")
    export.add_argument(
        "--top-examples",
        type=int,
        help="examples per feature (default: 25 for sae_core, as the old pipeline; 20 for jsonl)",
    )
    export.add_argument(
        "--activation-db",
        action="store_true",
        help="sae_core: also write activation_database/activation_db_<ts>.pkl, the old "
        "pipeline's in-RAM pickle of every token and nonzero (large for big runs)",
    )
    export.add_argument(
        "--features",
        metavar="SPEC",
        help="html, neuronpedia: the features to write, e.g. '3,10-20,512' (default: html every "
        "feature that fired, neuronpedia every feature)",
    )
    export.add_argument(
        "--splits",
        type=int,
        help="delphi: files the latents are split into (delphi's n_splits, default 5)",
    )
    export.add_argument(
        "--hookpoint",
        help="delphi: the module name delphi knows the SAE by (default: layers.L for "
        "blocks.L.hook_resid_post, else the hook name)",
    )
    export.add_argument(
        "--model-id", help="neuronpedia: the model's id there (default: the model's name)"
    )
    export.add_argument(
        "--source-set",
        help="neuronpedia: the source set id (default saetui-<hook kind>-<width>, e.g. "
        "saetui-res-2k); the source is <layer>-<source set>",
    )
    export.set_defaults(handler=cmd_export)

    ablate = commands.add_parser(
        "ablate", help="loss change on a feature's top contexts when it is removed (JSON)"
    )
    ablate.add_argument("index", type=Path, help="index directory")
    ablate.add_argument("--feature", type=int, required=True, help="feature id")
    ablate.add_argument("--contexts", type=int, default=10, help="top contexts (default 10)")
    ablate.set_defaults(handler=cmd_ablate)

    steer = commands.add_parser(
        "steer", help="generate with features steered, beside the unsteered text (JSON)"
    )
    steer.add_argument("index", type=Path, help="index directory (its model and SAE are used)")
    steer.add_argument("--prompt", required=True, help="text to continue")
    steer.add_argument(
        "--feature", action="append", required=True, help="ID:STRENGTH, e.g. 123:8 (repeat)"
    )
    steer.add_argument("--tokens", type=int, default=20, help="tokens to generate")
    steer.add_argument("--mode", choices=("all", "prompt", "frozen"), default="all")
    steer.add_argument("--clamp", action="store_true", help="set the feature, don't add to it")
    steer.set_defaults(handler=cmd_steer)

    share = commands.add_parser(
        "share", help="copy an index without local paths and timestamps, to give to others"
    )
    share.add_argument("index", type=Path, help="index directory")
    share.add_argument("out", type=Path, help="new directory for the copy")
    share.add_argument("--no-labels", action="store_true", help="leave labels and notes out")
    share.set_defaults(handler=cmd_share)

    labels = commands.add_parser("labels", help="feature labels")
    label_commands = labels.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    label_import = label_commands.add_parser(
        "import",
        help="read labels from JSONL (feature/index + label/description/explanation), "
        "Neuronpedia explanation exports, or a delphi run's explanations and scores",
    )
    label_import.add_argument(
        "file",
        type=Path,
        help="JSONL file (.gz too), JSON array, folder of batch-<n>.jsonl.gz, or delphi run dir",
    )
    label_import.add_argument("index", type=Path, help="index directory")
    label_import.add_argument(
        "--hookpoint", help="delphi: the hookpoint whose results to import, when it has several"
    )
    label_import.set_defaults(handler=cmd_labels_import)

    info = commands.add_parser(
        "info", help="describe an SAE directory, or list the SAEs an index folder holds"
    )
    info.add_argument(
        "path",
        type=Path,
        nargs="?",
        help="an index, or a folder of indexes made by `saetui collect --sae A --sae B`",
    )
    info.add_argument("--sae", type=Path, help="SAE directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``saetui`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except SaetuiInputError as error:
        _say(f"saetui: error: {error}")
        return SaetuiInputError.exit_code
    except KeyboardInterrupt:
        _say("saetui: interrupted")
        return 130
    except Exception as error:  # a bug: one line here, the traceback in a file
        _say(f"saetui: internal error: {type(error).__name__}: {error}. {_save_traceback()}")
        return 1


def _save_traceback() -> str:
    """Write the current exception's traceback to the user cache; say where."""
    import time
    import traceback

    from saetui.lm.embedded import cache_root

    try:
        folder = cache_root() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"internal-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(traceback.format_exc())
    except OSError:
        return "Please report it with the command you ran."
    return f"Please report it with the traceback saved in {path}."


if __name__ == "__main__":
    sys.exit(main())
