"""Exports in the layout, key names, dtypes and semantics the old analysis pipeline
(``sae_core``: ``run_comprehensive_analysis`` with ``SAEAnalyzer``) wrote, so notebooks
written against it (``interp_analysis.ipynb``) read them unchanged; plus a JSONL of
everything the feature view shows.

``sae_core`` layout under OUT (saetui's own keys are added beside the old ones)::

    config_<ts>.json                      timestamp, model_name, sae_path, layer, hook_name,
                                          data_path, batch_size
    results/analysis_results_<ts>.json    sparsity{l0_mean, l0_std, l1_mean, l1_std,
                                          n_features, n_tokens}, dead_features{n_dead,
                                          pct_dead (percent), threshold, use_training_metric},
                                          reconstruction{mse, explained_variance,
                                          cosine_similarity, original_std, residual_std,
                                          n_tokens}, ablation{baseline_loss, zero_ablation_loss,
                                          sae_reconstruction_loss, loss_recovered, n_batches},
                                          feature_summaries; both metric families beside them
    results/feature_summaries_<ts>.jsonl  one line per feature that fired (dead ones omitted):
                                          feature, activation_frequency (raw count),
                                          activation_fraction, mean_activation, top_examples
                                          (25) of token, activation, context, position,
                                          text_idx, global_idx
    matrices/feature_similarity_<ts>.npy  decoder cosine, float32 d_sae x d_sae
    matrices/feature_cooccurrence_<ts>.npy        phi correlation of firing, float32 [-1, 1]
    matrices/feature_cooccurrence_counts_<ts>.npy tokens on which both fired, int32
    activation_database/activation_db_<ts>.pkl    with ``activation_db=True``: the sparse
                                          activation matrix, token metadata, feature metadata
    SUMMARY_<ts>.json, README_<ts>.md     what was exported, from which run
    plots/training_history_<ts>.png       when the SAE has history.json and matplotlib is there

Tokens are the collection's counted tokens (no start tokens, no padding), numbered as the
old pipeline numbered them: documents in corpus order (``text_idx``), each from its first
text token (``position`` 0), ``global_idx`` running over that order. Contexts are up to 10
tokens either side within the token's own document, detokenised by the model's tokenizer.

This module writes the files; what they hold is computed in ``old_pipeline_records``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError
from saetui.export.old_pipeline_records import (
    OLD_TOP_EXAMPLES,
    Contexts,
    TokenOrder,
    activation_database,
    analysis_results,
    cooccurrence_counts,
    decoder_similarity,
    feature_record,
    feature_summaries,
    hook_parts,
    load_tokenizer,
    phi_correlation,
    token_order,
)

# A dense d_sae x d_sae float32 matrix above this many features would pass 1 GiB.
DENSE_MATRIX_MAX_FEATURES = 16_384
# Above this many tokens the activation database gets a warning: the old format holds one
# Python object per token (~150 bytes pickled) and every nonzero, all loaded into RAM.
ACTIVATION_DB_WARN_TOKENS = 1_000_000


def _timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def _staged(out: Path) -> tuple[Path, Callable[[], None]]:
    """A temporary sibling of ``out`` and a function that moves its content into ``out``:
    a failed export leaves nothing half-written behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))

    def publish() -> None:
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.rglob("*"):
            if item.is_file():
                target = out / item.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                item.replace(target)
        shutil.rmtree(staging, ignore_errors=True)

    return staging, publish


def export_jsonl(index_path: Path, out: Path, n_examples: int = 20) -> Path:
    """One JSON record per feature with everything the feature view shows."""
    from saetui.index import open_index

    with open_index(index_path) as index:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        with partial.open("w") as handle:
            for feature in range(index.meta.d_sae):
                handle.write(json.dumps(feature_record(index, feature, n_examples)) + "\n")
        partial.replace(out)
    return out


# ---------------------------------------------------------------------- the export


def export_sae_core(
    index_path: Path,
    out: Path,
    *,
    top_examples: int = OLD_TOP_EXAMPLES,
    activation_db: bool = False,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Write the old pipeline's files for the index at ``index_path`` into ``out``."""
    from saetui.index import open_index

    if top_examples < 1:
        raise SaetuiInputError(
            f"--top-examples {top_examples} must be at least 1 (the old pipeline wrote 25)."
        )
    ts = _timestamp()
    staging, publish = _staged(out)
    written: list[str] = []
    files: dict[str, str] = {}
    try:
        with open_index(index_path) as index:
            d_sae = index.meta.d_sae
            counted = index.progress().counted_tokens
            if activation_db and counted > ACTIVATION_DB_WARN_TOKENS:
                say(
                    f"the activation database holds {counted:,} tokens: the old format keeps "
                    "one Python object per token and every nonzero in RAM (about "
                    f"{_activation_db_bytes(index) / 1e9:.1f} GB to load); the index answers "
                    "the same questions without it"
                )
            order = token_order(index)
            tokenizer = load_tokenizer(index)
            if tokenizer is None:
                say(
                    f"the tokenizer of {index.meta.run_config.get('model')} could not be loaded "
                    "here: contexts join the index's token strings instead of detokenising"
                )
            (staging / "results").mkdir()
            name = f"results/analysis_results_{ts}.json"
            summaries_name = f"results/feature_summaries_{ts}.jsonl"
            results = analysis_results(index)
            results["feature_summaries"] = summaries_name
            (staging / name).write_text(json.dumps(results, indent=2))
            written.append(name)
            files["results"] = name
            alive: list[tuple[int, float]] = []
            contexts = Contexts(index, order, tokenizer)
            with (staging / summaries_name).open("w") as handle:
                for record in feature_summaries(index, order, contexts, top_examples):
                    alive.append((record["feature"], record["activation_frequency"]))
                    handle.write(json.dumps(record) + "\n")
            written.append(summaries_name)
            files["feature_summaries"] = summaries_name
            if d_sae <= DENSE_MATRIX_MAX_FEATURES:
                (staging / "matrices").mkdir()
                name = f"matrices/feature_similarity_{ts}.npy"
                np.save(staging / name, decoder_similarity(index).astype(np.float32))
                written.append(name)
                files["similarity_matrix"] = name
                counts = cooccurrence_counts(index)
                name = f"matrices/feature_cooccurrence_{ts}.npy"
                np.save(staging / name, phi_correlation(counts, counted))
                written.append(name)
                files["cooccurrence_matrix"] = name
                name = f"matrices/feature_cooccurrence_counts_{ts}.npy"
                np.save(staging / name, counts)
                written.append(name)
                files["cooccurrence_counts"] = name
            else:
                say(
                    f"d_sae {d_sae} is above {DENSE_MATRIX_MAX_FEATURES}: dense similarity and "
                    "co-occurrence matrices are skipped (the index keeps top-N neighbours)."
                )
            if activation_db:
                (staging / "activation_database").mkdir()
                name = f"activation_database/activation_db_{ts}.pkl"
                with (staging / name).open("wb") as handle:
                    pickle.dump(activation_database(index, order), handle, protocol=4)
                written.append(name)
                files["activation_db"] = name
            plot = _history_plot(index, staging, ts, say)
            if plot:
                written.append(plot)
            top = sorted(alive, key=lambda item: (-item[1], item[0]))[:10]
            summary = _summary(index, ts, results, [f for f, _ in top], order, files)
            summary["exported_files"] = written
            name = f"config_{ts}.json"
            (staging / name).write_text(json.dumps(_run_settings(index, ts), indent=2))
            written.append(name)
            (staging / f"SUMMARY_{ts}.json").write_text(json.dumps(summary, indent=2))
            (staging / f"README_{ts}.md").write_text(_readme(summary))
            written += [f"SUMMARY_{ts}.json", f"README_{ts}.md"]
        publish()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / name for name in written]


def _activation_db_bytes(index: Any) -> float:
    """Rough in-memory size of the old activation database: 8 bytes per nonzero (value and
    column) and ~200 bytes per token object."""
    return index.progress().nonzeros * 8 + index.progress().counted_tokens * 200


def _run_settings(index: Any, ts: str) -> dict[str, Any]:
    """The old ``config_<ts>.json``."""
    config = index.meta.run_config
    request = (index.get_meta("request") or {}).get("inputs", {})
    layer, hook_name = hook_parts(config.get("hook"))
    return {
        "timestamp": ts,
        "model_name": config.get("model"),
        "sae_path": config.get("sae_path"),
        "layer": layer,
        "hook_name": hook_name,
        "data_path": config.get("corpus"),
        "batch_size": request.get("batch_size"),
    }


def _summary(
    index: Any,
    ts: str,
    results: dict[str, Any],
    top_features: list[int],
    order: TokenOrder,
    files: dict[str, str],
) -> dict[str, Any]:
    """The old ``SUMMARY_<ts>.json`` keys, then saetui's."""
    config = index.meta.run_config
    layer, hook_name = hook_parts(config.get("hook"))
    sparsity, dead = results["sparsity"], results["dead_features"]
    reconstruction, ablation = results["reconstruction"], results["ablation"]
    return {
        "timestamp": ts,
        "model": config.get("model"),
        "sae_path": config.get("sae_path"),
        "layer": layer,
        "hook_name": hook_name,
        "dataset_size": len(np.unique(order.text_idx)),
        "n_tokens_processed": sparsity["n_tokens"],
        "n_features": sparsity["n_features"],
        "sparsity": {key: sparsity[key] for key in ("l0_mean", "l0_std", "l1_mean", "l1_std")},
        "dead_features": {"n_dead": dead["n_dead"], "pct_dead": dead["pct_dead"]},
        "reconstruction": {
            key: reconstruction[key] for key in ("mse", "explained_variance", "cosine_similarity")
        },
        "ablation": {
            key: ablation[key]
            for key in (
                "baseline_loss",
                "zero_ablation_loss",
                "sae_reconstruction_loss",
                "loss_recovered",
            )
        },
        "top_features": top_features,
        "files": files,
        "index": str(Path(index.path).resolve()),
        "run_config": config,
        "d_sae": index.meta.d_sae,
        "tokens": index.progress().tokens,
        "metrics": index.metrics(),
    }


def _history_plot(index: Any, staging: Path, ts: str, say: Callable[[str], None]) -> str | None:
    sae_path = index.meta.run_config.get("sae_path")
    history_file = Path(sae_path) / "history.json" if sae_path else None
    if history_file is None or not history_file.is_file():
        return None
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("training history found; install matplotlib (pip install matplotlib) to plot it")
        return None
    history = json.loads(history_file.read_text())
    series = {k: v for k, v in history.items() if isinstance(v, list) and v}
    figure, axes = plt.subplots(len(series), 1, figsize=(7, 2.2 * len(series)), squeeze=False)
    for axis, (key, values) in zip(axes[:, 0], series.items(), strict=True):
        axis.plot(values)
        axis.set_title(key)
    figure.tight_layout()
    (staging / "plots").mkdir(exist_ok=True)
    name = f"plots/training_history_{ts}.png"
    figure.savefig(staging / name, dpi=100)
    plt.close(figure)
    return name


def _readme(summary: dict[str, Any]) -> str:
    config = summary["run_config"]
    metrics = summary["metrics"]
    saelens = metrics.get("saelens", {})
    lines = [
        f"# SAE analysis {summary['timestamp']}",
        "",
        f"Exported by saetui from the index `{summary['index']}`.",
        "",
        (
            f"- model: {config.get('model')} ({config.get('numerics')} numerics), "
            f"hook `{config.get('hook')}`"
        ),
        (
            f"- SAE: `{config.get('sae_path')}` ({config.get('sae_architecture')}, "
            f"d_sae {summary['d_sae']})"
        ),
        (
            f"- corpus: `{config.get('corpus')}`, {summary['dataset_size']:,} documents, "
            f"{summary['n_tokens_processed']:,} tokens"
        ),
        "",
        "| metric | saetui | SAELens / SAEBench |",
        "|---|---|---|",
    ]
    pairs = (
        ("L0", "l0_mean", "l0"),
        ("explained variance", "explained_variance", "explained_variance"),
        ("MSE", "mse", "mse"),
        ("cosine", "cosine", "cossim"),
        ("CE loss recovered / ce_loss_score", "ce_loss_recovered", "ce_loss_score"),
        ("KL with SAE", "kl_clean_sae", "kl_div_with_sae"),
        ("dead fraction / frac_alive", "dead_fraction", "frac_alive"),
    )
    for label, ours, theirs in pairs:
        lines.append(f"| {label} | {_cell(metrics.get(ours))} | {_cell(saelens.get(theirs))} |")
    lines += [
        "",
        (
            "Old key names keep saetui's definitions (README: Metrics); the SAELens family is "
            "under `saelens` in `analysis_results` and `SUMMARY`."
        ),
        "",
        "Files:",
        "",
    ] + [f"- `{name}`" for name in summary["exported_files"]]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)
