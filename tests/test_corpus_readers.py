"""Corpus readers: every format, every user error, the sample corpus and the split."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import runpy
import sys
from pathlib import Path

import pytest

from saetui.corpus import content_hash, held_out_ids, read_corpus, split_documents
from saetui.errors import SaetuiInputError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "corpus.json"
# transformer-lens depends on datasets, so the extra is usually present.
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- JSON -------------------------------------------------------------------


def test_json_list_of_strings_skips_and_counts_empty(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.json", json.dumps(["first doc", "", "  \n ", " second "]))
    corpus = read_corpus(path)
    assert corpus.documents == ["first doc", " second "]  # kept as read
    assert corpus.skipped_empty == 2
    assert corpus.kind == "json"
    assert corpus.source == str(path)
    assert corpus.content_hash == content_hash(["first doc", " second "])
    assert corpus.doc_names is None


def test_json_objects_with_text_field_mixed_with_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps([{"body": "a"}, "b", {"body": "", "x": 1}]))
    corpus = read_corpus(path, text_field="body")
    assert corpus.documents == ["a", "b"]
    assert corpus.skipped_empty == 1


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (["a", "b", 5], r"Entry 2 of .*c\.json is a number, expected a string"),
        (["a", None], r"Entry 1 of .*c\.json is null, expected a string"),
        ([["nested"]], r"Entry 0 of .*c\.json is a list, expected a string"),
        (["a", {"body": "x", "id": 3}], r"entry 1 of .*c\.json .*without the field 'text'"),
        ([{"text": 7}], r"Field 'text' of entry 0 of .*c\.json is a number"),
    ],
)
def test_json_bad_entry_names_its_index(tmp_path: Path, entries: list, expected: str) -> None:
    path = write(tmp_path / "c.json", json.dumps(entries))
    with pytest.raises(SaetuiInputError, match=expected):
        read_corpus(path)


def test_json_missing_field_lists_the_fields_it_has(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps([{"body": "x", "id": 3}]))
    with pytest.raises(SaetuiInputError, match=r"its fields: 'body', 'id'.*--text-field"):
        read_corpus(path)


def test_json_invalid_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", '[\n"a",\n"b"\n"c"]')
    with pytest.raises(SaetuiInputError, match=r"c\.json is not valid JSON \(line 4"):
        read_corpus(path)


def test_json_not_a_list(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", json.dumps({"texts": ["a"]}))
    with pytest.raises(SaetuiInputError, match="holds an object, expected a JSON list"):
        read_corpus(path)


# --- JSONL ------------------------------------------------------------------


def test_jsonl_objects_strings_and_blank_lines(tmp_path: Path) -> None:
    lines = ['{"text": "one"}', "", '"two"', '{"text": "   "}', '{"text": "three", "id": 9}']
    corpus = read_corpus(write(tmp_path / "c.jsonl", "\n".join(lines) + "\n"))
    assert corpus.documents == ["one", "two", "three"]
    assert corpus.skipped_empty == 1
    assert corpus.kind == "jsonl"


def test_jsonl_text_field_and_ndjson(tmp_path: Path) -> None:
    path = write(tmp_path / "c.ndjson", '{"content": "x"}\n{"content": "y"}\n')
    assert read_corpus(path, text_field="content").documents == ["x", "y"]


def test_jsonl_invalid_json_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(SaetuiInputError, match=r"Line 3 of .*c\.jsonl is not valid JSON"):
        read_corpus(path)


def test_jsonl_missing_field_names_line_and_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n{"body": "b", "meta": {}}\n')
    with pytest.raises(
        SaetuiInputError, match=r"line 2 of .*without the field 'text' \(its fields: 'body', 'meta'"
    ):
        read_corpus(path)


def test_jsonl_non_string_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '"a"\n[1, 2]\n')
    with pytest.raises(SaetuiInputError, match=r"Line 2 of .*c\.jsonl is a list"):
        read_corpus(path)


def test_limit_docs_keeps_first_nonempty_and_stops_reading(tmp_path: Path) -> None:
    # The broken last line is never read: limit_docs stops the stream first.
    path = write(tmp_path / "c.jsonl", '"a"\n""\n"b"\n"c"\nnot json\n')
    corpus = read_corpus(path, limit_docs=2)
    assert corpus.documents == ["a", "b"]
    assert corpus.skipped_empty == 1
    with pytest.raises(SaetuiInputError, match="limit_docs is 0"):
        read_corpus(path, limit_docs=0)


# --- text files and directories --------------------------------------------


def test_txt_paragraphs_split_at_blank_lines(tmp_path: Path) -> None:
    text = "\n\nFirst line\nsame paragraph\n \t\nSecond\r\n\r\n\r\n  Third  \n"
    path = write(tmp_path / "c.txt", text.encode("utf-8"))
    corpus = read_corpus(path)
    assert corpus.documents == ["First line\nsame paragraph", "Second", "Third"]
    assert corpus.skipped_empty == 0  # blank lines are layout, not empty documents
    assert corpus.kind == "txt"


def test_single_markdown_file_reads_like_txt(tmp_path: Path) -> None:
    corpus = read_corpus(write(tmp_path / "notes.md", "# Title\n\nBody text.\n"))
    assert corpus.documents == ["# Title", "Body text."]


def test_directory_one_document_per_file_sorted(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    write(root / "b.txt", "bee")
    write(root / "a.md", "ay\n\nstill ay")
    write(root / "sub" / "c.TXT", "see")
    write(root / "empty.txt", "  \n")
    write(root / "skip.csv", "not a document")
    write(root / ".hidden" / "h.txt", "hidden")
    write(root / ".h.txt", "hidden")
    corpus = read_corpus(root)
    assert corpus.kind == "dir"
    assert corpus.documents == ["ay\n\nstill ay", "bee", "see"]
    assert corpus.doc_names == ["a.md", "b.txt", "sub/c.TXT"]
    assert corpus.skipped_empty == 1


def test_directory_without_text_files(tmp_path: Path) -> None:
    write(tmp_path / "d" / "x.csv", "a,b")
    with pytest.raises(SaetuiInputError, match=r"contains no \.txt or \.md files"):
        read_corpus(tmp_path / "d")


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", b"caf\xe9 au lait")
    with pytest.raises(SaetuiInputError, match="is not UTF-8 text"):
        read_corpus(path)


# --- paths, extensions, empty corpora --------------------------------------


@pytest.mark.parametrize("name", ["missing.json", "sub/dir/missing", "./missing", "my corpus"])
def test_missing_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(SaetuiInputError, match=r"does not exist; give a \.json"):
        read_corpus(str(tmp_path / name) if name.startswith("sub") else name)


def test_unknown_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "text\nhello\n")
    with pytest.raises(SaetuiInputError, match=r"c\.csv has the unknown extension '\.csv'"):
        read_corpus(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("c.json", "[]"), ("c.json", '["", " "]'), ("c.jsonl", "\n\n"), ("c.txt", " \n\n\t\n")],
)
def test_empty_corpus(tmp_path: Path, name: str, content: str) -> None:
    with pytest.raises(SaetuiInputError, match="holds no non-empty documents"):
        read_corpus(write(tmp_path / name, content))


# --- Hugging Face datasets (optional extra) ------------------------------------


@pytest.mark.parametrize("source", ["roneneldan/TinyStories", "wikitext", "hf:some/name"])
def test_dataset_name_without_extra(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SaetuiInputError, match=re.escape("pip install 'saetui[datasets]'")):
        read_corpus(source)


def test_saved_dataset_dir_without_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    write(tmp_path / "ds" / "state.json", "{}")
    write(tmp_path / "ds" / "dataset_info.json", "{}")
    with pytest.raises(SaetuiInputError, match=re.escape("pip install 'saetui[datasets]'")):
        read_corpus(tmp_path / "ds")


@pytest.mark.skipif(not HAS_DATASETS, reason="needs the datasets extra")
def test_saved_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    rows = datasets.Dataset.from_dict({"text": ["a", " ", "b"], "body": ["x", "y", "z"]})
    rows.save_to_disk(str(tmp_path / "one"))
    corpus = read_corpus(tmp_path / "one")
    assert (corpus.documents, corpus.skipped_empty, corpus.kind) == (["a", "b"], 1, "datasets")
    assert read_corpus(tmp_path / "one", text_field="body").documents == ["x", "y", "z"]
    with pytest.raises(SaetuiInputError, match=r"Row 0 of dataset .* no field 'missing'"):
        read_corpus(tmp_path / "one", text_field="missing")

    datasets.DatasetDict({"train": rows, "test": rows.select([2])}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert read_corpus(tmp_path / "dict", dataset_split="test").documents == ["b"]
    with pytest.raises(SaetuiInputError, match=r"has no split 'dev' \(it has: train, test\)"):
        read_corpus(tmp_path / "dict", dataset_split="dev")


# --- content hash -------------------------------------------------------------


def test_content_hash_sees_document_boundaries() -> None:
    assert content_hash(["ab", "c"]) != content_hash(["a", "bc"])
    assert content_hash(["ab", "c"]) == content_hash(["ab", "c"])
    assert content_hash(["ab"]) != content_hash(["ab", ""])


# --- sample corpus ------------------------------------------------------------


def test_sample_corpus_reads_and_has_its_shape() -> None:
    corpus = read_corpus(SAMPLE)
    assert len(corpus) > 1000
    assert corpus.skipped_empty == 0
    assert all(len(doc) >= 40 and doc == " ".join(doc.split()) for doc in corpus.documents)
    assert len(set(corpus.documents)) == len(corpus)
    assert SAMPLE.stat().st_size <= 1_500_000
    assert (SAMPLE.parent / "CORPUS_LICENSE.md").read_text().count("PSF License") == 1


def test_sample_corpus_script_reproduces_committed_file(tmp_path: Path) -> None:
    note = (SAMPLE.parent / "CORPUS_LICENSE.md").read_text()
    made_with = re.search(r"of Python (\d+\.\d+\.\d+)", note)
    assert made_with is not None
    here = ".".join(str(v) for v in sys.version_info[:3])
    if made_with.group(1) != here:
        pytest.skip(f"corpus made with Python {made_with.group(1)}, running {here}")
    script = runpy.run_path(str(REPO / "scripts" / "make_sample_corpus.py"))
    assert script["main"](["--out", str(tmp_path / "corpus.json")]) == 0
    assert (tmp_path / "corpus.json").read_bytes() == SAMPLE.read_bytes()
    assert (tmp_path / "CORPUS_LICENSE.md").read_text() == note


# --- train / held-out split ---------------------------------------------------


def test_split_is_deterministic_disjoint_and_sized() -> None:
    docs = [f"document number {i}" for i in range(200)]
    train, held_out = split_documents(docs, held_out_fraction=0.1, seed=0)
    assert len(held_out) == 20 and len(train) == 180
    assert set(train) | set(held_out) == set(docs) and not set(train) & set(held_out)
    assert split_documents(docs, 0.1, 0) == (train, held_out)
    assert train == [d for d in docs if d in set(train)]  # corpus order kept
    assert split_documents(docs, 0.1, seed=1)[1] != held_out


def test_split_depends_on_texts_not_order() -> None:
    docs = [f"paragraph {i}" for i in range(100)]
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    assert set(split_documents(docs)[1]) == set(split_documents(shuffled)[1])
    assert held_out_ids(docs, 0.0) == []
    with pytest.raises(SaetuiInputError, match=re.escape("held_out_fraction is 1.0")):
        held_out_ids(docs, 1.0)
