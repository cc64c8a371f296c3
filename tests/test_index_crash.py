"""SIGKILL a real writer process at random points; resume must end identical to a clean run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from saetui.index import codec, open_index
from saetui.index.format import SHARD_DBS
from saetui.index.synthetic import SyntheticCorpus, write_synthetic

CORPUS = {"d_sae": 300, "ctx_len": 32, "k": 8, "seed": 5}
N_WINDOWS = 2500
# tiny intervals so kills land between commits, inside checkpoints and between them
WRITER = {"commit_interval": 0.01, "checkpoint_interval": 0.15}


def _dump(path: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Every record of every sub-db, except the volatile parts of the progress record."""
    env = lmdb.open(str(path / "shard-00000"), readonly=True, max_dbs=16, lib_version=0, lock=False)
    out = {}
    dbs = {name: env.open_db(name, create=False) for name in SHARD_DBS}
    with env.begin() as txn:
        for name, db in dbs.items():
            rows = []
            for k, v in txn.cursor(db=db):
                if name == b"meta" and k == b"progress":
                    p = json.loads(v)
                    for volatile in ("commits", "updated", "summary_serial"):
                        p.pop(volatile)
                    v = json.dumps(p, sort_keys=True).encode()
                elif name == b"meta" and k == b"shape":
                    s = json.loads(v)
                    s.pop("created")
                    v = json.dumps(s, sort_keys=True).encode()
                rows.append((bytes(k), bytes(v)))
            out[name] = rows
    env.close()
    return out


def _window_blocks(dump: dict[bytes, list[tuple[bytes, bytes]]]) -> list[bytes]:
    """Compressed forward block of every window, in order (records hold 8 windows each)."""
    return [blob for _, rec in dump[b"fwd"] for blob in codec.unpack_chunk(rec)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[bytes, list[tuple[bytes, bytes]]]:
    path = tmp_path_factory.mktemp("ref") / "index"
    write_synthetic(path, SyntheticCorpus(**CORPUS), N_WINDOWS, batch_windows=11)
    return _dump(path)


def _spawn(path: Path, batch_windows: int) -> subprocess.Popen:
    args = {
        "path": str(path),
        "n_windows": N_WINDOWS,
        "batch_windows": batch_windows,
        "corpus": CORPUS,
        "writer": WRITER,
    }
    return subprocess.Popen([sys.executable, "-m", "saetui.index.synthetic", json.dumps(args)])


def _wait_for_windows(path: Path, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open_index(path) as r:
                w = r.progress().windows
            if w >= at_least:
                return w
        except Exception:  # not created yet
            pass
        time.sleep(0.02)
    raise AssertionError("the writer made no progress")


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_then_resume_gives_identical_index(tmp_path, reference, trial):
    rng = random.Random(trial)
    path = tmp_path / "index"
    committed = []
    for _kill in range(2):  # two kills per trial, at random points, then a clean finish
        proc = _spawn(path, batch_windows=rng.choice([3, 5, 8]))
        try:
            _wait_for_windows(path, (committed[-1] if committed else 0) + 1)
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        # the killed index opens and every committed window is the reference's
        dump = _dump(path)
        with open_index(path) as r:
            p = r.progress()
            committed.append(p.windows)
            if p.windows < N_WINDOWS:
                assert not p.finished
        assert dump[b"tok"] == reference[b"tok"][: p.windows]
        assert _window_blocks(dump) == _window_blocks(reference)[: p.windows]
    write_synthetic(path, SyntheticCorpus(**CORPUS), N_WINDOWS, batch_windows=rng.choice([4, 9]))
    assert committed[0] < N_WINDOWS, "the first kill should land before the end"
    assert _dump(path) == reference
