"""The ``saetui`` command line: the argument tree (one subcommand per job) and ``main``, which
turns user errors into one sentence + exit 2. The handlers live in ``saetui.commands``, one
module per area; the names tests and scripts import from here are re-exported."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from saetui import __version__
from saetui.commands.browse import cmd_compare, cmd_open, cmd_postings, cmd_query
from saetui.commands.collect import (
    _collect_config,
    _collect_each,
    cmd_collect,
    cmd_demo,
    cmd_info,
    cmd_merge,
    compare_index_path,
    demo_index_path,
)
from saetui.commands.common import say as _say
from saetui.commands.export import (
    ECOSYSTEM_FORMATS,
    cmd_ablate,
    cmd_export,
    cmd_labels_import,
    cmd_share,
    cmd_steer,
)
from saetui.errors import SaetuiInputError

__all__ = [
    "SAMPLE_CORPUS",
    "SAMPLE_DATA",
    "SAMPLE_SAE",
    "SAMPLE_SAE_SECOND",
    "_collect_config",
    "_collect_each",
    "build_parser",
    "cmd_ablate",
    "cmd_collect",
    "cmd_compare",
    "cmd_demo",
    "cmd_export",
    "cmd_info",
    "cmd_labels_import",
    "cmd_merge",
    "cmd_open",
    "cmd_postings",
    "cmd_query",
    "cmd_share",
    "cmd_steer",
    "compare_index_path",
    "demo_index_path",
    "main",
]

# the sample ships inside the package (a link to the checkout's sample_data/ in a clone)
SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data"
SAMPLE_CORPUS = SAMPLE_DATA / "corpus.json"
SAMPLE_SAE = SAMPLE_DATA / "sae"
SAMPLE_SAE_SECOND = SAMPLE_DATA / "sae_1024"  # same model and hook, d_sae 1024: demo --compare


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
