"""Neuronpedia's export bundle, as its SAEDashboard-to-Neuronpedia converter writes it and its
importer (``/api/admin/import``) reads it: under ``OUT/<model id>/<source id>/``

    release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl   one record each
    features/batch-<n>.jsonl.gz      rows of the ``Neuron`` table: density (frac_nonzero),
                                     activation histogram, logit effects (pos/neg),
                                     decoder-cosine neighbours (topkCosSim*), maxActApprox
    activations/batch-<n>.jsonl.gz   rows of ``Activation``: a window's tokens and this
                                     feature's value on each; top activations carry
                                     binMin -1 / binMax max / binContains -1, interval samples
                                     their interval and the share of activations inside it
    explanations/batch-<n>.jsonl.gz  rows of ``Explanation``: the user's labels

Field names, types and defaults follow Neuronpedia's ``db_models`` dataclasses and prisma
schema. Fields saetui has nothing for are written as the converter writes them when empty
([] or null). Ids are deterministic, so importing the same export twice adds nothing
(the importer inserts with ON CONFLICT DO NOTHING). Batches are written one at a time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError
from saetui.export.staging import Throttled, parse_feature_spec, staged_directory

# Neuronpedia's seeded default user (its .env.localhost DEFAULT_CREATOR_USER_ID): rows must
# name an existing user, and a fresh local instance has this one.
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"
FEATURES_PER_BATCH = 128
TOP_ACTIVATIONS = 20
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class NeuronpediaExport:
    out: Path
    source_dir: Path
    features: int
    activations: int
    explanations: int
    batches: int
    bytes: int
    seconds: float


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def _hook_kind(hook: str) -> str:
    name = hook.rsplit(".", 1)[-1]
    return {
        "hook_resid_post": "res",
        "hook_resid_pre": "res",
        "hook_resid_mid": "res-mid",
        "hook_mlp_out": "mlp",
        "hook_attn_out": "att",
        "hook_z": "att",
    }.get(name, _slug(name))


def default_names(index: Any) -> tuple[str, str, int]:
    """(model id, source set, layer) from the run: the model's name, e.g.
    ``saetui-res-2k`` for a residual SAE of 2048 features, and the hook's block."""
    config = index.meta.run_config
    model = _slug(Path(str(config.get("model") or "model")).name)
    hook = str(config.get("hook") or "")
    match = re.match(r"blocks\.(\d+)\.", hook)
    layer = int(match.group(1)) if match else 0
    d_sae = index.meta.d_sae
    width = f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)
    return model, f"saetui-{_hook_kind(hook)}-{width}", layer


def _round(values: Any) -> list[float]:
    return [round(float(v), 3) for v in values]


class _Ids:
    """Deterministic cuid-shaped ids (25 characters) per export source."""

    def __init__(self, seed: str) -> None:
        self._prefix = "c" + hashlib.sha1(seed.encode()).hexdigest()[:8]
        self._n = 0

    def __call__(self, kind: str) -> str:
        self._n += 1
        return f"{self._prefix}{kind[0]}{self._n:015x}"


def export_neuronpedia(
    index_path: Path,
    out: Path,
    *,
    model_id: str | None = None,
    source_set: str | None = None,
    features: str | None = None,
    n_examples: int = TOP_ACTIVATIONS,
    creator_id: str = DEFAULT_CREATOR_ID,
    say: Callable[[str], None] = print,
) -> NeuronpediaExport:
    """Write the bundle Neuronpedia imports for the index at ``index_path`` into ``out``."""
    from saetui.index import open_index

    started = time.perf_counter()
    with open_index(index_path) as index:
        default_model, default_set, layer = default_names(index)
        model_id = model_id or default_model
        source_set = source_set or default_set
        for option, value in (("--model-id", model_id), ("--source-set", source_set)):
            if not NAME.match(value):
                raise SaetuiInputError(
                    f"{option} {value!r} is not a Neuronpedia id: use lower-case letters, "
                    "digits, '.', '-' and '_', e.g. gpt2-small."
                )
        source_id = f"{layer}-{source_set}"
        chosen = parse_feature_spec(features, index.meta.d_sae)
        if chosen is None:
            chosen = np.arange(index.meta.d_sae)
        with staged_directory(Path(out), "neuronpedia") as staging:
            source_dir = staging / model_id / source_id
            for sub in ("features", "activations", "explanations"):
                (source_dir / sub).mkdir(parents=True)
            now = datetime.now().isoformat()
            meta = _metadata(index, model_id, source_set, source_id, creator_id, now)
            for name, record in meta.items():
                (source_dir / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
            counts = _write_batches(
                index, source_dir, chosen, model_id, source_id, creator_id, now, n_examples, say
            )
            size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    final = Path(out).expanduser().absolute()
    return NeuronpediaExport(
        out=final,
        source_dir=final / model_id / source_id,
        features=len(chosen),
        activations=counts[0],
        explanations=counts[1],
        batches=counts[2],
        bytes=size,
        seconds=time.perf_counter() - started,
    )


def _metadata(
    index: Any, model_id: str, source_set: str, source_id: str, creator: str, now: str
) -> dict[str, dict[str, Any]]:
    """The release, model, source set and source records (one line each)."""
    config = index.meta.run_config
    details = index.get_meta("run_details") or {}
    release = "saetui-" + source_set
    description = (
        f"saetui export: {config.get('hook')} of {config.get('model')}, d_sae "
        f"{index.meta.d_sae:,} ({config.get('sae_architecture')})"
    )
    return {
        "release": {
            "name": release,
            "description": description,
            "creatorName": "saetui",
            "creatorId": creator,
            "visibility": "PUBLIC",
            "isNewUi": False,
            "featured": False,
            "descriptionShort": description,
            "urls": [],
            "creatorEmail": None,
            "creatorNameShort": "saetui",
            "defaultSourceSetName": None,
            "defaultSourceId": None,
            "defaultUmapSourceIds": [],
            "createdAt": now,
        },
        "model": {
            "id": model_id,
            "instruct": model_id.endswith("-it") or "instruct" in model_id,
            "creatorId": creator,
            "displayNameShort": model_id,
            "displayName": model_id,
            "tlensId": None,
            "dimension": details.get("d_model"),
            "visibility": "PUBLIC",
            "defaultSourceSetName": None,
            "defaultSourceId": None,
            "inferenceEnabled": False,
            "layers": int(details.get("n_layers") or 0),
            "neuronsPerLayer": 0,
            "createdAt": now,
            "owner": "",
            "updatedAt": now,
            "website": None,
        },
        "sourceset": {
            "modelId": model_id,
            "name": source_set,
            "creatorId": creator,
            "hasDashboards": True,
            "visibility": "PUBLIC",
            "description": description,
            "type": "",
            "creatorName": "saetui",
            "urls": [],
            "creatorEmail": None,
            "releaseName": release,
            "defaultOfModelId": None,
            "defaultRange": 1,
            "defaultShowBreaks": True,
            "showDfa": False,
            "showCorrelated": False,
            "showHeadAttribution": False,
            "showUmap": False,
            "createdAt": now,
        },
        "source": {
            "id": source_id,
            "modelId": model_id,
            "setName": source_set,
            "creatorId": creator,
            "hasDashboards": True,
            "inferenceEnabled": False,
            "inferenceHosts": [],
            "saelensConfig": None,
            "saelensRelease": None,
            "saelensSaeId": None,
            "hfRepoId": None,
            "hfFolderId": None,
            "visibility": "PUBLIC",
            "defaultOfModelId": None,
            "hasUmap": False,
            "hasUmapLogSparsity": False,
            "hasUmapClusters": False,
            "num_prompts": int(index.progress().windows),
            "num_tokens_in_prompt": int(index.meta.ctx_len),
            "dataset": str(config.get("corpus") or ""),
            "notes": description,
            "createdAt": now,
        },
    }


def _write_batches(
    index: Any,
    source_dir: Path,
    chosen: np.ndarray,
    model_id: str,
    source_id: str,
    creator: str,
    now: str,
    n_examples: int,
    say: Callable[[str], None],
) -> tuple[int, int, int]:
    ids = _Ids(f"{model_id}/{source_id}")
    labels = index.labels()
    report = Throttled(say)
    n_activations = n_explanations = batches = 0
    for batch, first in enumerate(range(0, len(chosen), FEATURES_PER_BATCH)):
        part = chosen[first : first + FEATURES_PER_BATCH].tolist()
        name = f"batch-{batch}.jsonl.gz"
        with (
            gzip.open(source_dir / "features" / name, "wt", compresslevel=5) as features,
            gzip.open(source_dir / "activations" / name, "wt", compresslevel=5) as activations,
        ):
            explanations = []
            for feature in part:
                rows = activation_rows(
                    index, feature, model_id, source_id, creator, now, ids, n_examples
                )
                max_act = max((r["maxValue"] for r in rows), default=0.0)
                record = feature_row(index, feature, model_id, source_id, creator, now, max_act)
                features.write(json.dumps(record) + "\n")
                for row in rows:
                    activations.write(json.dumps(row) + "\n")
                n_activations += len(rows)
                label = labels.get(feature)
                if label is not None:
                    explanations.append(
                        {
                            "id": ids("explanation"),
                            "modelId": model_id,
                            "layer": source_id,
                            "index": str(feature),
                            "description": label.label,
                            "authorId": creator,
                            "embedding": None,
                            "triggeredById": None,
                            "typeName": None,
                            "explanationModelName": None,
                            "notes": label.notes or None,
                            "createdAt": now,
                        }
                    )
        if explanations:
            with gzip.open(source_dir / "explanations" / name, "wt", compresslevel=5) as handle:
                for row in explanations:
                    handle.write(json.dumps(row) + "\n")
            n_explanations += len(explanations)
        batches += 1
        done = min(first + FEATURES_PER_BATCH, len(chosen))
        report(f"neuronpedia: {done:,}/{len(chosen):,} features", final=done == len(chosen))
    return n_activations, n_explanations, batches


def feature_row(
    index: Any,
    feature: int,
    model_id: str,
    source_id: str,
    creator: str,
    now: str,
    max_act: float,
) -> dict[str, Any]:
    """One ``Neuron`` row (the converter's fields, in its order)."""
    stats = index.stats(feature)
    neighbours = index.neighbours(feature)
    cosine = neighbours.get("decoder_cosine")
    promoted, suppressed = neighbours.get("logit_promoted"), neighbours.get("logit_suppressed")
    counts = np.asarray(stats.histogram)
    edges = np.asarray(stats.bin_edges)
    nonzero = np.flatnonzero(counts)
    lo, hi = (int(nonzero[0]), int(nonzero[-1]) + 1) if len(nonzero) else (0, 0)
    centres = np.sqrt(edges[lo:hi] * edges[lo + 1 : hi + 1])  # geometric: the bins are log-spaced
    return {
        "modelId": model_id,
        "layer": source_id,
        "index": str(feature),
        "creatorId": creator,
        "createdAt": now,
        "maxActApprox": float(max_act or stats.max),
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": 10,
        "hookName": None,
        "topkCosSimIndices": [] if cosine is None else [int(i) for i in cosine.ids],
        "topkCosSimValues": [] if cosine is None else _round(cosine.scores),
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [],
        "correlated_features_pearson": [],
        "correlated_features_l1": [],
        "neg_str": [] if suppressed is None else index.token_strings(suppressed.ids),
        "neg_values": [] if suppressed is None else _round(suppressed.scores),
        "pos_str": [] if promoted is None else index.token_strings(promoted.ids),
        "pos_values": [] if promoted is None else _round(promoted.scores),
        "frac_nonzero": float(stats.density),
        "freq_hist_data_bar_heights": [float(c) for c in counts[lo:hi]],
        "freq_hist_data_bar_values": _round(centres),
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
        "sourceSetName": None,
    }


def activation_rows(
    index: Any,
    feature: int,
    model_id: str,
    source_id: str,
    creator: str,
    now: str,
    ids: Callable[[str], str],
    n_examples: int,
) -> list[dict[str, Any]]:
    """``Activation`` rows: the top activations, then the interval samples."""
    stats = index.stats(feature)
    if stats.count == 0:
        return []
    rows = [
        _activation(example, -1.0, float(stats.max), -1.0)
        for example in index.top_examples(feature, n_examples)
    ]
    counts = np.asarray(stats.histogram)
    edges = np.asarray(stats.bin_edges)
    for interval in index.interval_samples(feature):
        inside = (edges[:-1] >= interval.low) & (edges[1:] <= interval.high)
        share = float(counts[inside].sum()) / max(int(stats.count), 1)
        rows.extend(
            _activation(example, interval.low, interval.high, share)
            for example in interval.examples
        )
    for row in rows:
        row.update(
            id=ids("activation"),
            index=str(feature),
            layer=source_id,
            modelId=model_id,
            creatorId=creator,
            createdAt=now,
        )
    return rows


def _activation(example: Any, bin_min: float, bin_max: float, contains: float) -> dict[str, Any]:
    values = _round(example.activations)
    top = int(np.argmax(values)) if values else 0
    return {
        "id": "",
        "tokens": list(example.tokens),
        "index": "",
        "layer": "",
        "modelId": "",
        "maxValue": values[top] if values else 0.0,
        "maxValueTokenIndex": top,
        "minValue": min(values) if values else 0.0,
        "values": values,
        "creatorId": "",
        "dataSource": None,
        "dataIndex": None,
        "dfaValues": [],
        "dfaTargetIndex": None,
        "dfaMaxValue": None,
        "createdAt": "",
        "lossValues": [],
        "logitContributions": None,
        "binMin": float(bin_min),
        "binMax": float(bin_max),
        "binContains": float(contains),
        "qualifyingTokenIndex": int(example.position),
        "zIndices": None,
        "zValues": None,
    }
