"""IndexWriter: one thread owns the LMDB write transaction, fed by a bounded queue.

Crash safety: window records, forward blocks and the progress record are written in the
same transaction, so after a crash the index holds exactly the windows up to the last
commit. Per-feature summaries are checkpointed every `checkpoint_interval` seconds (and on
close) in the same way; on resume the writer loads the last checkpoint and replays the
committed windows after it from the forward index. Summaries are batch-order independent
(see summary.py), so the resumed index ends identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from saetui.errors import SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.env import WriterLock
from saetui.index.layout import ShardLayout, solo_layout
from saetui.index.records import SummarySnapshot, load_snapshot_records, summary_record_chunks
from saetui.index.summary import FeatureSummaries

TOKEN_METRIC_PREFIX = "logit_"
_SUMMARY_DBS = (fmt.DB_FSUM, fmt.DB_FHIST, fmt.DB_FTOPK, fmt.DB_FSAMP, fmt.DB_TTOK)


def vocab_digest(vocab_json: bytes) -> str:
    return hashlib.sha256(vocab_json).hexdigest()


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").numpy()
    return np.asarray(x)


class IndexWriter:
    """Appends windows to one shard of an index; use `create_or_resume` to get one."""

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
        if layout is not None and layout.rank != shard:
            raise SaetuiInputError(
                f"shard {shard} cannot hold rank {layout.rank}'s windows: pass shard=rank."
            )
        if not isinstance(run_config, dict):
            raise SaetuiInputError("run_config must be a dict of JSON values.")
        try:
            config_json = fmt.dumps(run_config)
        except (TypeError, ValueError):
            raise SaetuiInputError(
                "run_config holds values that are not JSON (numbers, strings, lists, dicts): "
                "convert them before creating the index."
            ) from None
        if d_sae <= 0 or d_sae >= 1 << 32:
            raise SaetuiInputError(f"d_sae {d_sae} is out of range: expected 1 to 2**32 - 1.")
        if not 0 < ctx_len <= 65535:
            raise SaetuiInputError(f"ctx_len {ctx_len} is out of range: expected 1 to 65535.")
        if not 0 < top_k <= 65535 or not 0 < samples_per_bin <= 255:
            raise SaetuiInputError("top_k must be 1-65535 and samples_per_bin 1-255.")
        if not 0 <= shard < 100000:
            raise SaetuiInputError(f"shard {shard} is out of range: expected 0 to 99999.")
        vocab_list = list(vocab)
        if not all(isinstance(t, str) for t in vocab_list):
            raise SaetuiInputError("vocab must be a list of token strings, one per token id.")
        vocab_json = json.dumps(vocab_list).encode()
        identity = {
            "run_config": json.loads(config_json),
            "d_sae": d_sae,
            "ctx_len": ctx_len,
            "vocab_sha256": vocab_digest(vocab_json),
            "top_k": top_k,
            "samples_per_bin": samples_per_bin,
        }

        created_dir = not path.exists()
        if path.exists():
            if not path.is_dir():
                raise SaetuiInputError(f"{path} is a file: pass a directory for the index.")
            if (path / fmt.MARKER_FILE).exists():
                fmt.read_marker(path)
            elif any(path.iterdir()):
                raise SaetuiInputError(
                    f"{path} is a non-empty directory that is not a saetui index: pass a new "
                    "or empty directory."
                )
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
        self._lock = lock
        try:
            self._init(
                path,
                sdir,
                shared,
                shard,
                layout,
                identity,
                vocab_json,
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
        identity: dict[str, Any],
        vocab_json: bytes,
        summary_device: str | torch.device,
        commit_interval: float,
        checkpoint_interval: float,
        queue_size: int,
    ) -> None:
        self.path, self.shard_path, self.shard = path, sdir, shard
        self.layout = layout
        self._shared = shared
        self._env = env = shared.env
        self.d_sae, self.ctx_len = identity["d_sae"], identity["ctx_len"]
        self.vocab_size = len(json.loads(vocab_json))
        self._dbs = shared.dbs
        meta = self._dbs[fmt.DB_META]
        with env.begin() as txn:
            stored_shape = txn.get(fmt.META_SHAPE, db=meta)
            progress_raw = txn.get(fmt.META_PROGRESS, db=meta)
        if stored_shape is not None:
            stored = json.loads(stored_shape)
            diff = _differing_fields(stored.get("identity", {}), identity)
            if diff:
                raise SaetuiInputError(
                    f"the index {path} was built with a different {', '.join(diff)}: rerun with "
                    "the same settings to resume, or pass overwrite to rebuild it."
                )
            stored_layout = ShardLayout.from_json(stored.get("layout"))
            if stored_layout != layout:
                raise SaetuiInputError(
                    f"shard {shard} of the index {path} was collected as "
                    f"{_describe_layout(stored_layout)}, not as {_describe_layout(layout)}: "
                    "run again with the same number of processes to resume it, or pass "
                    "overwrite to rebuild it."
                )
            self._progress = json.loads(progress_raw)
        else:
            self._progress = {
                "windows": 0,
                "tokens": 0,
                "counted_tokens": 0,
                "nonzeros": 0,
                "summary_windows": 0,
                "summary_serial": 0,
                "commits": 0,
                "finished": False,
            }
            shape = {
                "identity": identity,
                "shard": shard,
                "created": time.time(),
                "lmdb_lib_version": fmt.LMDB_LIB_VERSION,
                "lmdb_engine": ".".join(map(str, env.lib_version())),
                "hist_bin_edges": fmt.hist_bin_edges(),
                "n_sample_bins": fmt.N_SAMPLE_BINS,
            }
            if layout is not None:
                shape["layout"] = layout.to_json()
            with shared.write_lock, env.begin(write=True) as txn:
                txn.put(fmt.META_FORMAT, fmt.dumps(fmt.marker_content()), db=meta)
                txn.put(fmt.META_CONFIG, fmt.dumps(identity["run_config"]), db=meta)
                txn.put(fmt.META_SHAPE, fmt.dumps(shape), db=meta)
                txn.put(fmt.META_VOCAB, codec.compress(vocab_json), db=meta)
                txn.put(fmt.META_PROGRESS, fmt.dumps(self._progress), db=meta)
        self._summaries = FeatureSummaries(
            self.d_sae,
            self.ctx_len,
            identity["top_k"],
            identity["samples_per_bin"],
            summary_device,
        )
        self._restore_summaries()
        # on the CPU the summary merge runs in its own thread (torch kernels release the
        # GIL), overlapping the caller's next batch and the writer thread's encoding; on an
        # accelerator it stays in the caller's thread, where it is cheap
        self._sum_futures: deque[Future[None]] = deque()
        self._sum_pool = (
            ThreadPoolExecutor(1, thread_name_prefix="saetui-index-summaries")
            if self._summaries.device.type == "cpu"
            else None
        )
        self._snapshot_window = int(self._progress["summary_windows"])
        # compressed blocks of the last, partly filled `fwd` chunk (rewritten as it fills)
        committed = int(self._progress["windows"])
        self._fwd_tail: list[bytes] = []
        if committed % codec.FWD_CHUNK:
            with env.begin() as txn:
                rec = txn.get(fmt.u64_key(committed // codec.FWD_CHUNK), db=self._dbs[fmt.DB_FWD])
            self._fwd_tail = codec.unpack_chunk(rec)
        self._local_next = int(self._progress["windows"])
        self.next_window = self._global(self._local_next)
        self.tokens_committed = int(self._progress["tokens"])
        self._commit_interval = commit_interval
        self._checkpoint_interval = checkpoint_interval
        # readers see summaries as of the last checkpoint: the first ones come after 2, 4,
        # 8, ... seconds, so a TUI browsing a fresh collection sees features at once, and
        # the interval grows to checkpoint_interval (a few extra checkpoints in all)
        self._next_interval = min(2.0, checkpoint_interval)
        self._last_checkpoint = time.monotonic()
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._error_raised = False
        self._closed = False
        self._holds_write_lock = False
        self._thread = threading.Thread(target=self._run, name="saetui-index-writer", daemon=True)
        self._thread.start()

    def _restore_summaries(self) -> None:
        with self._env.begin() as txn:
            snap = load_snapshot_records(txn, self._dbs, self.d_sae)
        if snap is not None:
            self._summaries.load_snapshot(snap)
        end = int(self._progress["windows"])
        start = self._summaries.next_window
        chunk = 256
        for a in range(start, end, chunk):
            b = min(end, a + chunk)
            self._replay(a, b)

    def _global(self, local: Any) -> Any:
        """Global window id(s) of this shard's local window id(s)."""
        if self.layout is None:
            return local if np.ndim(local) == 0 else np.asarray(local, dtype=np.int64)
        return self.layout.global_window(local)

    def _replay(self, first: int, end: int) -> None:
        """Feed committed windows [first, end) (local ids) back into the summaries."""
        lengths, tokens, masks, blocks = [], [], [], []
        with self._env.begin() as txn:
            for w in range(first, end):
                rec = codec.decode_window(txn.get(fmt.u64_key(w), db=self._dbs[fmt.DB_TOK]))
                chunk = txn.get(fmt.u64_key(w // codec.FWD_CHUNK), db=self._dbs[fmt.DB_FWD])
                blk = codec.decode_forward(codec.chunk_blob(chunk, w % codec.FWD_CHUNK))
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
        return int(self._committed["windows"]) if hasattr(self, "_committed") else 0

    def add_windows(
        self,
        window_ids: Sequence[int] | np.ndarray,
        tokens: Sequence[Any] | np.ndarray,
        segments: Sequence[Sequence[Sequence[int]]],
        feature_ids: Any,
        values: Any,
        mask: Any = None,
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
        if isinstance(tokens, (np.ndarray, torch.Tensor)) and _as_numpy(tokens).ndim == 2:
            if lengths is None:
                raise SaetuiInputError("a padded 2-D tokens array needs `lengths`.")
            padded = _as_numpy(tokens)
            lens = np.asarray(lengths, dtype=np.int64)
            keep = np.arange(padded.shape[1])[None, :] < lens[:, None]
            tokens_flat = padded[keep].astype(np.uint32)
        else:
            parts = [_as_numpy(t).ravel() for t in tokens]
            lens = np.array([len(p) for p in parts], dtype=np.int64)
            tokens_flat = (
                np.concatenate(parts).astype(np.uint32) if parts else np.zeros(0, np.uint32)
            )
        if len(lens) != n_w or len(segments) != n_w:
            raise SaetuiInputError(
                f"got {n_w} window ids but {len(lens)} token sequences and {len(segments)} "
                "segment lists: pass one of each per window."
            )
        if lens.min() < 1 or lens.max() > self.ctx_len:
            raise SaetuiInputError(
                f"window lengths must be 1 to ctx_len={self.ctx_len} tokens, got "
                f"{int(lens.min())}-{int(lens.max())}."
            )
        n_tok = int(lens.sum())
        ids_np = _as_numpy(feature_ids)
        vals_np = _as_numpy(values).astype(np.float32, copy=False)
        if ids_np.ndim != 2 or ids_np.shape != vals_np.shape or ids_np.shape[0] != n_tok:
            raise SaetuiInputError(
                f"feature_ids and values must both be [n_tokens={n_tok}, K], got "
                f"{tuple(ids_np.shape)} and {tuple(vals_np.shape)}."
            )
        mask_np = (
            np.ones(n_tok, dtype=bool) if mask is None else _as_numpy(mask).astype(bool).ravel()
        )
        if len(mask_np) != n_tok:
            raise SaetuiInputError(f"mask must have n_tokens={n_tok} entries, got {len(mask_np)}.")
        if vals_np.size:
            lo, hi = float(vals_np.min()), float(vals_np.max())
            if not (lo >= 0 and np.isfinite(hi)):
                raise SaetuiInputError(
                    "activation values must be finite and >= 0 (0 = inactive slot); got "
                    f"min {lo}, max {hi}."
                )
            active_ids = np.where(vals_np != 0, ids_np, 0)
            if int(active_ids.min()) < 0 or int(active_ids.max()) >= self.d_sae:
                raise SaetuiInputError(
                    f"feature ids must lie in [0, {self.d_sae}) (d_sae) for active slots, got "
                    f"{int(active_ids.min())}-{int(active_ids.max())}."
                )
        seg_arrays = [np.asarray(s, dtype=np.int64).reshape(-1, 4) for s in segments]
        for w, seg in enumerate(seg_arrays):
            if len(seg) and (
                seg[:, 2].min() < 0
                or (seg[:, 2] + seg[:, 3]).max() > lens[w]
                or seg[:, 3].min() < 1
            ):
                raise SaetuiInputError(
                    f"segments of window {int(wids[w])} do not fit its {int(lens[w])} tokens: "
                    "each needs 0 <= start and start + length <= window length."
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
                    lens,
                    tokens_flat.astype(np.int64),
                    ids_np,
                    vals_np,
                    mask_np,
                    _checked=True,
                    window_ids=wids,
                )
            )
        else:
            self._summaries.update_windows(
                first,
                lens,
                tokens_flat.astype(np.int64),
                feature_ids,
                values,
                mask_np,
                window_ids=wids,
            )
        self._put(("data", first, lens, tokens_flat, seg_arrays, ids_np, vals_np, mask_np))
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
            snap: Any = self._sum_pool.submit(self._summaries.snapshot, copy=not final)
        else:
            snap = self._summaries.snapshot(copy=not final)
        self._put(("ckpt", snap))
        self._snapshot_window = self._local_next
        self._last_checkpoint = time.monotonic()

    def put_neighbours(self, metric: str, ids: Any, scores: Any) -> None:
        """Store top-N neighbours per feature for `metric` (ids < 0 mark empty slots).

        Metrics named ``logit_*`` hold token ids (a feature's logit effects), not features.
        """
        ids_np, scores_np = _as_numpy(ids), _as_numpy(scores).astype(np.float32)
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
        self._put(("nbrs", metric, ids_np.astype(np.int64), scores_np))

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
        self._put(("meta", key, blob))

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
        done = threading.Event()
        self._put(("flush", done))
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break
        self._raise_pending()

    def finish(self) -> None:
        """Checkpoint summaries, mark the shard finished and close."""
        if self._closed:
            return
        try:
            self._raise_pending()
            self._checkpoint(final=True)
            self._put(("finish",))
        finally:
            self.close()

    def close(self) -> None:
        """Commit what is queued (with a summary checkpoint) and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._error is None and self._thread.is_alive():
                if self._local_next > self._snapshot_window:
                    self._checkpoint(final=True)
                self._put(("stop",))
        finally:
            self._thread.join()
            if self._sum_pool is not None:
                self._sum_pool.shutdown(wait=True)
            envs.release(self._shared)
            self._lock.release()
        if self._error is not None and not self._error_raised:
            self._raise_pending()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- thread side

    def _raise_pending(self) -> None:
        """Re-raise the writer thread's error in the caller, once; later calls say it stopped."""
        if self._error is None:
            return
        if not self._error_raised:
            self._error_raised = True
            raise self._error
        raise SaetuiInputError(
            f"the index writer for {self.path} stopped after an error: open it again to resume."
        )

    def _put(self, item: tuple[Any, ...]) -> None:
        while True:
            if self._error is not None or not self._thread.is_alive():
                self._raise_pending()
                raise SaetuiInputError(f"the index writer for {self.path} is closed.")
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        txn: lmdb.Transaction | None = None
        started = 0.0
        pending = dict(self._progress)
        self._committed = dict(self._progress)
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
                kind = item[0]
                if kind == "data":
                    self._write_data(txn, pending, *item[1:])
                elif kind == "ckpt":
                    snap = item[1].result() if isinstance(item[1], Future) else item[1]
                    self._write_checkpoint(txn, pending, snap)
                    del snap
                elif kind == "nbrs":
                    self._write_neighbours(txn, *item[1:])
                elif kind == "meta":
                    txn.put(item[1], item[2], db=self._dbs[fmt.DB_META])
                elif kind == "finish":
                    pending["finished"] = True
                force = kind in ("flush", "stop", "ckpt", "finish")
                if force or time.monotonic() - started >= self._commit_interval:
                    self._commit(txn, pending)
                    txn = None
                if kind == "ckpt" or time.monotonic() - last_trim > 2.0:
                    # glibc keeps freed batch temporaries (both threads) unless asked: RSS
                    # grew by ~1.5 GB between checkpoints in the 10M-token benchmark
                    if kind == "ckpt":
                        del item
                    _return_free_heap()
                    fmt.unmap_file_pages([self.shard_path / "data.mdb"])
                    last_trim = time.monotonic()
                if kind == "flush":
                    item[1].set()
                if kind == "stop":
                    return
        except BaseException as exc:  # re-raised in the caller's thread
            if txn is not None:
                with contextlib.suppress(lmdb.Error):
                    txn.abort()
            self._end()
            self._error = fmt.translate_lmdb_error(exc, self.path)
            self._progress = dict(self._committed)

    def _begin(self) -> lmdb.Transaction:
        """A write transaction, begun under the environment's write lock (see env.py)."""
        self._shared.write_lock.acquire()
        self._holds_write_lock = True
        try:
            return self._env.begin(write=True)
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        if self._holds_write_lock:
            self._holds_write_lock = False
            self._shared.write_lock.release()

    def _commit(self, txn: lmdb.Transaction | None, pending: dict[str, Any]) -> None:
        if txn is None:
            return
        pending["commits"] += 1
        pending["updated"] = time.time()
        txn.put(fmt.META_PROGRESS, fmt.dumps(pending), db=self._dbs[fmt.DB_META])
        try:
            txn.commit()
        finally:
            self._end()
        self._committed = dict(pending)
        self._progress = dict(pending)
        self.tokens_committed = int(pending["tokens"])

    def _write_data(
        self,
        txn: lmdb.Transaction,
        pending: dict[str, Any],
        first: int,
        lens: np.ndarray,
        tokens_flat: np.ndarray,
        segments: list[np.ndarray],
        ids: np.ndarray,
        vals: np.ndarray,
        mask: np.ndarray,
    ) -> None:
        if pending["finished"]:
            pending["finished"] = False
        enc = codec.encode_batch(lens, tokens_flat, segments, ids, codec.to_fp16(vals), mask)
        keys = [fmt.u64_key(first + i) for i in range(len(lens))]
        self._append(txn, fmt.DB_TOK, list(zip(keys, enc.tok_records, strict=True)))
        size = codec.FWD_CHUNK
        offset = first % size
        if len(self._fwd_tail) != offset:
            raise RuntimeError(f"forward chunk tail holds {len(self._fwd_tail)}, not {offset}")
        blobs = self._fwd_tail + enc.fwd_records
        chunk0 = first // size
        records = [
            (fmt.u64_key(chunk0 + i // size), codec.pack_chunk(blobs[i : i + size]))
            for i in range(0, len(blobs), size)
        ]
        if offset:  # the first chunk exists, partly filled: rewrite it in place
            txn.put(records[0][0], records[0][1], db=self._dbs[fmt.DB_FWD])
            records = records[1:]
        self._append(txn, fmt.DB_FWD, records)
        self._fwd_tail = blobs[len(blobs) - len(blobs) % size :] if len(blobs) % size else []
        pending["windows"] = first + len(lens)
        pending["tokens"] += enc.n_tokens
        pending["counted_tokens"] += enc.n_counted
        pending["nonzeros"] += enc.nnz

    def _append(self, txn: lmdb.Transaction, db: bytes, records: list[tuple[bytes, bytes]]) -> None:
        """putmulti(append=True), checking the count: out-of-order keys are skipped silently."""
        if not records:
            return
        with txn.cursor(db=self._dbs[db]) as cur:
            _, added = cur.putmulti(records, append=True)
        if added != len(records):
            raise RuntimeError(
                f"append to {db.decode()} added {added} of {len(records)} records: "
                "keys out of order"
            )

    def _write_checkpoint(
        self, txn: lmdb.Transaction, pending: dict[str, Any], snap: SummarySnapshot
    ) -> None:
        for db in _SUMMARY_DBS:
            txn.drop(self._dbs[db], delete=False)
        for name, records in summary_record_chunks(snap):
            self._append(txn, name.encode(), records)
        pending["summary_windows"] = snap.next_window
        pending["summary_serial"] += 1

    def _write_neighbours(
        self, txn: lmdb.Transaction, metric: str, ids: np.ndarray, scores: np.ndarray
    ) -> None:
        meta = self._dbs[fmt.DB_META]
        raw = txn.get(fmt.META_NBR_METRICS, db=meta)
        metrics = json.loads(raw) if raw else []
        if metric not in metrics:
            if len(metrics) >= 255:
                raise SaetuiInputError("an index holds at most 255 neighbour metrics.")
            metrics.append(metric)
            txn.put(fmt.META_NBR_METRICS, fmt.dumps(metrics), db=meta)
        mid = metrics.index(metric)
        db = self._dbs[fmt.DB_FNBR]
        for f in range(self.d_sae):
            ok = ids[f] >= 0
            rec = ids[f][ok].astype("<u4").tobytes() + scores[f][ok].astype("<f4").tobytes()
            txn.put(fmt.nbr_key(f, mid), rec, db=db)


def _return_free_heap() -> None:
    """Give freed heap back to the OS after a checkpoint's large temporaries (glibc only)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _describe_layout(layout: ShardLayout | None) -> str:
    if layout is None:
        return "a single process's index"
    return f"rank {layout.rank} of {layout.world} processes (blocks of {layout.block} windows)"


def _differing_fields(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diff = []
    for key in sorted(set(stored) | set(new)):
        if key == "run_config":
            a, b = stored.get(key) or {}, new.get(key) or {}
            diff += [f"run_config.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif stored.get(key) != new.get(key):
            diff.append("vocabulary" if key == "vocab_sha256" else key)
    return diff
