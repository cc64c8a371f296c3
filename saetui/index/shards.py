"""The shards of an index, opened for reading as one set: discovery of the committed
``shard-*`` directories, their shared LMDB environments, counted read transactions that
``close()`` waits for, damage guards that turn LMDB errors into sentences, and the records
every shard shares (identity, vocabulary, progress, run metrics, user meta).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from saetui.errors import IndexDamagedError, IndexEmptyError, SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.layout import ShardLayout
from saetui.index.types import Progress

UNMAP_EVERY = 2048  # windows read between unmaps of the index pages (~350 MB mapped)


class Shard:
    """One open shard: its environment, database handles and (distributed) layout."""

    def __init__(self, index: int, path: Path, shared: envs.SharedEnv) -> None:
        self.index, self.path, self.shared = index, path, shared
        self.env, self.dbs = shared.env, shared.dbs
        self.layout: ShardLayout | None = None  # set for a shard of a distributed run

    def local(self, window: int) -> int:
        """This shard's own id of (global) window ``window`` (ValueError: not dealt here)."""
        return window if self.layout is None else self.layout.local_window(window)

    def global_window(self, local: int) -> int:
        """The global id of this shard's window ``local``."""
        return local if self.layout is None else int(self.layout.global_window(local))


class ShardSet:
    """Every committed shard of the index at ``path``; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.marker = fmt.read_marker(path)
        self.shards: list[Shard] = []
        # reads in flight: close() waits for them before it releases the environments
        self._reads = threading.Condition()
        self._in_flight = 0
        self._closed = False
        self._lock = threading.Lock()
        self._reads_since_unmap = 0
        self._vocab: list[str] | None = None
        self._vocab_arr: np.ndarray | None = None
        self._vocab_lower: list[str] | None = None
        try:
            self.shape = self._open()
            self._check_layouts()
        except BaseException:
            self.close()
            raise

    def _open(self) -> dict[str, Any]:
        """Open every shard that has committed its metadata; the first one's shape record."""
        shape: dict[str, Any] | None = None
        dirs = sorted(
            p for p in self.path.iterdir() if p.name.startswith(fmt.SHARD_PREFIX) and p.is_dir()
        )
        for d in dirs:
            if not (d / "data.mdb").exists():
                continue
            shard_id = int(d.name[len(fmt.SHARD_PREFIX) :])
            try:
                with self.guard(d):
                    shared = envs.acquire(d, fmt.SHARD_DBS, write=False)
            except lmdb.NotFoundError:  # a writer created it but has not committed yet
                continue
            shard = Shard(shard_id, d, shared)
            self.shards.append(shard)
            with self.read(shard) as txn:
                raw = txn.get(fmt.META_SHAPE, db=shard.dbs[fmt.DB_META])
            if raw is None:
                self.shards.pop()
                envs.release(shared)
                continue
            s = json.loads(raw)
            shard.layout = ShardLayout.from_json(s.get("layout"))
            if shape is None:
                shape = s
            elif s["identity"] != shape["identity"]:
                raise SaetuiInputError(
                    f"shard {d.name} of {self.path} was built with different settings than "
                    "the other shards: rebuild it."
                )
        if shape is None:
            raise IndexEmptyError(
                f"the index {self.path} has no committed data yet: wait for the collector's "
                "first commit (about a second) and open it again."
            )
        return shape

    def _check_layouts(self) -> None:
        layouts = [s.layout for s in self.shards]
        first = next((layout for layout in layouts if layout is not None), None)
        if first is None:
            return
        for s in self.shards:
            ok = (
                s.layout is not None
                and (s.layout.world, s.layout.block) == (first.world, first.block)
                and s.layout.rank == s.index
            )
            if not ok:
                raise SaetuiInputError(
                    f"shard {s.path.name} of {self.path} does not belong to the same distributed "
                    f"run as the others ({first.world} processes): remove it or rebuild the index."
                )

    # ------------------------------------------------------------ which shard

    @property
    def layout(self) -> ShardLayout | None:
        """The distributed layout the shards share (checked when opened), or None."""
        return self.shards[0].layout if self.shards else None

    @property
    def distributed(self) -> bool:
        """Whether the shards are the ranks of one distributed collection (global window
        ids), rather than shards that number their windows each by themselves."""
        return self.layout is not None

    @property
    def ids(self) -> list[int]:
        return [s.index for s in self.shards]

    def owner(self, window: int, shard: int | None) -> int:
        """The shard that holds (global) window ``window``; ``shard`` if one is named."""
        if shard is not None:
            return shard
        layout = self.layout
        return 0 if layout is None else layout.owner(window)

    def shard(self, shard: int) -> Shard:
        for s in self.shards:
            if s.index == shard:
                return s
        raise SaetuiInputError(
            f"shard {shard} is not in the index {self.path}: it has shards {self.ids}."
        )

    # ------------------------------------------------------------ reads

    def close(self) -> None:
        """Wait for reads in flight in other threads, then release the environments; later
        reads raise a SaetuiInputError sentence."""
        with self._reads:
            if self._closed:
                return
            self._closed = True
            while self._in_flight:
                self._reads.wait()
        for s in self.shards:  # kept: every later read refuses in counted()
            envs.release(s.shared)

    @contextmanager
    def counted(self) -> Iterator[None]:
        """Work on the environments that close() must wait for."""
        with self._reads:
            if self._closed:
                raise SaetuiInputError(f"the index reader of {self.path} is closed.")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._reads:
                self._in_flight -= 1
                if not self._in_flight:
                    self._reads.notify_all()

    @contextmanager
    def read(self, s: Shard) -> Iterator[lmdb.Transaction[bytes]]:
        """One short read transaction on a shard (counted, errors as sentences)."""
        with self.counted(), self.guard(s.path), s.env.begin() as txn:
            yield txn

    @contextmanager
    def read_buffers(self, s: Shard) -> Iterator[lmdb.Transaction[memoryview]]:
        """`read` with zero-copy values, valid only inside the transaction."""
        with self.counted(), self.guard(s.path), s.env.begin(buffers=True) as txn:
            yield txn

    @contextmanager
    def guard(self, where: Path | str) -> Iterator[None]:
        """Damaged records and LMDB corruption errors as one IndexDamagedError sentence."""
        try:
            yield
        except codec.CorruptBlockError as exc:
            raise IndexDamagedError(
                f"{shard_name(where)} holds a damaged record ({exc}): restore the index from "
                "a copy or collect it again."
            ) from None
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError) as exc:
            raise IndexDamagedError(
                f"{shard_name(where)} is damaged ({type(exc).__name__}): restore the index "
                "from a copy or collect it again."
            ) from None

    def release_mapped_pages(self, windows_read: int = 1) -> None:
        """Every ~2048 windows read (~350 MB mapped), unmap the index pages reads faulted into
        this process (they stay in the page cache): RSS otherwise grows toward the index
        size. Costs well under a millisecond each time."""
        with self._lock:
            self._reads_since_unmap += windows_read
            if self._reads_since_unmap < UNMAP_EVERY:
                return
            self._reads_since_unmap = 0
        # inline and counted as a read, so close() cannot unmap the environment, and let
        # the address range be reused, under the madvise
        with self.counted():
            fmt.unmap_file_pages([s.path / "data.mdb" for s in self.shards])

    # ------------------------------------------------------------ shared records

    def meta_record(self, s: Shard, key: bytes) -> bytes | None:
        with self.read(s) as txn:
            return txn.get(key, db=s.dbs[fmt.DB_META])

    def progress_record(self, s: Shard) -> dict[str, Any]:
        """The shard's committed progress record (a fresh read)."""
        raw = self.meta_record(s, fmt.META_PROGRESS)
        if raw is None:
            raise IndexDamagedError(
                f"{shard_name(s.path)} has no progress record: restore the index from a copy "
                "or collect it again."
            )
        record: dict[str, Any] = json.loads(raw)
        return record

    def window_count(self, s: Shard) -> int:
        """Windows the shard has committed (its local count)."""
        return int(self.progress_record(s)["windows"])

    def progress(self) -> Progress:
        """Committed progress summed over shards (a fresh read each call)."""
        shards = [self.progress_record(s) for s in self.shards]
        return Progress(
            windows=sum(p["windows"] for p in shards),
            tokens=sum(p["tokens"] for p in shards),
            counted_tokens=sum(p["counted_tokens"] for p in shards),
            nonzeros=sum(p["nonzeros"] for p in shards),
            summary_windows=sum(p["summary_windows"] for p in shards),
            finished=all(p["finished"] for p in shards),
            updated=max(p.get("updated", 0.0) for p in shards),
            shards=tuple(shards),
        )

    def first_meta(self, key: bytes) -> Any:
        """The JSON meta record ``key`` of the first shard that has it, or None."""
        for s in self.shards:
            raw = self.meta_record(s, key)
            if raw is not None:
                return json.loads(raw)
        return None

    @property
    def vocab(self) -> list[str]:
        """Token strings by token id (read once)."""
        if self._vocab is None:
            s = self.shards[0]
            raw = self.meta_record(s, fmt.META_VOCAB)
            if raw is None:
                raise IndexDamagedError(
                    f"{shard_name(s.path)} has no vocabulary record: restore the index from a "
                    "copy or collect it again."
                )
            with self.guard(s.path):
                vocab: list[str] = json.loads(codec.decompress(raw))
            self._vocab = vocab
        return self._vocab

    @property
    def vocab_lower(self) -> list[str]:
        """Each token lower-cased, without its leading space or word marker."""
        if self._vocab_lower is None:
            self._vocab_lower = [t.strip(" Ġ▁").lower() for t in self.vocab]
        return self._vocab_lower

    def token_strings(self, token_ids: np.ndarray | list[int]) -> list[str]:
        """The strings of ``token_ids``; ``<id>`` for an id outside the vocabulary."""
        if self._vocab_arr is None:
            self._vocab_arr = np.array(self.vocab, dtype=object)
        vocab = self._vocab_arr
        n = len(vocab)
        ids = np.asarray(token_ids, dtype=np.int64).ravel()
        if len(ids) == 0 or (int(ids.min()) >= 0 and int(ids.max()) < n):
            strings: list[str] = vocab[ids].tolist()  # one fancy index, not a loop per token
            return strings
        return [str(vocab[t]) if 0 <= t < n else f"<{t}>" for t in ids.tolist()]


def shard_name(where: Path | str) -> str:
    """'shard 0 of the index INDEX' for a shard directory, else the path."""
    path = Path(where)
    if path.name.startswith(fmt.SHARD_PREFIX) and path.name[len(fmt.SHARD_PREFIX) :].isdigit():
        return f"shard {int(path.name[len(fmt.SHARD_PREFIX) :])} of the index {path.parent}"
    return f"the index {path}"
