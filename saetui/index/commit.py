"""The commit thread of an `IndexWriter`: the one thread that owns a shard's LMDB write
transaction. It takes typed work items from a bounded queue, writes them, and commits
every ``commit_interval`` seconds (at once for a flush, checkpoint, finish or stop) with
the progress record in the same transaction, so a crash leaves exactly the last commit.
An error stops the thread; the caller's next call re-raises it once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from saetui.errors import SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.batch import WindowBatch
from saetui.index.records import SummarySnapshot, summary_record_chunks

SUMMARY_DBS = (fmt.DB_FSUM, fmt.DB_FHIST, fmt.DB_FTOPK, fmt.DB_FSAMP, fmt.DB_TTOK)


@dataclass
class Checkpoint:
    snapshot: SummarySnapshot | Future[SummarySnapshot]  # a future: taken in another thread


@dataclass
class NeighbourLists:
    metric: str
    ids: np.ndarray  # int64 [d_sae, N], < 0: empty slot
    scores: np.ndarray  # float32 [d_sae, N]


@dataclass
class Meta:
    key: bytes
    blob: bytes


@dataclass
class Flush:
    done: threading.Event


@dataclass
class Finish:
    pass


@dataclass
class Stop:
    pass


Item = WindowBatch | Checkpoint | NeighbourLists | Meta | Flush | Finish | Stop


class CommitThread:
    """Writes the queued items of one shard; see the module docstring."""

    def __init__(
        self,
        shared: envs.SharedEnv,
        index_path: Path,
        progress: dict[str, Any],
        fwd_tail: list[bytes],
        d_sae: int,
        commit_interval: float,
        queue_size: int,
    ) -> None:
        self.shared, self.env, self.dbs = shared, shared.env, shared.dbs
        self.path = index_path
        self.d_sae = d_sae
        self.committed = dict(progress)  # the last committed progress record
        self.fwd_tail = fwd_tail  # compressed blocks of the last, partly filled `fwd` chunk
        self.error: BaseException | None = None
        self._error_raised = False
        self._commit_interval = commit_interval
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=queue_size)
        self._holds_write_lock = False
        self._thread = threading.Thread(target=self._run, name="saetui-index-writer", daemon=True)
        self._thread.start()

    @property
    def tokens_committed(self) -> int:
        return int(self.committed["tokens"])

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def raise_pending(self) -> None:
        """Re-raise the thread's error in the caller, once; later calls say it stopped."""
        if self.error is None:
            return
        if not self._error_raised:
            self._error_raised = True
            raise self.error
        raise SaetuiInputError(
            f"the index writer for {self.path} stopped after an error: open it again to resume."
        )

    def error_unreported(self) -> bool:
        return self.error is not None and not self._error_raised

    def put(self, item: Item) -> None:
        """Queue ``item``, waiting while the queue is full; a sentence once stopped."""
        while True:
            if self.error is not None or not self._thread.is_alive():
                self.raise_pending()
                raise SaetuiInputError(f"the index writer for {self.path} is closed.")
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def flush(self) -> None:
        """Block until everything queued so far is committed (or the thread stopped)."""
        done = threading.Event()
        self.put(Flush(done))
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        txn: lmdb.Transaction[bytes] | None = None
        started = 0.0
        pending = dict(self.committed)
        last_trim = time.monotonic()
        try:
            while True:
                timeout = None
                if txn is not None:
                    timeout = max(0.0, self._commit_interval - (time.monotonic() - started))
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    self._commit(txn, pending)
                    txn = None
                    continue
                if txn is None:
                    txn = self._begin()
                    started = time.monotonic()
                if isinstance(item, WindowBatch):
                    self._write_data(txn, pending, item)
                elif isinstance(item, Checkpoint):
                    snap = item.snapshot
                    if isinstance(snap, Future):
                        snap = snap.result()
                    self._write_checkpoint(txn, pending, snap)
                    del snap
                elif isinstance(item, NeighbourLists):
                    self._write_neighbours(txn, item)
                elif isinstance(item, Meta):
                    txn.put(item.key, item.blob, db=self.dbs[fmt.DB_META])
                elif isinstance(item, Finish):
                    pending["finished"] = True
                flushed = item.done if isinstance(item, Flush) else None
                stop = isinstance(item, Stop)
                checkpoint = isinstance(item, Checkpoint)
                force = stop or checkpoint or flushed is not None or isinstance(item, Finish)
                if force or time.monotonic() - started >= self._commit_interval:
                    self._commit(txn, pending)
                    txn = None
                if checkpoint or time.monotonic() - last_trim > 2.0:
                    # glibc keeps freed batch temporaries (both threads) unless asked: RSS
                    # grew by ~1.5 GB between checkpoints in the 10M-token benchmark
                    del item  # a checkpoint's snapshot goes before the trim
                    _return_free_heap()
                    fmt.unmap_file_pages([self.shared.path / "data.mdb"])
                    last_trim = time.monotonic()
                if flushed is not None:
                    flushed.set()
                if stop:
                    return
        except BaseException as exc:  # re-raised in the caller's thread
            if txn is not None:
                with contextlib.suppress(lmdb.Error):
                    txn.abort()
            self._end()
            self.error = fmt.translate_lmdb_error(exc, self.path)

    def _begin(self) -> lmdb.Transaction[bytes]:
        """A write transaction, begun under the environment's write lock (see env.py)."""
        self.shared.write_lock.acquire()
        self._holds_write_lock = True
        try:
            return self.env.begin(write=True)
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        if self._holds_write_lock:
            self._holds_write_lock = False
            self.shared.write_lock.release()

    def _commit(self, txn: lmdb.Transaction[bytes] | None, pending: dict[str, Any]) -> None:
        if txn is None:
            return
        pending["commits"] += 1
        pending["updated"] = time.time()
        txn.put(fmt.META_PROGRESS, fmt.dumps(pending), db=self.dbs[fmt.DB_META])
        try:
            txn.commit()
        finally:
            self._end()
        self.committed = dict(pending)

    def _write_data(
        self, txn: lmdb.Transaction[bytes], pending: dict[str, Any], d: WindowBatch
    ) -> None:
        if pending["finished"]:
            pending["finished"] = False
        enc = codec.encode_batch(d.lens, d.tokens, d.segments, d.ids, codec.to_fp16(d.vals), d.mask)
        keys = [fmt.u64_key(d.first + i) for i in range(len(d.lens))]
        self._append(txn, fmt.DB_TOK, list(zip(keys, enc.tok_records, strict=True)))
        size = codec.FWD_CHUNK
        offset = d.first % size
        if len(self.fwd_tail) != offset:
            raise RuntimeError(f"forward chunk tail holds {len(self.fwd_tail)}, not {offset}")
        blobs = self.fwd_tail + enc.fwd_records
        chunk0 = d.first // size
        records = [
            (fmt.u64_key(chunk0 + i // size), codec.pack_chunk(blobs[i : i + size]))
            for i in range(0, len(blobs), size)
        ]
        if offset:  # the first chunk exists, partly filled: rewrite it in place
            txn.put(records[0][0], records[0][1], db=self.dbs[fmt.DB_FWD])
            records = records[1:]
        self._append(txn, fmt.DB_FWD, records)
        self.fwd_tail = blobs[len(blobs) - len(blobs) % size :] if len(blobs) % size else []
        pending["windows"] = d.first + len(d.lens)
        pending["tokens"] += enc.n_tokens
        pending["counted_tokens"] += enc.n_counted
        pending["nonzeros"] += enc.nnz

    def _append(
        self, txn: lmdb.Transaction[bytes], db: bytes, records: list[tuple[bytes, bytes]]
    ) -> None:
        """putmulti(append=True), checking the count: out-of-order keys are skipped silently."""
        if not records:
            return
        with txn.cursor(db=self.dbs[db]) as cur:
            _, added = cur.putmulti(records, append=True)
        if added != len(records):
            raise RuntimeError(
                f"append to {db.decode()} added {added} of {len(records)} records: "
                "keys out of order"
            )

    def _write_checkpoint(
        self, txn: lmdb.Transaction[bytes], pending: dict[str, Any], snap: SummarySnapshot
    ) -> None:
        for db in SUMMARY_DBS:
            txn.drop(self.dbs[db], delete=False)
        for name, records in summary_record_chunks(snap):
            self._append(txn, name.encode(), records)
        pending["summary_windows"] = snap.next_window
        pending["summary_serial"] += 1

    def _write_neighbours(self, txn: lmdb.Transaction[bytes], item: NeighbourLists) -> None:
        meta = self.dbs[fmt.DB_META]
        raw = txn.get(fmt.META_NBR_METRICS, db=meta)
        metrics: list[str] = json.loads(raw) if raw else []
        if item.metric not in metrics:
            if len(metrics) >= 255:
                raise SaetuiInputError("an index holds at most 255 neighbour metrics.")
            metrics.append(item.metric)
            txn.put(fmt.META_NBR_METRICS, fmt.dumps(metrics), db=meta)
        mid = metrics.index(item.metric)
        db = self.dbs[fmt.DB_FNBR]
        ids, scores = item.ids, item.scores
        for f in range(self.d_sae):
            ok = ids[f] >= 0
            rec = ids[f][ok].astype("<u4").tobytes() + scores[f][ok].astype("<f4").tobytes()
            txn.put(fmt.nbr_key(f, mid), rec, db=db)


def _return_free_heap() -> None:
    """Give freed heap back to the OS after a checkpoint's large temporaries (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
