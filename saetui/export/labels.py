"""Import feature labels from JSONL: the old pipeline's LLM labeller output
(``feature`` + ``label``) and Neuronpedia explanation exports (``index`` + ``description``
or ``explanation``)."""

from __future__ import annotations

import json
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
    if not path.is_file():
        raise SaetuiInputError(
            f"Labels file {path} does not exist; give a JSONL file of "
            '{"feature": N, "label": ...} records.'
        )
    labels: dict[int, tuple[str, str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SaetuiInputError(
            f"Labels file {path} is not UTF-8 text (a binary file?); give a JSONL file of "
            '{"feature": N, "label": ...} records.'
        ) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"Line {number} of {path}"
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
        labels[feature] = (texts[0], "\n".join(notes))
    if not labels:
        raise SaetuiInputError(f"Labels file {path} holds no records.")
    return labels


def import_labels(labels_path: Path, index_path: Path) -> int:
    """Store the labels of ``labels_path`` in the index; returns how many."""
    from saetui.index import open_index

    with open_index(index_path) as index:
        labels = read_labels(labels_path, index.meta.d_sae)
        index.set_labels(labels)
    return len(labels)
