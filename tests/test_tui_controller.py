"""What the TUI calls outside Textual: the collection controller's bookkeeping (how a run
ended, the session's exit code, pause and quit requests) and the palette's exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_collect_config

from saetui.collect.controller import CollectionController
from saetui.collect.job import CollectProgress
from saetui.errors import SaetuiInputError


def controller(tmp_path: Path, **options) -> tuple[CollectionController, list]:
    config = tiny_collect_config(
        tmp_path / "index", tmp_path / "model", tmp_path / "sae", tmp_path / "c.json", **options
    )
    messages: list = []
    return CollectionController(config, lambda kind, payload: messages.append(kind)), messages


def test_a_browsing_session_has_nothing_to_start_or_stop():
    session = CollectionController(None, lambda kind, payload: None)
    assert session.start() is None
    assert session.request_stop() is None and session.request_quit() is None
    assert session.exit_code(index_finished=False) == 0


def test_a_stopped_run_is_paused_and_resumable(tmp_path):
    session, _ = controller(tmp_path)
    job = session.start()
    assert job is not None and session.collecting and session.start() is None
    session.receive("progress", CollectProgress("collecting", 100, 400, 50.0, 6.0))
    session.receive("outcome", (130, "stopped", "collecting", 120))
    end = session.ended(130, tokens_now=0)
    assert end is not None and end.phase == "paused" and not end.failed
    assert end.tokens == 120 and end.tokens_total == 400  # the target, for the resume
    assert "stopped while collecting at 120 tokens; p resumes" in end.note
    assert session.paused and not session.collecting
    assert session.exit_code(index_finished=False) == 130
    # started again: no longer paused, the old outcome forgotten
    assert session.start() is not None and not session.paused and session.outcome is None


def test_a_finished_run_exits_0_and_an_overwrite_reopens_the_index(tmp_path):
    session, _ = controller(tmp_path, overwrite=True)
    session.start()
    session.receive("outcome", (0, "finished", "done", 400))
    end = session.ended(0, tokens_now=0)
    assert end is not None and end.phase == "done" and end.reopen_index
    assert end.tokens_total is None and end.note == "Collection finished."
    assert session.exit_code(index_finished=True) == 0


def test_a_child_that_dies_without_an_outcome_is_a_failure(tmp_path):
    session, _ = controller(tmp_path)
    session.start()
    end = session.ended(1, tokens_now=64)
    assert end is not None and end.failed and end.phase == "failed" and end.tokens == 64
    assert session.collection_error == "the collector ended with exit code 1"
    assert not session.paused and session.exit_code(index_finished=False) == 1
    # a signal is a stop, not a failure
    session.start()
    end = session.ended(-15, tokens_now=64)
    assert end is not None and not end.failed and session.paused


def test_a_bad_input_ends_the_session(tmp_path):
    session, _ = controller(tmp_path)
    session.start()
    session.receive("input_error", "--max-tokens -1 is not a positive number.")
    assert session.ended(2, tokens_now=0) is None
    assert session.input_error == "--max-tokens -1 is not a positive number."


def test_quit_while_collecting_stops_first_and_a_second_quit_is_at_once(tmp_path):
    session, _ = controller(tmp_path)
    job = session.start()
    assert session.request_quit() is job  # not spawned: the stop cancels its start
    assert session.request_quit() is None
    session.launch(job)  # the cancelled child reports exit 130 and spawns nothing
    assert job.pid is None and job.exit_code == 130
    end = session.ended(130, tokens_now=0)
    assert end is not None and end.quit and end.phase == "paused"


def test_the_palette_exports_write_a_feature_the_labels_and_rows(tiny_index, tmp_path):
    from saetui.export.files import default_name, export_feature, export_labels, export_rows
    from saetui.index import open_index

    path = tmp_path / "index"
    shutil.copytree(tiny_index[2], path)
    with open_index(path) as index:
        index.set_label(3, "digits", "fires on numbers")
        feature = json.loads(
            export_feature(index, 3, tmp_path / default_name("feature", 3)).read_text()
        )
        labels = json.loads(export_labels(index, tmp_path / "out" / "labels.json").read_text())
        with pytest.raises(SaetuiInputError, match="is a directory"):
            export_labels(index, tmp_path)
    assert default_name("feature", 3) == "saetui-feature-3.json"
    assert feature["feature"] == 3 and feature["label"] == "digits"
    assert labels == {"3": {"label": "digits", "notes": "fires on numbers"}}
    rows = [{"feature": 3, "label": "digits"}]
    assert json.loads(export_rows(rows, tmp_path / "rows.json").read_text()) == rows


def test_a_finished_index_without_postings_gets_them_from_the_child(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    """Postings are on by default: opening a finished index that lacks them in the TUI runs
    the child (no model load) to build them; with --no-postings nothing starts."""
    import time

    from saetui.collect.pipeline import run_collection
    from saetui.index.postings import open_postings

    out = tmp_path / "index"
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, postings=False)
    assert run_collection(config).status == "finished"
    messages: list = []
    off = CollectionController(config, lambda kind, payload: messages.append((kind, payload)))
    off.launch(off.start())
    assert ("exit", 0) in messages and open_postings(out) is None

    messages.clear()
    config = tiny_collect_config(out, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file)
    assert config.postings is None  # the default: by the index's size
    session = CollectionController(config, lambda kind, payload: messages.append((kind, payload)))
    job = session.start()
    session.launch(job)
    deadline = time.monotonic() + 240
    while not any(kind == "exit" for kind, _ in messages) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ("exit", 0) in messages, messages
    postings = open_postings(out)
    assert postings is not None
    with postings:
        assert postings.parts() and sum(part.tokens for part in postings.parts()) > 0
