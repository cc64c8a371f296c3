"""Read a text corpus from disk (or a Hugging Face dataset) into a list of documents.

Accepted sources, chosen by what ``source`` is:

- ``*.json``: a JSON list whose entries are strings (the old pipeline's
  ``list[str]`` format) or objects holding the text under ``text_field``;
  a list may mix both.
- ``*.jsonl`` / ``*.ndjson``: one JSON value per line, an object with
  ``text_field`` or a bare string; blank lines are ignored.
- ``*.txt`` / ``*.md`` file: one document per paragraph; paragraphs are
  separated by one or more blank (whitespace-only) lines, and a paragraph keeps
  its inner line breaks.
- a directory: every ``*.txt`` / ``*.md`` file below it (recursively, hidden
  files and folders left out) is one document, in sorted path order.
- a directory written by ``datasets.Dataset.save_to_disk``, or a name that is
  not a path (``roneneldan/TinyStories``, or ``hf:NAME`` to be explicit): read
  with the optional ``datasets`` package (``pip install 'saetui[datasets]'``).

Empty or whitespace-only documents are skipped and counted in
``Corpus.skipped_empty``; texts are otherwise kept exactly as read.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from saetui.errors import SaetuiInputError

CorpusKind = Literal["json", "jsonl", "txt", "dir", "datasets"]

_JSON_SUFFIXES = {".json"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_TEXT_SUFFIXES = {".txt", ".md"}
_BLANK_LINES = re.compile(r"\n(?:[ \t\f\v]*\n)+")
_EXPECTED = "a .json, .jsonl, .txt or .md file, or a directory of .txt/.md files"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_DATASETS_HINT = "pip install 'saetui[datasets]'"


@dataclass
class Corpus:
    """Documents of a corpus, in a deterministic order; document id = list index."""

    documents: list[str]
    skipped_empty: int
    source: str
    content_hash: str
    kind: CorpusKind
    # Per-document names where the source has them (file paths of a directory corpus).
    doc_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.documents)


def content_hash(documents: Iterable[str]) -> str:
    """sha256 over the texts, each length-prefixed so that boundaries count too."""
    digest = hashlib.sha256()
    for text in documents:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def read_corpus(
    source: str | Path,
    *,
    text_field: str = "text",
    dataset_split: str = "train",
    dataset_config: str | None = None,
    limit_docs: int | None = None,
) -> Corpus:
    """Read ``source`` (see the module docstring for formats) into a :class:`Corpus`.

    ``limit_docs`` keeps the first N non-empty documents (reading stops there,
    which matters for large JSONL files and streamed datasets).
    Raises :class:`SaetuiInputError` for anything a user can get wrong.
    """
    if limit_docs is not None and limit_docs < 1:
        raise SaetuiInputError(f"limit_docs is {limit_docs}; give a positive number of documents.")
    source_str = str(source)
    path = Path(source_str).expanduser()
    names: list[str] | None = None

    if source_str.startswith("hf:"):
        kind: CorpusKind = "datasets"
        texts = _read_hf_dataset(source_str[3:], text_field, dataset_split, dataset_config)
    elif path.is_dir():
        if _is_saved_dataset(path):
            kind = "datasets"
            texts = _read_saved_dataset(path, text_field, dataset_split)
        else:
            kind = "dir"
            files = _text_files(path)
            names = [f.relative_to(path).as_posix() for f in files]
            texts = (_read_text(f) for f in files)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in _JSON_SUFFIXES:
            kind = "json"
            texts = _read_json(path, text_field)
        elif suffix in _JSONL_SUFFIXES:
            kind = "jsonl"
            texts = _read_jsonl(path, text_field)
        elif suffix in _TEXT_SUFFIXES:
            kind = "txt"
            texts = iter(_paragraphs(_read_text(path)))
        else:
            raise SaetuiInputError(
                f"Corpus file {path} has the unknown extension '{path.suffix}'; "
                f"expected {_EXPECTED}."
            )
    elif _looks_like_path(source_str):
        raise SaetuiInputError(
            f"Corpus path {path} does not exist; give {_EXPECTED} (check the spelling)."
        )
    else:
        kind = "datasets"
        texts = _read_hf_dataset(source_str, text_field, dataset_split, dataset_config)

    documents, kept_names, skipped = _keep_nonempty(texts, names, limit_docs)
    if not documents:
        raise SaetuiInputError(
            f"Corpus {source_str} holds no non-empty documents ({skipped} empty skipped); "
            "give a corpus that contains text."
        )
    return Corpus(
        documents=documents,
        skipped_empty=skipped,
        source=source_str,
        content_hash=content_hash(documents),
        kind=kind,
        doc_names=kept_names,
    )


def _keep_nonempty(
    texts: Iterable[str], names: list[str] | None, limit_docs: int | None
) -> tuple[list[str], list[str] | None, int]:
    documents: list[str] = []
    kept_names: list[str] | None = [] if names is not None else None
    skipped = 0
    for index, text in enumerate(texts):
        if not text.strip():
            skipped += 1
            continue
        documents.append(text)
        if kept_names is not None and names is not None:
            kept_names.append(names[index])
        if limit_docs is not None and len(documents) >= limit_docs:
            break
    return documents, kept_names, skipped


def _looks_like_path(source: str) -> bool:
    """A missing source that looks like a path is a typo, not a dataset name."""
    if Path(source).suffix.lower() in _JSON_SUFFIXES | _JSONL_SUFFIXES | _TEXT_SUFFIXES:
        return True
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source:
        return True
    # Hub names are NAME or OWNER/NAME of word characters, dots and dashes.
    return _HUB_NAME.fullmatch(source) is None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SaetuiInputError(
            f"Corpus file {path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8."
        ) from None
    except OSError as exc:
        raise SaetuiInputError(
            f"Corpus file {path} cannot be read ({exc.strerror}); check its permissions."
        ) from None


def _paragraphs(text: str) -> list[str]:
    """Split at runs of blank lines; a paragraph keeps its inner newlines, ends trimmed.

    Blank lines are layout here, not empty documents, so they are not counted as skipped.
    """
    return [block.strip() for block in _BLANK_LINES.split(text) if block.strip()]


def _text_files(directory: Path) -> list[Path]:
    files = sorted(
        (
            f
            for f in directory.rglob("*")
            if f.suffix.lower() in _TEXT_SUFFIXES
            and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(directory).parts)
        ),
        key=lambda f: f.relative_to(directory).as_posix(),
    )
    if not files:
        raise SaetuiInputError(
            f"Corpus directory {directory} contains no .txt or .md files; "
            "put one document per .txt/.md file in it, or give a corpus file."
        )
    return files


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _text_of(value: Any, text_field: str, where: str, path: Path) -> str:
    """The text of one corpus entry (a string, or an object with ``text_field``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if text_field not in value:
            fields = ", ".join(repr(k) for k in list(value)[:10]) or "none"
            raise SaetuiInputError(
                f"{where} of {path} is an object without the field '{text_field}' "
                f"(its fields: {fields}); pass --text-field with the field that holds the text."
            )
        text = value[text_field]
        if not isinstance(text, str):
            raise SaetuiInputError(
                f"Field '{text_field}' of {where} of {path} is {_type_name(text)}, "
                "expected a string; fix that entry or choose another --text-field."
            )
        return text
    raise SaetuiInputError(
        f"{where[0].upper()}{where[1:]} of {path} is {_type_name(value)}, expected a string "
        f"(or an object with a '{text_field}' field); fix or remove that entry."
    )


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    raw = _read_text(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SaetuiInputError(
            f"Corpus file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}); fix the file, or name it .jsonl if it holds one JSON value per line."
        ) from None
    if not isinstance(data, list):
        raise SaetuiInputError(
            f"Corpus file {path} holds {_type_name(data)}, expected a JSON list of strings; "
            "wrap the documents in a list."
        )
    return (_text_of(entry, text_field, f"entry {i}", path) for i, entry in enumerate(data))


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise SaetuiInputError(
            f"Corpus file {path} cannot be read ({exc.strerror}); check its permissions."
        ) from None
    with handle:
        line_no = 0
        try:
            for line_no, line in enumerate(handle, start=1):  # line_no: used in the except
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SaetuiInputError(
                        f"Line {line_no} of {path} is not valid JSON ({exc.msg} at column "
                        f"{exc.colno}); each line must be one JSON object or string."
                    ) from None
                yield _text_of(value, text_field, f"line {line_no}", path)
        except UnicodeDecodeError:
            raise SaetuiInputError(
                f"Corpus file {path} is not UTF-8 text (after line {line_no}); convert it to UTF-8."
            ) from None


def _is_saved_dataset(directory: Path) -> bool:
    """A ``save_to_disk`` folder: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return (directory / "dataset_dict.json").is_file() or (
        (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file()
    )


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise SaetuiInputError(
            f"Corpus {what} is not a corpus file or directory, and reading it as a Hugging Face "
            f"dataset needs the optional extra: {_DATASETS_HINT} (or check the path)."
        ) from None
    return datasets


def _dataset_texts(rows: Iterable[dict[str, Any]], text_field: str, name: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if text_field not in row:
            fields = ", ".join(repr(k) for k in list(row)[:10])
            raise SaetuiInputError(
                f"Row {i} of dataset {name} has no field '{text_field}' (its fields: {fields}); "
                "pass --text-field with the field that holds the text."
            )
        text = row[text_field]
        if not isinstance(text, str):
            raise SaetuiInputError(
                f"Field '{text_field}' of row {i} of dataset {name} is {_type_name(text)}, "
                "expected a string; choose another --text-field."
            )
        yield text


def _read_hf_dataset(name: str, text_field: str, split: str, config: str | None) -> Iterator[str]:
    datasets = _import_datasets(name)
    # Streaming: only the documents kept (limit_docs) are ever downloaded.
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # the hub raises many types; all mean "cannot load that"
        raise SaetuiInputError(
            f"Corpus {name} is not a local file or directory, and loading it as a Hugging Face "
            f"dataset (split '{split}') failed ({type(exc).__name__}: {exc}); check the path, "
            "or the dataset name, split and network access."
        ) from None
    return _dataset_texts(rows, text_field, name)


def _read_saved_dataset(path: Path, text_field: str, split: str) -> Iterator[str]:
    datasets = _import_datasets(str(path))
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # corrupt or foreign folder: many exception types
        raise SaetuiInputError(
            f"Saved dataset {path} could not be loaded ({type(exc).__name__}: {exc}); "
            "save it again with datasets' save_to_disk."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SaetuiInputError(
                f"Saved dataset {path} has no split '{split}' (it has: {', '.join(loaded)}); "
                "pass --dataset-split with one of those."
            )
        loaded = loaded[split]
    return _dataset_texts(loaded, text_field, str(path))
