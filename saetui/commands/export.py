"""Handlers of the commands that write an index out or read into it: export (every format),
share, labels import, and the causal ones (ablate, steer)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saetui.commands.common import check_index, say
from saetui.errors import SaetuiInputError


def cmd_export(args: argparse.Namespace) -> int:
    """Write an index's analysis in the old pipeline's layout, or as JSONL."""
    from saetui.export.old_pipeline import export_jsonl, export_sae_core

    check_index(args.index)
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
        say=say,
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

    check_index(args.index)
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

    check_index(index)
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
        say=say,
    )
    say(
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
        say=say,
    )
    say(
        f"delphi: {report.nonzeros:,} activations of {report.windows:,} windows in "
        f"{len(report.files)} files, {report.bytes / 1e6:.1f} MB, {report.seconds:.1f} s; "
        f"run delphi with --name pointing here and --hookpoints {report.hookpoint}"
    )
    if report.ctx_len % 32:
        say(
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
        say=say,
    )
    say(
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

    check_index(args.index)
    report = import_annotations(args.file, args.index, hookpoint=args.hookpoint)
    scores = (
        f" and {', '.join(report.scorers)} scores of {report.scores} features"
        if report.scores
        else ""
    )
    print(f"imported {report.labels} labels{scores} into {args.index}")
    return 0
