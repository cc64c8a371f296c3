"""The ``saetui`` command line: one subcommand per job, user errors as one sentence + exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from saetui import __version__
from saetui.errors import SaetuiInputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "sample_data"
SAMPLE_CORPUS = SAMPLE_DATA / "corpus.json"
SAMPLE_SAE = SAMPLE_DATA / "sae"


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
        default=default,
        required=default is None,
        help="SAE directory: sae_core, SAELens, sparsify or Gemma Scope format",
    )
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
        default=20_000,
        help="tokens for reconstruction and CE-loss metrics (default 20000)",
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
        "--gather",
        action="store_true",
        help="under torchrun with --shard-dir: copy the finished shards into the output",
    )


def cmd_info(args: argparse.Namespace) -> int:
    """Print what an SAE directory holds."""
    from saetui.sae import describe, load_sae

    sae = load_sae(args.sae)
    facts = describe(sae)
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def _collect_config(args: argparse.Namespace, out: Path) -> Any:
    from saetui.collect.inputs import RunInputs
    from saetui.collect.pipeline import CollectConfig

    return CollectConfig(
        out=out,
        inputs=RunInputs.from_namespace(args),
        metrics_tokens=args.metrics_tokens,
        overwrite=args.overwrite,
        shard_dir=args.shard_dir,
        gather=args.gather,
    )


def demo_index_path() -> Path:
    """Where ``saetui demo`` keeps its index (reused and resumed across runs)."""
    from saetui.lm.embedded import cache_root

    return cache_root() / "indexes" / "demo"


def _run_collection(args: argparse.Namespace, out: Path) -> int:
    """Headless, or the TUI with the collection in a background worker."""
    config = _collect_config(args, out)
    from saetui.collect.distributed import launched_by_torchrun

    if launched_by_torchrun():  # one rank of a torchrun job: no TUI, one rank prints
        from saetui.collect.headless import run_distributed

        return run_distributed(config, say=_say)
    if args.shard_dir is not None or args.gather:
        raise SaetuiInputError(
            "--shard-dir and --gather are for runs under torchrun (torchrun --nproc-per-node N "
            "-m saetui collect ...): leave them out for a single process."
        )
    if not args.headless and not _has_terminal():
        _say("saetui: no terminal to draw on (stdin or stderr is not a tty): running headless")
        args.headless = True
    if args.headless:
        from saetui.collect.headless import run_headless

        return run_headless(config, say=_say)
    from saetui.tui.app import run_app

    return run_app(out, collect=config)


def _has_terminal() -> bool:
    """Whether the TUI can run: it reads keys from stdin and draws on stderr."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job on the embedded sample (model, SAE, corpus)."""
    out = args.out or demo_index_path()
    if args.headless:
        _say(f"demo index: {out}")
    return _run_collection(args, out)


def cmd_collect(args: argparse.Namespace) -> int:
    """Collect an index from a model, an SAE and a corpus."""
    return _run_collection(args, args.out)


def cmd_open(args: argparse.Namespace) -> int:
    """Browse an existing index (the model loads lazily, only for the probe)."""
    from saetui.tui.app import run_app

    _check_index(args.index)
    if not _has_terminal():
        raise SaetuiInputError(
            "saetui open needs a terminal (stdin and stderr must be a tty); run it in a "
            "terminal, or use saetui export for a batch job."
        )
    return run_app(args.index)


def cmd_export(args: argparse.Namespace) -> int:
    """Write an index's analysis in the old pipeline's layout, or as JSONL."""
    from saetui.export.old_pipeline import export_jsonl, export_sae_core

    _check_index(args.index)
    if args.format == "jsonl":
        out = args.out if args.out.suffix == ".jsonl" else args.out / "features.jsonl"
        print(export_jsonl(args.index, out, n_examples=args.top_examples))
        return 0
    for path in export_sae_core(args.index, args.out, top_examples=args.top_examples, say=_say):
        print(path)
    return 0


def cmd_labels_import(args: argparse.Namespace) -> int:
    """Read feature labels from JSONL into an index."""
    from saetui.export.labels import import_labels

    _check_index(args.index)
    count = import_labels(args.file, args.index)
    print(f"imported {count} labels into {args.index}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Copy the finished shards of a distributed run into one index directory."""
    from saetui.index.merge import merge_indexes

    report = merge_indexes(args.shards, args.out, replace=args.overwrite)
    for shard in report.copied:
        print(f"copied shard {shard} into {args.out}")
    print(report.summary())
    return 0


def _check_index(path: Path) -> None:
    if not path.exists():
        raise SaetuiInputError(
            f"Index {path} does not exist; give the --out directory of a saetui collect run."
        )


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

    open_ = commands.add_parser("open", help="browse an index in the TUI")
    open_.add_argument("index", type=Path, help="index directory")
    open_.set_defaults(handler=cmd_open)

    export = commands.add_parser(
        "export", help="write an index's analysis as the old pipeline's files or as JSONL"
    )
    export.add_argument("index", type=Path, help="index directory")
    export.add_argument("--format", choices=("sae_core", "jsonl"), default="sae_core")
    export.add_argument("--out", type=Path, required=True, help="output directory (or .jsonl)")
    export.add_argument("--top-examples", type=int, default=20, help="examples per feature")
    export.set_defaults(handler=cmd_export)

    labels = commands.add_parser("labels", help="feature labels")
    label_commands = labels.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    label_import = label_commands.add_parser(
        "import", help="read labels from JSONL (feature/index + label/description/explanation)"
    )
    label_import.add_argument("file", type=Path, help="JSONL file of labels")
    label_import.add_argument("index", type=Path, help="index directory")
    label_import.set_defaults(handler=cmd_labels_import)

    info = commands.add_parser("info", help="describe an SAE directory")
    info.add_argument("--sae", type=Path, required=True, help="SAE directory")
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


if __name__ == "__main__":
    sys.exit(main())
