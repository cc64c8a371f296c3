"""Exports in the layout the old analysis pipeline (``sae_core``) wrote, so existing
notebooks keep working, plus a JSONL of everything the feature view shows.

``sae_core`` layout under OUT::

    results/analysis_results_<ts>.json   sparsity, dead_features, reconstruction, ablation
    results/feature_summaries_<ts>.jsonl one feature per line: feature, activation_frequency,
                                         mean_activation, top_examples[token, activation,
                                         context, position, text_idx, global_idx]
    matrices/feature_similarity_<ts>.npy decoder cosine, d_sae x d_sae (small d_sae only)
    matrices/feature_cooccurrence_<ts>.npy co-occurrence counts, d_sae x d_sae (small d_sae only)
    SUMMARY_<ts>.json, README_<ts>.md    what was exported, from which run
    plots/training_history_<ts>.png      when the SAE has history.json and matplotlib is installed
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError

# A dense d_sae x d_sae float32 matrix above this many features would pass 1 GiB.
DENSE_MATRIX_MAX_FEATURES = 16_384


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


def analysis_results(index: Any) -> dict[str, Any]:
    """The old ``analysis_results`` JSON from an index's stored metrics and summaries."""
    metrics = index.metrics()
    d_sae = index.meta.d_sae
    page = index.features(sort="id", descending=False, page_size=d_sae)
    counts = np.asarray(page.count)
    tokens = max(index.progress().counted_tokens, 1)
    frequency = counts / tokens
    dead = np.flatnonzero(counts == 0)
    return {
        "config": index.meta.run_config,
        "sparsity": {
            "l0_mean": metrics.get("l0_mean"),
            "l0_std": metrics.get("l0_std"),
            "l1_mean": metrics.get("l1_mean"),
            "mean_activation_frequency": float(frequency.mean()),
            "median_activation_frequency": float(np.median(frequency)),
            "tokens": int(tokens),
        },
        "dead_features": {
            "count": int(len(dead)),
            "fraction": float(len(dead) / d_sae),
            "indices": dead.tolist(),
            "dense_1pct": int((frequency > 0.01).sum()),
            "dense_10pct": int((frequency > 0.10).sum()),
        },
        "reconstruction": {
            "mse": metrics.get("mse"),
            "explained_variance": metrics.get("explained_variance"),
            "explained_variance_legacy": metrics.get("explained_variance_legacy"),
            "fvu": metrics.get("fvu"),
            "cosine_similarity": metrics.get("cosine"),
            "l2_ratio": metrics.get("l2_ratio"),
            "tokens": metrics.get("tokens"),
        },
        "ablation": {
            "ce_loss_clean": metrics.get("ce_clean"),
            "ce_loss_with_sae": metrics.get("ce_with_sae"),
            "ce_loss_zero_ablation": metrics.get("ce_zero_ablation"),
            "ce_loss_recovered": metrics.get("ce_loss_recovered"),
            "kl_divergence": metrics.get("kl_clean_sae"),
            "tokens": metrics.get("ce_tokens"),
        },
    }


def _context_text(tokens: list[str], position: int, radius: int = 10) -> str:
    start = max(position - radius, 0)
    return "".join(tokens[start : position + radius + 1])


def feature_summaries(index: Any, top_examples: int = 20) -> Iterator[dict[str, Any]]:
    """One old-format summary per feature, in feature order."""
    for feature in range(index.meta.d_sae):
        stats = index.stats(feature)
        examples = []
        for example in index.top_examples(feature, top_examples):
            examples.append(
                {
                    "token": example.tokens[example.position],
                    "activation": float(example.value),
                    "context": _context_text(example.tokens, example.position),
                    "position": int(example.doc_offset),
                    "text_idx": int(example.doc_id),
                    "global_idx": int(example.global_index),
                }
            )
        yield {
            "feature": feature,
            "activation_frequency": float(stats.density),
            "mean_activation": float(stats.mean),
            "top_examples": examples,
        }


def feature_record(index: Any, feature: int, n_examples: int = 20) -> dict[str, Any]:
    """Everything the feature view shows, as JSON values."""
    detail = index.feature(feature, n_examples=n_examples)
    stats = detail.stats

    def example_json(example: Any) -> dict[str, Any]:
        return {
            "value": float(example.value),
            "window": int(example.window),
            "position": int(example.position),
            "doc_id": int(example.doc_id),
            "doc_offset": int(example.doc_offset),
            "global_index": int(example.global_index),
            "tokens": list(example.tokens),
            "activations": [round(float(a), 5) for a in example.activations],
        }

    return {
        "feature": feature,
        "label": detail.label.label if detail.label else None,
        "notes": detail.label.notes if detail.label else None,
        "count": int(stats.count),
        "density": float(stats.density),
        "mean": float(stats.mean),
        "std": float(stats.std),
        "max": float(stats.max),
        "histogram": {"counts": stats.histogram.tolist(), "bin_edges": stats.bin_edges.tolist()},
        "top_tokens": [[token, int(count)] for token, count in detail.top_tokens],
        "top_examples": [example_json(e) for e in detail.examples],
        "interval_samples": [
            {
                "low": float(s.low),
                "high": float(s.high),
                "examples": [example_json(e) for e in s.examples],
            }
            for s in detail.samples
        ],
        "neighbours": {
            metric: {"ids": n.ids.tolist(), "scores": [float(x) for x in n.scores]}
            for metric, n in detail.neighbours.items()
        },
    }


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


def _decoder_similarity(index: Any) -> np.ndarray:
    from saetui.sae import load_sae

    sae_path = index.meta.run_config.get("sae_path")
    if not sae_path or not Path(sae_path).exists():
        raise SaetuiInputError(
            f"The SAE this index was collected with ({sae_path}) is not there any more; the "
            "similarity matrix needs its decoder: restore it or export without matrices."
        )
    import torch

    w_dec = load_sae(sae_path).W_dec.detach().float()
    unit = torch.nn.functional.normalize(w_dec, dim=-1)
    return (unit @ unit.T).numpy()


def cooccurrence_counts(index: Any) -> np.ndarray:
    """Dense [d_sae, d_sae] int32 counts of tokens on which both features fired (the
    diagonal: tokens each feature fired on), from one scan of the forward index."""
    import scipy.sparse as sp

    d_sae = index.meta.d_sae
    counts = np.zeros((d_sae, d_sae), dtype=np.int32)
    for chunk in index.iter_forward():
        fired = sp.csr_matrix(
            (np.ones(len(chunk.feature_ids), np.int32), chunk.feature_ids, chunk.offsets),
            shape=(len(chunk.offsets) - 1, d_sae),
        )
        counts += (fired.T @ fired).toarray().astype(np.int32)
    return counts


def export_sae_core(
    index_path: Path,
    out: Path,
    *,
    top_examples: int = 20,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Write the old pipeline's files for the index at ``index_path`` into ``out``."""
    from saetui.index import open_index

    ts = _timestamp()
    staging, publish = _staged(out)
    written: list[str] = []
    try:
        with open_index(index_path) as index:
            d_sae = index.meta.d_sae
            results = staging / "results"
            results.mkdir()
            name = f"results/analysis_results_{ts}.json"
            (staging / name).write_text(json.dumps(analysis_results(index), indent=2))
            written.append(name)
            name = f"results/feature_summaries_{ts}.jsonl"
            with (staging / name).open("w") as handle:
                for record in feature_summaries(index, top_examples):
                    handle.write(json.dumps(record) + "\n")
            written.append(name)
            if d_sae <= DENSE_MATRIX_MAX_FEATURES:
                (staging / "matrices").mkdir()
                name = f"matrices/feature_similarity_{ts}.npy"
                np.save(staging / name, _decoder_similarity(index).astype(np.float32))
                written.append(name)
                name = f"matrices/feature_cooccurrence_{ts}.npy"
                np.save(staging / name, cooccurrence_counts(index))
                written.append(name)
            else:
                say(
                    f"d_sae {d_sae} is above {DENSE_MATRIX_MAX_FEATURES}: dense similarity and "
                    "co-occurrence matrices are skipped (the index keeps top-N neighbours)."
                )
            plot = _history_plot(index, staging, ts, say)
            if plot:
                written.append(plot)
            summary = {
                "timestamp": ts,
                "index": str(Path(index_path).resolve()),
                "run_config": index.meta.run_config,
                "d_sae": d_sae,
                "tokens": index.progress().tokens,
                "metrics": index.metrics(),
                "files": written,
            }
            (staging / f"SUMMARY_{ts}.json").write_text(json.dumps(summary, indent=2))
            (staging / f"README_{ts}.md").write_text(_readme(summary))
            written += [f"SUMMARY_{ts}.json", f"README_{ts}.md"]
        publish()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / name for name in written]


def _history_plot(index: Any, staging: Path, ts: str, say: Callable[[str], None]) -> str | None:
    sae_path = index.meta.run_config.get("sae_path")
    history_file = Path(sae_path) / "history.json" if sae_path else None
    if history_file is None or not history_file.is_file():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("training history found; install matplotlib (pip install 'saetui[plot]') to plot it")
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
    lines = [
        f"# SAE analysis {summary['timestamp']}",
        "",
        f"Exported by saetui from the index `{summary['index']}`.",
        "",
        f"- model: {config.get('model')} ({config.get('numerics')} numerics), "
        f"hook `{config.get('hook')}`",
        f"- SAE: `{config.get('sae_path')}` ({config.get('sae_architecture')}, "
        f"d_sae {summary['d_sae']})",
        f"- corpus: `{config.get('corpus')}`, {summary['tokens']:,} tokens",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in (
        "l0_mean",
        "explained_variance",
        "cosine",
        "ce_loss_recovered",
        "kl_clean_sae",
        "dead_fraction",
        "dense_1pct",
        "dense_10pct",
    ):
        if key in metrics:
            value = metrics[key]
            lines.append(
                f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
            )
    lines += ["", "Files:", ""] + [f"- `{name}`" for name in summary["files"]]
    return "\n".join(lines) + "\n"
