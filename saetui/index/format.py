"""On-disk constants of the saetui index: names, keys, engine pin, environment opening.

See README.md next to this file for the layout table.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import lmdb

from saetui.errors import IndexDamagedError, IndexMissingError, SaetuiInputError

FORMAT_NAME = "saetui-index"
FORMAT_VERSION = 1
MARKER_FILE = "saetui-index.json"
SHARD_PREFIX = "shard-"
USER_ENV = "user"

# py-lmdb 3.x bundles LMDB 0.9.x (data format v1) and 1.0.x (data format v3), which
# cannot read each other's files. We pin 0.9: py-lmdb < 3 and the `mdb_*` tools
# everywhere read it, and it is what py-lmdb 3.0 creates by default anyway.
LMDB_LIB_VERSION = 0

DEFAULT_MAP_SIZE = 1 << 40  # virtual; the file grows with the data only
MAX_DBS = 16
MAX_READERS = 512

# sub-databases of a shard environment
DB_META = b"meta"
DB_TOK = b"tok"
DB_FWD = b"fwd"
DB_FSUM = b"fsum"
DB_FHIST = b"fhist"
DB_FTOPK = b"ftopk"
DB_FSAMP = b"fsamp"
DB_TTOK = b"ttok"
DB_FNBR = b"fnbr"
SHARD_DBS = (DB_META, DB_TOK, DB_FWD, DB_FSUM, DB_FHIST, DB_FTOPK, DB_FSAMP, DB_TTOK, DB_FNBR)

# sub-databases of the user environment (labels, notes, bookmarks)
DB_LABELS = b"labels"
DB_BOOKMARKS = b"bookmarks"

# meta keys
META_FORMAT = b"format"
META_CONFIG = b"run_config"
META_SHAPE = b"shape"
META_VOCAB = b"vocab"
META_PROGRESS = b"progress"
META_METRICS = b"metrics"
META_NBR_METRICS = b"neighbour_metrics"
USER_META_PREFIX = b"user:"

HIST_CHUNK = 1024  # features per `fhist` record

# Global token index layout inside top-K keys: value bits << GIDX_BITS | (GIDX_MASK - gidx),
# so a larger key means a larger value, ties broken by the smaller global index.
GIDX_BITS = 40
GIDX_MASK = (1 << GIDX_BITS) - 1

# Histogram bins follow the fp16 bit pattern: 4 bins per octave from 2**-8 to 2**16,
# computed exactly from the stored fp16 bits, so every device bins alike.
HIST_MIN_OCTAVE = -8
HIST_OCTAVES = 24
HIST_BINS_PER_OCTAVE = 4
N_HIST_BINS = HIST_OCTAVES * HIST_BINS_PER_OCTAVE
# Interval samples are kept per octave (groups of HIST_BINS_PER_OCTAVE histogram bins).
N_SAMPLE_BINS = HIST_OCTAVES


def hist_bin_edges() -> list[float]:
    """Lower edge of every histogram bin, plus the upper edge of the last one."""
    edges = []
    for b in range(N_HIST_BINS):
        octave, quarter = divmod(b, HIST_BINS_PER_OCTAVE)
        edges.append(2.0 ** (octave + HIST_MIN_OCTAVE) * (1 + quarter / HIST_BINS_PER_OCTAVE))
    edges.append(2.0 ** (HIST_OCTAVES + HIST_MIN_OCTAVE))
    return edges


def u32_key(i: int) -> bytes:
    return struct.pack(">I", i)


def u64_key(i: int) -> bytes:
    return struct.pack(">Q", i)


def nbr_key(feature: int, metric_id: int) -> bytes:
    return struct.pack(">IB", feature, metric_id)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def shard_dir(index_path: Path, shard: int) -> Path:
    return index_path / f"{SHARD_PREFIX}{shard:05d}"


def marker_content() -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lmdb_lib_version": LMDB_LIB_VERSION,
        "layout": "one LMDB environment per shard in shard-NNNNN/, user data in user/",
    }


# A folder of one index per SAE, collected in one pass (saetui collect --sae A --sae B):
# this file lists them; each OUT/<name> is an ordinary index.
SEVERAL_FILE = "saetui-indexes.json"
SEVERAL_FORMAT = "saetui-indexes"


def read_several(path: Path) -> list[dict[str, Any]] | None:
    """The SAEs (name, sae, hook) a several-SAE collection folder lists; None when ``path``
    is no such folder (or its list is unreadable)."""
    try:
        content = json.loads((Path(path) / SEVERAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("format") != SEVERAL_FORMAT:
        return None
    entries = content.get("indexes")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    return entries


def write_several(path: Path, entries: list[dict[str, Any]]) -> None:
    """Write (atomically) the list of a several-SAE collection folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    temporary = path / f".{SEVERAL_FILE}.tmp"
    content = {"format": SEVERAL_FORMAT, "format_version": 1, "indexes": entries}
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path / SEVERAL_FILE)


def read_marker(index_path: Path) -> dict[str, Any]:
    """Read and check the marker file; raise SaetuiInputError when `index_path` is no index."""
    if not index_path.exists():
        raise IndexMissingError(
            f"{index_path} does not exist: pass the directory of a saetui index "
            "(made by `saetui collect`)."
        )
    marker = index_path / MARKER_FILE
    several = read_several(index_path) if not marker.is_file() else None
    if several:
        names = [str(entry.get("name")) for entry in several]
        raise IndexMissingError(
            f"{index_path} holds one index per SAE ({', '.join(names)}): pass one of them, "
            f"e.g. {index_path / names[0]}."
        )
    if not index_path.is_dir() or not marker.is_file():
        raise IndexMissingError(
            f"{index_path} is not a saetui index (no {MARKER_FILE} inside): pass the "
            "directory made by `saetui collect`."
        )
    try:
        content = json.loads(marker.read_text())
        if not isinstance(content, dict) or content.get("format") != FORMAT_NAME:
            raise ValueError
        version = int(content["format_version"])
    except (ValueError, KeyError, TypeError, OSError):
        raise IndexDamagedError(
            f"{marker} is damaged or not a saetui index marker: rebuild the index with "
            "`saetui collect`."
        ) from None
    if version != FORMAT_VERSION:
        raise SaetuiInputError(
            f"{index_path} uses index format version {version} but this saetui reads version "
            f"{FORMAT_VERSION}: open it with a matching saetui release or rebuild it."
        )
    return content


def write_marker(index_path: Path) -> None:
    """Write the marker atomically (all shard writers write the same content)."""
    tmp = index_path / f".{MARKER_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(marker_content(), indent=1) + "\n")
    os.replace(tmp, index_path / MARKER_FILE)


def unmap_file_pages(data_files: list[Path]) -> None:
    """Drop this process's mappings of LMDB data files' pages (Linux; else no-op).

    Reads fault index pages into the process (and fault-around maps their neighbours):
    the writer's file-backed RSS grew with the index, a reader's by ~170 KB per context
    window. MADV_DONTNEED on a shared read-only file map only unmaps: the pages stay in
    the page cache and the next read faults them back in, with the same data.
    """
    try:
        import ctypes

        targets = {str(p.resolve()) for p in data_files}
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") in targets:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED
    except (OSError, AttributeError, ValueError):
        pass


def translate_lmdb_error(exc: BaseException, path: Path) -> BaseException:
    """Turn map-full, disk-full and I/O errors into one clear sentence; others pass through.

    LMDB reports a short write on a full disk as EIO ("Input/output error") on commit, not
    ENOSPC, so an EIO with (almost) no free space left is a full disk too."""
    if isinstance(exc, lmdb.MapFullError):
        return SaetuiInputError(
            f"the index {path} reached its map size: everything committed so far is kept; "
            "resume with a larger map_size."
        )
    if not isinstance(exc, (lmdb.Error, OSError)):
        return exc
    text = str(exc)
    code = getattr(exc, "errno", None)
    full = code == errno.ENOSPC or "No space left" in text
    io_error = code == errno.EIO or "Input/output error" in text
    if io_error and _free_bytes(path) < 4 << 20:
        full = True
    if full:
        return SaetuiInputError(
            f"the disk holding the index {path} is full: everything committed so far is kept; "
            "free space and run the same command again to resume."
        )
    if io_error:
        return SaetuiInputError(
            f"the disk holding the index {path} reported an I/O error: everything committed "
            "so far is kept; check the disk (dmesg), then run the same command again."
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "Read-only file system" in text:
        return SaetuiInputError(
            f"the index {path} cannot be written ({text}): choose a writable directory."
        )
    return exc


def _free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        stat = os.statvfs(probe)
    except OSError:
        return 1 << 62
    return stat.f_bavail * stat.f_frsize
