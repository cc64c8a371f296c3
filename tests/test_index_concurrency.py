"""Writers and readers in one process, and writers in two: nothing may wait forever.

The first version froze when `open_index` ran in the process whose writer thread held the
write transaction. These tests run the public API the way the TUI, the pipeline's
neighbours phase and a notebook do, with both cores busy, under a watchdog.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from conftest import run_with_watchdog

from saetui.errors import SaetuiInputError
from saetui.index import IndexWriter, open_index
from saetui.index import env as envs
from saetui.index.synthetic import SyntheticCorpus, write_synthetic

CORPUS = SyntheticCorpus(d_sae=256, ctx_len=32, k=8, seed=3)


def _writer(path, **options):
    return IndexWriter.create_or_resume(
        path,
        {"model": "synthetic", "seed": CORPUS.seed},
        CORPUS.d_sae,
        CORPUS.ctx_len,
        CORPUS.vocab(),
        commit_interval=options.pop("commit_interval", 0.01),
        checkpoint_interval=options.pop("checkpoint_interval", 0.05),
        **options,
    )


def test_readers_in_the_writers_process_never_wait_for_its_transaction(tmp_path, busy_cores):
    path = tmp_path / "index"
    open_before = envs.open_count()  # readers other tests left open
    writer = _writer(path)
    writer.add_windows(**CORPUS.windows(0, 8))
    writer.flush()
    stop = threading.Event()
    seen: list[int] = []

    def write() -> None:
        w = writer.next_window
        while not stop.is_set() and w < 1200:
            writer.add_windows(**CORPUS.windows(w, 6))
            w += 6
        writer.flush()

    def read() -> None:
        for i in range(150):
            with open_index(path) as reader:  # a fresh open each time, as the TUI does
                progress = reader.progress()
                seen.append(progress.windows)
                page = reader.features(sort="density", page_size=5)
                feature = int(page.feature[0])
                if i % 10 == 0:
                    reader.top_examples(feature, 5)
                    reader.token(progress.windows - 1, 0)
                    reader.set_label(feature, f"label {i}")  # the user store writes too

    writing = threading.Thread(target=lambda: run_with_watchdog(write, 120, "writer"))
    writing.start()
    try:
        run_with_watchdog(read, 120, "reader")
    finally:
        stop.set()
        writing.join(130)
        writer.close()
    assert seen == sorted(seen) and seen[-1] > seen[0]  # it read while the writer wrote
    with open_index(path) as reader:
        assert reader.progress().windows == writer.next_window
    assert envs.open_count() == open_before


def test_close_waits_for_reads_in_flight_and_later_reads_are_refused(tmp_path, busy_cores):
    path = tmp_path / "index"
    write_synthetic(path, CORPUS, 300)
    open_before = envs.open_count()
    reader = open_index(path)
    errors: list[BaseException] = []
    done = threading.Event()

    def hammer() -> None:
        try:
            while not done.is_set():
                reader.top_examples(int(reader.features(page_size=1).feature[0]), 20)
                reader.window(17)
        except SaetuiInputError as error:
            if "closed" not in str(error):
                errors.append(error)
        except BaseException as error:  # anything else is a failure
            errors.append(error)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    run_with_watchdog(reader.close, 30, "close")
    done.set()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert envs.open_count() == open_before
    with pytest.raises(SaetuiInputError, match="closed"):
        reader.progress()


def test_one_writer_per_shard_in_a_process_and_across_processes(tmp_path):
    path = tmp_path / "index"
    with _writer(path) as writer:
        writer.add_windows(**CORPUS.windows(0, 4))
        writer.flush()
        with pytest.raises(SaetuiInputError, match=r"another saetui writer \(pid \d+"):
            _writer(path)
    # another process holds the shard: refused with its pid, and nothing is changed
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from saetui.index import IndexWriter; "
                "from saetui.index.synthetic import SyntheticCorpus; "
                "c = SyntheticCorpus(d_sae=256, ctx_len=32, k=8, seed=3); "
                f"w = IndexWriter.create_or_resume({str(path)!r}, "
                "{'model': 'synthetic', 'seed': 3}, "
                "c.d_sae, c.ctx_len, c.vocab()); print('ready', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(SaetuiInputError, match=f"pid {holder.pid}"):
            _writer(path)
        with open_index(path) as reader:  # reading is never locked out
            assert reader.progress().windows == 4
    finally:
        holder.kill()
        holder.wait()
    with _writer(path) as writer:  # the lock died with its process
        assert writer.next_window == 4


def test_a_writer_after_a_reader_in_one_process_gets_a_sentence(tmp_path):
    path = tmp_path / "index"
    write_synthetic(path, CORPUS, 20)
    open_before = envs.open_count()
    with open_index(path), pytest.raises(SaetuiInputError, match="read-only in this process"):
        _writer(path)
    with _writer(path) as writer:
        assert writer.next_window == 20
    assert envs.open_count() == open_before
