"""The ``saetui`` command line: one subcommand per job, user errors as one sentence + exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from saetui import __version__
from saetui.errors import SaetuiInputError

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_ROOT / "sample_data"
SAMPLE_CORPUS = SAMPLE_DATA / "corpus.json"
SAMPLE_SAE = SAMPLE_DATA / "sae"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from saetui.lm.model import DEFAULT_MODEL, NUMERICS, NUMERICS_HELP

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


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job on the embedded sample (model, SAE, corpus)."""
    from saetui.demo import run_demo

    return run_demo(args, say=_say)


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
    demo.add_argument("--headless", action="store_true", help="no TUI: print progress and results")
    demo.set_defaults(handler=cmd_demo, max_tokens=None)

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
