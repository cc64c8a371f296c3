"""UserStore: the user's labels, notes and bookmarks of an index, in their own LMDB
environment (``INDEX/user/``), so saving a label never waits behind a collector's write
transaction on the shards."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lmdb

from saetui.errors import SaetuiInputError
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.types import Bookmark, Label

USER_DBS = (fmt.DB_LABELS, fmt.DB_BOOKMARKS)
DB_CACHE = b"cache"  # results worth keeping (e.g. ablations), keyed by a JSON key
USER_MAP_SIZE = 1 << 30


class UserStore:
    """Labels and bookmarks of one index; thread-safe, opened on first use."""

    def __init__(self, index_path: Path, d_sae: int) -> None:
        self.path = index_path / fmt.USER_ENV
        self.d_sae = d_sae
        self._lock = threading.Lock()  # guards opening and closing
        self._entry: envs.SharedEnv | None = None
        self._closed = False

    def _env(self, create: bool) -> envs.SharedEnv | None:
        with self._lock:
            if self._closed:
                raise SaetuiInputError(f"the labels store {self.path} is closed.")
            if self._entry is None:
                if not (self.path / "data.mdb").exists():
                    if not create:
                        return None
                    try:
                        self.path.mkdir(exist_ok=True)
                    except OSError as exc:
                        raise SaetuiInputError(
                            f"cannot save labels in {self.path}: {exc.strerror}; make the index "
                            "directory writable."
                        ) from None
                # writable whenever the directory is: labels are saved while browsing
                writable = create or envs.directory_writable(self.path)
                self._entry = envs.acquire(
                    self.path, USER_DBS, write=writable, map_size=USER_MAP_SIZE, max_dbs=4
                )
            return self._entry

    def _write(self, db: bytes, puts: list[tuple[bytes, bytes]], deletes: list[bytes]) -> None:
        entry = self._env(create=bool(puts))
        if entry is None:
            return
        if not entry.writable:
            raise SaetuiInputError(
                f"the index {self.path.parent} is read-only here: labels and bookmarks cannot "
                "be saved; copy the index to a writable place."
            )
        with entry.write_lock, entry.env.begin(write=True) as txn:
            for key, value in puts:
                txn.put(key, value, db=entry.dbs[db])
            for key in deletes:
                txn.delete(key, db=entry.dbs[db])

    def _rows(self, db: bytes) -> list[tuple[bytes, bytes]]:
        entry = self._env(create=False)
        if entry is None:
            return []
        with entry.env.begin() as txn:
            return list(txn.cursor(db=entry.dbs[db]))

    def _get(self, db: bytes, key: bytes) -> bytes | None:
        entry = self._env(create=False)
        if entry is None:
            return None
        with entry.env.begin() as txn:
            return txn.get(key, db=entry.dbs[db])

    def _check(self, feature: int) -> int:
        if not 0 <= int(feature) < self.d_sae:
            raise SaetuiInputError(
                f"feature {feature} is out of range: this index has d_sae={self.d_sae} features "
                f"(0-{self.d_sae - 1})."
            )
        return int(feature)

    # ---------------------------------------------------------------- labels

    def set_labels(self, labels: Mapping[int, str | tuple[str, str]]) -> None:
        """Store (or replace) many labels in one short write transaction."""
        now = time.time()
        rows = []
        for feature, value in sorted(labels.items()):
            label, notes = (value, "") if isinstance(value, str) else value
            record = {"label": label, "notes": notes, "t": now}
            rows.append((_key(self._check(feature)), fmt.dumps(record)))
        self._write(fmt.DB_LABELS, rows, [])

    def delete_label(self, feature: int) -> None:
        self._write(fmt.DB_LABELS, [], [_key(self._check(feature))])

    def label(self, feature: int) -> Label | None:
        raw = self._get(fmt.DB_LABELS, _key(self._check(feature)))
        return None if raw is None else _label(int(feature), raw)

    def labels(self) -> dict[int, Label]:
        out = {}
        for key, raw in self._rows(fmt.DB_LABELS):
            feature = struct.unpack(">I", key)[0]
            out[feature] = _label(feature, raw)
        return out

    # ---------------------------------------------------------------- bookmarks

    def add_bookmark(self, feature: int, note: str = "") -> None:
        record = fmt.dumps({"note": note, "t": time.time()})
        self._write(fmt.DB_BOOKMARKS, [(_key(self._check(feature)), record)], [])

    def remove_bookmark(self, feature: int) -> None:
        self._write(fmt.DB_BOOKMARKS, [], [_key(self._check(feature))])

    def bookmarks(self) -> list[Bookmark]:
        out = []
        for key, raw in self._rows(fmt.DB_BOOKMARKS):
            record = json.loads(raw)
            out.append(Bookmark(struct.unpack(">I", key)[0], record["note"], record["t"]))
        return out

    # ---------------------------------------------------------------- cached results

    def _cache_db(self, create: bool) -> Any:
        entry = self._env(create=create)
        if entry is None:
            return None
        if DB_CACHE not in entry.dbs:
            try:  # indexes made before the cache existed lack the database
                envs.release(envs.acquire(self.path, (DB_CACHE,), write=entry.writable))
            except lmdb.NotFoundError:
                return None
        return entry.dbs[DB_CACHE]

    def put_cached(self, key: Any, value: Any) -> None:
        """Keep a JSON ``value`` under a JSON ``key`` (e.g. an ablation of one context)."""
        db = self._cache_db(create=True)
        entry = self._entry
        assert entry is not None and db is not None
        if not entry.writable:
            return  # a read-only index: recompute next time
        with entry.write_lock, entry.env.begin(write=True) as txn:
            txn.put(fmt.dumps(key), fmt.dumps(value), db=db)

    def cached(self, key: Any) -> Any:
        db = self._cache_db(create=False)
        if db is None or self._entry is None:
            return None
        with self._entry.env.begin() as txn:
            raw = txn.get(fmt.dumps(key), db=db)
        return None if raw is None else json.loads(raw)

    def close(self) -> None:
        """Release the environment; callers finish their own calls first."""
        with self._lock:
            self._closed = True
            entry, self._entry = self._entry, None
        if entry is not None:
            envs.release(entry)


def _key(feature: int) -> bytes:
    return struct.pack(">I", feature)


def _label(feature: int, raw: bytes) -> Label:
    record = json.loads(raw)
    return Label(feature, record["label"], record["notes"], record["t"])
