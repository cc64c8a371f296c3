"""IndexWriter: appends windows to one shard of an index from the caller's thread.

The caller's side checks each batch, feeds the per-feature summaries (in a helper thread
on the CPU) and schedules checkpoints; one commit thread (`commit.py`) owns the LMDB
write transaction, fed by a bounded queue. A shard's identity records and the checks of
a resumed shard are in `shard_meta.py`.

Crash safety: window records, forward blocks and the progress record are written in the
same transaction, so after a crash the index holds exactly the windows up to the last
commit. Per-feature summaries are checkpointed every `checkpoint_interval` seconds (and on
close) in the same way; on resume the writer loads the last checkpoint and replays the
committed windows after it from the forward index. Summaries are batch-order independent
(see summary.py), so the resumed index ends identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from saetui.errors import IndexDamagedError, SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.batch import ArrayInput, as_numpy, check_batch
from saetui.index.commit import (
    Checkpoint,
    CommitThread,
    Finish,
    Meta,
    NeighbourLists,
    Stop,
)
from saetui.index.env import WriterLock
from saetui.index.layout import ShardLayout, solo_layout
from saetui.index.records import SummarySnapshot, load_snapshot_records
from saetui.index.shard_meta import Identity, check_directory, check_identity, start_or_check
from saetui.index.summary import FeatureSummaries

TOKEN_METRIC_PREFIX = "logit_"


class IndexWriter:
    """Appends windows to one shard of an index; use `create_or_resume` to get one."""

    _writer_lock: WriterLock

    def __init__(self) -> None:  # pragma: no cover - use create_or_resume
        raise TypeError("use IndexWriter.create_or_resume(...)")

    # ---------------------------------------------------------------- opening

    @classmethod
    def create_or_resume(
        cls,
        path: str | Path,
        run_config: dict[str, Any],
        d_sae: int,
        ctx_len: int,
        vocab: Sequence[str],
        overwrite: bool = False,
        *,
        shard: int = 0,
        top_k: int = 64,
        samples_per_bin: int = 3,
        summary_device: str | torch.device = "cpu",
        commit_interval: float = 0.5,
        checkpoint_interval: float = 30.0,
        map_size: int = fmt.DEFAULT_MAP_SIZE,
        queue_size: int = 4,
        layout: ShardLayout | None = None,
    ) -> IndexWriter:
        """Open shard `shard` of the index at `path` for appending.

        A new index is created; an existing one whose run config, d_sae, ctx_len, vocabulary
        and summary sizes match resumes after its last commit (see `next_window`); a
        mismatch raises SaetuiInputError naming the differing fields unless `overwrite`,
        which deletes this shard's data first (user labels are kept).

        `layout`: this shard is rank `layout.rank` of a distributed collection and takes
        the global windows the layout deals it (see layout.py); None (or a world of one):
        the shard numbers its windows 0, 1, 2, ... by itself.
        """
        path = Path(path)
        layout = solo_layout(layout)
        identity = check_identity(
            run_config, d_sae, ctx_len, vocab, top_k, samples_per_bin, shard, layout
        )
        created_dir = not path.exists()
        check_directory(path)
        sdir = fmt.shard_dir(path, shard)
        lock: WriterLock | None = None
        shared: envs.SharedEnv | None = None
        try:
            path.mkdir(parents=True, exist_ok=True)
            sdir.mkdir(exist_ok=True)
            lock = WriterLock(sdir, path)  # before anything is deleted or written
            if overwrite:
                for name in ("data.mdb", "lock.mdb"):
                    (sdir / name).unlink(missing_ok=True)
            if not (path / fmt.MARKER_FILE).exists():
                fmt.write_marker(path)
            shared = envs.acquire(
                sdir, fmt.SHARD_DBS, write=True, map_size=envs.writer_map_size(map_size)
            )
        except BaseException:
            if lock is not None:
                lock.release()
            if created_dir:
                shutil.rmtree(path, ignore_errors=True)
            raise
        self = object.__new__(cls)
        self._writer_lock = lock
        try:
            self._init(
                path,
                sdir,
                shared,
                shard,
                layout,
                identity,
                summary_device,
                commit_interval,
                checkpoint_interval,
                queue_size,
            )
        except BaseException:
            envs.release(shared)
            lock.release()
            if created_dir:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return self

    def _init(
        self,
        path: Path,
        sdir: Path,
        shared: envs.SharedEnv,
        shard: int,
        layout: ShardLayout | None,
        identity: Identity,
        summary_device: str | torch.device,
        commit_interval: float,
        checkpoint_interval: float,
        queue_size: int,
    ) -> None:
        self.path, self.shard_path, self.shard = path, sdir, shard
        self.layout = layout
        self._shared = shared
        self._env = env = shared.env
        self._dbs = shared.dbs
        self.d_sae, self.ctx_len = identity.d_sae, identity.ctx_len
        self.vocab_size = len(json.loads(identity.vocab_json))
        progress = start_or_check(shared, path, shard, layout, identity)
        self._summaries = FeatureSummaries(
            self.d_sae,
            self.ctx_len,
            identity.record["top_k"],
            identity.record["samples_per_bin"],
            summary_device,
        )
        self._restore_summaries(int(progress["windows"]))
        # on the CPU the summary merge runs in its own thread (torch kernels release the
        # GIL), overlapping the caller's next batch and the writer thread's encoding; on an
        # accelerator it stays in the caller's thread, where it is cheap
        self._sum_futures: deque[Future[None]] = deque()
        self._sum_pool = (
            ThreadPoolExecutor(1, thread_name_prefix="saetui-index-summaries")
            if self._summaries.device.type == "cpu"
            else None
        )
        self._snapshot_window = int(progress["summary_windows"])
        # compressed blocks of the last, partly filled `fwd` chunk (rewritten as it fills)
        committed = int(progress["windows"])
        fwd_tail: list[bytes] = []
        if committed % codec.FWD_CHUNK:
            with env.begin() as txn:
                rec = txn.get(fmt.u64_key(committed // codec.FWD_CHUNK), db=self._dbs[fmt.DB_FWD])
            if rec is None:
                raise self._damaged(f"the forward record of window {committed - 1}")
            fwd_tail = codec.unpack_chunk(rec)
        self._local_next = committed
        self.next_window = self._global(self._local_next)
        self._checkpoint_interval = checkpoint_interval
        # readers see summaries as of the last checkpoint: the first ones come after 2, 4,
        # 8, ... seconds, so a TUI browsing a fresh collection sees features at once, and
        # the interval grows to checkpoint_interval (a few extra checkpoints in all)
        self._next_interval = min(2.0, checkpoint_interval)
        self._last_checkpoint = time.monotonic()
        self._closed = False
        self._committer = CommitThread(
            shared, path, progress, fwd_tail, self.d_sae, commit_interval, queue_size
        )

    def _restore_summaries(self, end: int) -> None:
        """Load the last summary checkpoint and replay committed windows after it."""
        with self._env.begin() as txn:
            snap = load_snapshot_records(txn, self._dbs, self.d_sae)
        if snap is not None:
            self._summaries.load_snapshot(snap)
        start = self._summaries.next_window
        chunk = 256
        for a in range(start, end, chunk):
            b = min(end, a + chunk)
            self._replay(a, b)

    def _damaged(self, what: str) -> IndexDamagedError:
        return IndexDamagedError(
            f"shard {self.shard} of the index {self.path} lacks {what} although it is "
            "committed: restore the index from a copy, or pass overwrite to rebuild it."
        )

    @overload
    def _global(self, local: int) -> int: ...
    @overload
    def _global(self, local: np.ndarray) -> np.ndarray: ...
    def _global(self, local: int | np.ndarray) -> int | np.ndarray:
        """Global window id(s) of this shard's local window id(s)."""
        if self.layout is None:
            return local if isinstance(local, int) else np.asarray(local, dtype=np.int64)
        return self.layout.global_window(local)

    def _replay(self, first: int, end: int) -> None:
        """Feed committed windows [first, end) (local ids) back into the summaries."""
        lengths, tokens, masks, blocks = [], [], [], []
        with self._env.begin() as txn:
            for w in range(first, end):
                tok = txn.get(fmt.u64_key(w), db=self._dbs[fmt.DB_TOK])
                chunk = txn.get(fmt.u64_key(w // codec.FWD_CHUNK), db=self._dbs[fmt.DB_FWD])
                fwd = None if chunk is None else codec.chunk_blob(chunk, w % codec.FWD_CHUNK)
                if tok is None or fwd is None:
                    raise self._damaged(f"window {w}")
                rec, blk = codec.decode_window(tok), codec.decode_forward(fwd)
                lengths.append(len(rec.token_ids))
                tokens.append(rec.token_ids)
                masks.append(rec.mask)
                blocks.append(blk)
        counts = np.concatenate([np.diff(b.offsets) for b in blocks])
        width = max(1, int(counts.max()) if len(counts) else 1)
        n = len(counts)
        ids = np.zeros((n, width), dtype=np.int64)
        vals = np.zeros((n, width), dtype=np.float32)
        row = np.repeat(np.arange(n), counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        col = np.arange(int(counts.sum())) - np.repeat(starts, counts)
        ids[row, col] = np.concatenate([b.feature_ids for b in blocks])
        vals[row, col] = np.concatenate([b.values16 for b in blocks]).astype(np.float32)
        self._summaries.update_windows(
            first,
            np.array(lengths),
            np.concatenate(tokens),
            ids,
            vals,
            np.concatenate(masks),
            window_ids=self._global(np.arange(first, end)),
        )

    # ---------------------------------------------------------------- public API

    @property
    def summaries(self) -> FeatureSummaries:
        """The running per-feature summaries, up to date with every window added so far."""
        self._drain_summaries()
        return self._summaries

    def _drain_summaries(self, keep: int = 0) -> None:
        """Wait until at most `keep` summary updates are still queued or running."""
        while len(self._sum_futures) > keep:
            fut = self._sum_futures.popleft()
            exc = fut.exception()
            if exc is not None:
                self._sum_futures.clear()
                raise exc

    @property
    def windows_added(self) -> int:
        """Windows this shard holds once everything queued is committed (its local count)."""
        return self._local_next

    @property
    def windows_committed(self) -> int:
        """Windows durably in the index (the writer thread's last commit)."""
        return int(self._committer.committed["windows"])

    @property
    def tokens_committed(self) -> int:
        """Tokens durably in the index (the writer thread's last commit)."""
        return self._committer.tokens_committed

    def add_windows(
        self,
        window_ids: Sequence[int] | np.ndarray,
        tokens: Sequence[ArrayInput] | np.ndarray | torch.Tensor,
        segments: Sequence[Sequence[Sequence[int]]],
        feature_ids: ArrayInput,
        values: ArrayInput,
        mask: ArrayInput | None = None,
        lengths: Sequence[int] | np.ndarray | None = None,
        *,
        summaries_done: bool = False,
    ) -> None:
        """Queue the next windows of this shard (ids must start at `next_window`).

        Window ids are global: consecutive from `next_window` for a shard of its own, the
        next windows the layout deals this rank otherwise.

        tokens: one uint32 array per window, or a padded [n_windows, ctx_len] array with
        `lengths`; segments: per window, rows (doc_id, doc_offset, start_in_window, length);
        feature_ids, values [n_tokens, K] for all tokens of the batch (numpy or torch, value
        0 = inactive slot); mask bool [n_tokens] (False = BOS/pad: token stored, features
        not). With summaries_done=True the caller already fed these windows to
        `self.summaries` (e.g. on the GPU).
        """
        self._raise_pending()
        wids = np.asarray(window_ids, dtype=np.int64).ravel()
        n_w = len(wids)
        if n_w == 0:
            return
        first = self._local_next
        expected = self._global(np.arange(first, first + n_w))
        if not np.array_equal(wids, expected):
            dealt = "" if self.layout is None else f" of those dealt to rank {self.layout.rank}"
            raise SaetuiInputError(
                f"windows must be added in order without gaps{dealt}: expected window "
                f"{self.next_window} next, got {wids[0]}{'...' if n_w > 1 else ''}."
            )
        batch = check_batch(
            first,
            wids,
            tokens,
            segments,
            feature_ids,
            values,
            mask,
            lengths,
            self.ctx_len,
            self.d_sae,
        )
        if summaries_done:
            if self.summaries.next_window != first + n_w:
                raise SaetuiInputError(
                    f"summaries_done=True but the summaries cover windows up to "
                    f"{self.summaries.next_window}, not {first + n_w}: call "
                    "writer.summaries.update_windows for exactly these windows first (with "
                    "window_ids=the global ids when the shard has a layout)."
                )
        elif self._sum_pool is not None:
            self._drain_summaries(keep=1)  # bounds the batches held for the summary thread
            self._sum_futures.append(
                self._sum_pool.submit(
                    self._summaries.update_windows,
                    first,
                    batch.lens,
                    batch.tokens.astype(np.int64),
                    batch.ids,
                    batch.vals,
                    batch.mask,
                    _checked=True,
                    window_ids=wids,
                )
            )
        else:
            self._summaries.update_windows(
                first,
                batch.lens,
                batch.tokens.astype(np.int64),
                feature_ids,  # as given: on an accelerator the summaries stay there
                values,
                batch.mask,
                window_ids=wids,
            )
        self._committer.put(batch)
        self._local_next = first + n_w
        self.next_window = self._global(self._local_next)
        if time.monotonic() - self._last_checkpoint >= self._next_interval:
            self._next_interval = min(2 * self._next_interval, self._checkpoint_interval)
            self.checkpoint()

    def checkpoint(self) -> None:
        """Queue a checkpoint of the summaries at the current window boundary."""
        self._checkpoint(final=False)

    def _checkpoint(self, final: bool) -> None:
        """final: no window follows, so the records are built from the live tables
        instead of a ~d_sae * 3.3 KB copy (the peak of a run's memory otherwise)."""
        self._raise_pending()
        if self._sum_pool is not None:
            # snapshot in the summary thread, after the updates queued before it; the
            # writer thread waits for it in queue order, so the caller does not
            snap: SummarySnapshot | Future[SummarySnapshot] = self._sum_pool.submit(
                self._summaries.snapshot, copy=not final
            )
        else:
            snap = self._summaries.snapshot(copy=not final)
        self._committer.put(Checkpoint(snap))
        self._snapshot_window = self._local_next
        self._last_checkpoint = time.monotonic()

    def put_neighbours(self, metric: str, ids: ArrayInput, scores: ArrayInput) -> None:
        """Store top-N neighbours per feature for `metric` (ids < 0 mark empty slots).

        Metrics named ``logit_*`` hold token ids (a feature's logit effects), not features.
        """
        ids_np, scores_np = as_numpy(ids), as_numpy(scores).astype(np.float32)
        if ids_np.shape != scores_np.shape or ids_np.ndim != 2 or ids_np.shape[0] != self.d_sae:
            raise SaetuiInputError(
                f"neighbour ids and scores must both be [d_sae={self.d_sae}, N], got "
                f"{tuple(ids_np.shape)} and {tuple(scores_np.shape)}."
            )
        if not metric or len(metric) > 64:
            raise SaetuiInputError("a neighbour metric needs a name of 1-64 characters.")
        bound = self.vocab_size if metric.startswith(TOKEN_METRIC_PREFIX) else self.d_sae
        if ids_np.size and int(ids_np.max()) >= bound:
            raise SaetuiInputError(f"{metric} ids must be below {bound}.")
        self._raise_pending()
        self._committer.put(NeighbourLists(metric, ids_np.astype(np.int64), scores_np))

    def put_metrics(self, metrics: dict[str, Any]) -> None:
        """Store run metrics (explained variance, CE loss recovered, ...) as JSON."""
        self.put_meta("metrics", metrics)

    def put_meta(self, name: str, value: Any) -> None:
        """Store a JSON value under `name` in the shard's meta sub-db."""
        try:
            blob = fmt.dumps(value)
        except (TypeError, ValueError):
            raise SaetuiInputError(f"meta value {name!r} is not JSON-serialisable.") from None
        key = fmt.META_METRICS if name == "metrics" else fmt.USER_META_PREFIX + name.encode()
        self._raise_pending()
        self._committer.put(Meta(key, blob))

    def get_meta(self, name: str) -> Any:
        """A JSON value committed with `put_meta` (or `put_metrics` for "metrics"), or None;
        call `flush` first to see what is still queued."""
        key = fmt.META_METRICS if name == "metrics" else fmt.USER_META_PREFIX + name.encode()
        with self._env.begin() as txn:
            raw = txn.get(key, db=self._dbs[fmt.DB_META])
        return None if raw is None else json.loads(raw)

    def flush(self) -> None:
        """Block until everything queued so far is committed."""
        self._raise_pending()
        self._committer.flush()
        self._raise_pending()

    def finish(self) -> None:
        """Checkpoint summaries, mark the shard finished and close."""
        if self._closed:
            return
        try:
            self._raise_pending()
            self._checkpoint(final=True)
            self._committer.put(Finish())
        finally:
            self.close()

    def close(self) -> None:
        """Commit what is queued (with a summary checkpoint) and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._committer.error is None and self._committer.is_alive():
                if self._local_next > self._snapshot_window:
                    self._checkpoint(final=True)
                self._committer.put(Stop())
        finally:
            self._committer.join()
            if self._sum_pool is not None:
                self._sum_pool.shutdown(wait=True)
            envs.release(self._shared)
            self._writer_lock.release()
        if self._committer.error_unreported():
            self._raise_pending()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_pending(self) -> None:
        self._committer.raise_pending()
