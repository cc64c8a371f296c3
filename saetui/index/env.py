"""LMDB environments of an index: one owner per directory and process.

LMDB allows a data file to be open only once per process (its fcntl locks belong to the
process), so every writer and reader in a process shares one :class:`SharedEnv` from this
registry, reference-counted. The rules that make sharing safe (README: "Threads and
environments"):

- Every named-database handle is opened once, when the entry is created, inside an
  explicit transaction, under the registry lock, before anyone else can see the entry.
  Nothing opens a handle later, so no call ever starts py-lmdb's implicit write
  transaction (``open_db`` without ``txn=`` begins one and, holding the GIL, waits for
  LMDB's writer mutex: a writer thread that needs the GIL to commit then waits forever).
- A write transaction on a shared environment is begun only while holding its
  ``write_lock``. That is a Python lock, so a second writer thread waits for it with the
  GIL released instead of inside LMDB with the GIL held.
- Read transactions never wait for writers (MVCC).
- The last ``release`` closes the environment; owners finish their own reads and join
  their own threads before releasing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from saetui.errors import IndexDamagedError, SaetuiInputError
from saetui.index import format as fmt

WRITER_LOCK_FILE = "writer.lock"


def writer_map_size(requested: int = fmt.DEFAULT_MAP_SIZE) -> int:
    """The map size of writers and readers: ``requested`` (virtual; the file grows with
    the data), or half of what an address-space limit (ulimit -v) allows, when there is one.
    Readers use the same size as writers: a reader whose map is smaller than the data a
    writer has since committed gets MDB_MAP_RESIZED, and resizing under other threads'
    transactions is not safe."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(64 << 20, min(requested, soft // 2))


def _address_limit() -> str:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"


@dataclass
class SharedEnv:
    """One open LMDB environment with its database handles, shared inside a process."""

    path: Path
    env: lmdb.Environment
    dbs: dict[bytes, Any]
    writable: bool
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    refs: int = 1


_REGISTRY_LOCK = threading.Lock()
_REGISTRY: dict[str, SharedEnv] = {}


def acquire(
    path: Path,
    db_names: tuple[bytes, ...],
    *,
    write: bool,
    map_size: int = fmt.DEFAULT_MAP_SIZE,
    max_dbs: int = fmt.MAX_DBS,
) -> SharedEnv:
    """The shared environment of directory ``path`` with handles for ``db_names``.

    ``write``: the caller will write, so the environment is opened writable and missing
    databases are created. Readers open it read-only (with no lock file when the
    directory is not writable, e.g. a read-only share). A writer cannot share an
    environment a reader of this process opened first: it gets a SaetuiInputError
    sentence. Raises ``lmdb.NotFoundError`` when a reader asks for a database that does
    not exist yet (its writer has not committed).
    """
    key = str(path.resolve())
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(key)
        if entry is not None:
            if write and not entry.writable:
                raise SaetuiInputError(
                    f"{path} is open read-only in this process: it cannot be written here."
                )
            missing = [name for name in db_names if name not in entry.dbs]
            if missing:
                # every opener of one environment asks for the same set; a subset was
                # opened first (e.g. a reader of an index a writer is still creating)
                _open_handles(entry, missing, create=write)
            entry.refs += 1
            return entry
        check_data_file(path)
        writable = write
        try:
            env = lmdb.open(
                str(path),
                map_size=map_size if writable else writer_map_size(),
                subdir=True,
                readonly=not writable,
                create=write,
                max_dbs=max_dbs,
                max_readers=fmt.MAX_READERS,
                metasync=False,
                sync=True,
                # read-around fetches a whole multi-page forward block in one I/O; with
                # readahead=False (MADV_RANDOM) a cold top-50 query took ~200 ms, not ~10 ms
                readahead=True,
                # a directory we cannot write has no writer of ours; LMDB needs write
                # access to the lock file, so read such a copy without one
                lock=writable or directory_writable(path),
                lib_version=fmt.LMDB_LIB_VERSION,
            )
        except lmdb.InvalidError:
            raise IndexDamagedError(
                f"{path} is not an LMDB 0.9 environment written by saetui (damaged, or made by "
                "another tool): restore the index from a copy or collect it again."
            ) from None
        except lmdb.Error as exc:
            if isinstance(exc, lmdb.MemoryError) or "Cannot allocate memory" in str(exc):
                raise SaetuiInputError(
                    f"cannot map the index {path} into memory: this process may use too little "
                    f"address space (ulimit -v {_address_limit()}); raise the limit or run "
                    "without it."
                ) from None
            raise SaetuiInputError(
                f"cannot open the index environment {path}: {exc}; check the path and its "
                "permissions."
            ) from None
        entry = SharedEnv(path=path, env=env, dbs={}, writable=writable)
        try:
            check_data_file(path, env)
            _open_handles(entry, list(db_names), create=write)
        except BaseException:
            env.close()
            raise
        _REGISTRY[key] = entry
        return entry


def release(entry: SharedEnv) -> None:
    """Drop one reference; the last one closes the environment."""
    with _REGISTRY_LOCK:
        entry.refs -= 1
        if entry.refs > 0:
            return
        key = str(entry.path.resolve())
        if _REGISTRY.get(key) is entry:
            del _REGISTRY[key]
        entry.env.close()


def open_count() -> int:
    """Environments open in this process (tests check that everything was released)."""
    with _REGISTRY_LOCK:
        return len(_REGISTRY)


def _open_handles(entry: SharedEnv, names: list[bytes], *, create: bool) -> None:
    """Open database handles without ever starting an implicit write transaction."""
    env = entry.env
    if entry.writable:
        # explicit write transaction under the write lock: only this thread waits, with
        # the GIL released, if another process is in the middle of a commit
        with entry.write_lock, env.begin(write=True) as txn:
            for name in names:
                entry.dbs[name] = env.open_db(name, txn=txn, create=create)
        return
    # read-only environment: py-lmdb opens the handle in its own read transaction and
    # commits it, so the handle stays valid (one opened in a caller's read transaction
    # would not), and a read transaction never waits for a writer
    for name in names:
        entry.dbs[name] = env.open_db(name, create=False)


def directory_writable(path: Path) -> bool:
    lock = path / "lock.mdb"
    if lock.exists():
        return os.access(lock, os.W_OK) and os.access(path, os.W_OK)
    return os.access(path, os.W_OK)


def check_data_file(path: Path, env: lmdb.Environment | None = None) -> None:
    """Refuse a truncated data file: LMDB would map pages past its end and crash on access."""
    data = path / "data.mdb"
    if not data.exists():
        return
    size = data.stat().st_size
    if env is None:
        if 0 < size < 2 * 4096:
            raise _truncated(path)
        return
    info = env.info()
    psize = env.stat()["psize"]
    if size < (info["last_pgno"] + 1) * psize:
        raise _truncated(path)


def _truncated(path: Path) -> SaetuiInputError:
    return IndexDamagedError(
        f"{path / 'data.mdb'} is truncated (shorter than its own page table says): the file is "
        "damaged; restore it from a copy or rebuild the index."
    )


class WriterLock:
    """An advisory lock that makes one writer per shard, across processes and hosts that
    share a local filesystem; the lock file names its holder for the error message."""

    def __init__(self, shard_path: Path, index_path: Path) -> None:
        self.path = shard_path / WRITER_LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SaetuiInputError(
                    f"another saetui writer ({holder}) is writing {shard_path.name} of the index "
                    f"{index_path}: wait for it to finish or stop it, then run again."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def check_output(path: Path, shard: int = 0) -> None:
    """Refuse an index output path that a collection could not write, before any model
    loads: a file, a non-index directory with files in it, a place without write access,
    or a shard another writer holds."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SaetuiInputError(f"--out {path} is a file: pass a directory for the index.")
    if path.is_dir() and any(path.iterdir()) and not (path / fmt.MARKER_FILE).exists():
        raise SaetuiInputError(
            f"--out {path} is a directory with files in it that is not a saetui index: pass "
            "a new or empty directory."
        )
    if path.is_dir() and (path / fmt.MARKER_FILE).exists():
        fmt.read_marker(path)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise SaetuiInputError(
            f"--out {path} lies under {existing}, which is a file: choose a path in a directory."
        )
    shard_path = fmt.shard_dir(path, shard)
    target = shard_path if shard_path.is_dir() else existing
    if not os.access(target, os.W_OK | os.X_OK):
        raise SaetuiInputError(
            f"--out {path}: {target} is not writable here (permissions or a read-only "
            "filesystem); choose a directory you can write."
        )
    if (
        shard_path.is_dir()
        and not shard_path.is_symlink()
        and (shard_path / WRITER_LOCK_FILE).exists()
    ):
        WriterLock(shard_path, path).release()  # raises with the holder when taken
