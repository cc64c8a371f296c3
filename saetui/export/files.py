"""Small JSON exports the TUI offers (a feature, the labels, the table's rows): written
atomically to a path the user confirmed, errors as one sentence naming the path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from saetui.errors import SaetuiInputError


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (a temporary file renamed into place,
    so a failed export leaves nothing half-written); returns the absolute path."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise SaetuiInputError(f"{path} is a directory: give a file name ending in .json.")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise SaetuiInputError(
            f"cannot write {path}: {error.strerror or error}; choose a writable path."
        ) from None
    return path


def feature_json(index: Any, feature: int, n_examples: int = 50) -> dict[str, Any]:
    """One feature as the JSONL export writes it (one schema for the TUI and the CLI)."""
    from saetui.export.old_pipeline_records import feature_record

    return feature_record(index, feature, n_examples)


def labels_json(index: Any) -> dict[str, Any]:
    """Every label and note, by feature id."""
    return {
        str(f): {"label": label.label, "notes": label.notes}
        for f, label in sorted(index.labels().items())
    }


# ---------------------------------------------------------------------- the TUI's exports
# What the TUI's palette offers: each asks for a path (these names in the current
# directory by default) and writes there from a worker thread.


def default_name(kind: str, feature: int | None = None) -> str:
    """The file name an export of ``kind`` ("feature", "labels" or "table") suggests."""
    if kind == "feature":
        return f"saetui-feature-{feature}.json"
    return {"labels": "saetui-labels.json", "table": "saetui-features.json"}[kind]


def export_feature(index: Any, feature: int, path: str | Path) -> Path:
    """Write one feature (:func:`feature_json`) to ``path``; returns the absolute path."""
    return write_json(path, feature_json(index, feature))


def export_labels(index: Any, path: str | Path) -> Path:
    """Write every label and note (:func:`labels_json`) to ``path``."""
    return write_json(path, labels_json(index))


def export_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the feature table's rows (as the TUI's source lists them) to ``path``."""
    return write_json(path, rows)
