"""Import feature labels: the old pipeline's LLM labeller output (JSONL of ``feature`` +
``label``), Neuronpedia explanation exports (``index`` + ``description``: a JSONL file,
gzipped or not, a JSON array, or a folder of ``batch-<n>.jsonl.gz`` files as its datasets
and saetui's Neuronpedia export hold them), and a delphi run's explanations and detection /
fuzzing scores (``explanations/``, ``scores/<scorer>/``)."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saetui.errors import SaetuiInputError

ID_FIELDS = ("feature", "index", "feature_id", "latent")
TEXT_FIELDS = ("label", "description", "explanation")


def _feature_id(record: dict[str, Any], where: str) -> int:
    for field in ID_FIELDS:
        if field in record:
            value = record[field]
            if isinstance(value, bool):
                break
            if isinstance(value, int):
                return value
            if isinstance(value, str) and value.strip().isdigit():
                return int(value)
            break
    raise SaetuiInputError(
        f"{where} has no feature id: expected an integer field {' or '.join(ID_FIELDS)}; "
        f"it has {', '.join(sorted(record)) or 'no fields'}."
    )


def read_labels(path: Path, d_sae: int | None = None) -> dict[int, tuple[str, str]]:
    """Labels by feature id; the last record wins when a feature appears twice.

    The label is the first of label/description/explanation present; the others (and a
    ``notes`` field) become the notes.
    """
    path = Path(path)
    if not path.exists():
        raise SaetuiInputError(
            f"Labels file {path} does not exist; give a JSONL file of "
            '{"feature": N, "label": ...} records.'
        )
    labels: dict[int, tuple[str, str]] = {}
    for where, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SaetuiInputError(
                f"{where} is not valid JSON ({error.msg}); fix or remove that line."
            ) from None
        if not isinstance(record, dict):
            raise SaetuiInputError(f"{where} is not a JSON object; expected one per line.")
        feature = _feature_id(record, where)
        if feature < 0 or (d_sae is not None and feature >= d_sae):
            raise SaetuiInputError(
                f"{where} names feature {feature}, outside this index's 0-{(d_sae or 1) - 1}; "
                "check that the labels belong to this SAE."
            )
        texts = [str(record[f]).strip() for f in TEXT_FIELDS if record.get(f)]
        if not texts:
            raise SaetuiInputError(
                f"{where} has no label text: expected one of {', '.join(TEXT_FIELDS)}."
            )
        notes = [t for t in texts[1:] if t != texts[0]]
        if record.get("notes"):
            notes.append(str(record["notes"]).strip())
        if record.get("explanationModelName"):  # Neuronpedia: who wrote the explanation
            notes.append(f"explained by {record['explanationModelName']}")
        labels[feature] = (texts[0], "\n".join(notes))
    if not labels:
        raise SaetuiInputError(f"Labels file {path} holds no records.")
    return labels


BATCH_FILE = re.compile(r"^batch-(\d+)\.jsonl(\.gz)?$")


def _lines(path: Path) -> Iterator[tuple[str, str]]:
    """(where, JSON text) of each record: lines of a JSONL file (gzipped or not), the items
    of a JSON array file, or the lines of a folder's batch-<n>.jsonl[.gz] files in order."""
    if path.is_dir():
        batches = sorted(
            (int(m.group(1)), p) for p in path.iterdir() if (m := BATCH_FILE.match(p.name))
        )
        if not batches and (path / "explanations").is_dir():  # a Neuronpedia source folder
            yield from _lines(path / "explanations")
            return
        if not batches:
            raise SaetuiInputError(
                f"{path} is a folder without batch-<n>.jsonl.gz files or delphi results; give "
                "a labels JSONL file, a Neuronpedia explanations folder or a delphi run."
            )
        for _, batch in batches:
            yield from _lines(batch)
        return
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip, whatever the name
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        raise SaetuiInputError(
            f"Labels file {path} is not UTF-8 text (a binary file?); give a JSONL file of "
            '{"feature": N, "label": ...} records.'
        ) from None
    if text.lstrip().startswith("["):  # an old Neuronpedia API export: one JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise SaetuiInputError(
                f"Labels file {path} is not valid JSON ({error.msg}); fix it or export JSONL."
            ) from None
        for number, item in enumerate(items, 1):
            yield f"Item {number} of {path}", json.dumps(item)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"Line {number} of {path}", line


@dataclass(frozen=True)
class LabelsImport:
    labels: int
    scores: int  # features that got a score
    scorers: tuple[str, ...]


def import_annotations(path: Path, index_path: Path, hookpoint: str | None = None) -> LabelsImport:
    """Store the labels (and, from a delphi run, the scores) that ``path`` holds."""
    from saetui.export.delphi import is_delphi_results, read_delphi_results
    from saetui.export.scores import scorer_names, store_feature_scores
    from saetui.index import open_index

    path = Path(path)
    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
        if is_delphi_results(path):
            explanations, scores = read_delphi_results(path, hookpoint)
            outside = [f for f in [*explanations, *scores] if not 0 <= f < d_sae]
            if outside:
                raise SaetuiInputError(
                    f"{path} names latent {outside[0]}, outside this index's 0-{d_sae - 1}; "
                    "check that the delphi run belongs to this SAE (and --hookpoint)."
                )
            labels: dict[int, str | tuple[str, str]] = {
                f: (text, "delphi explanation") for f, text in explanations.items()
            }
            stored = store_feature_scores(index, scores) if scores else 0
            if labels:
                index.set_labels(labels)
            return LabelsImport(len(labels), stored, tuple(scorer_names(scores)))
        if hookpoint is not None:
            raise SaetuiInputError(
                f"--hookpoint belongs to delphi results, and {path} is not a delphi run; drop it."
            )
        records: dict[int, str | tuple[str, str]] = dict(read_labels(path, d_sae))
        index.set_labels(records)
    return LabelsImport(len(records), 0, ())
