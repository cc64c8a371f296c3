"""What the directory exports share: an atomic output directory, the ``--features`` spec,
and progress lines no more often than a few a second."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from saetui.errors import SaetuiInputError

MARKER = "saetui-export.json"  # names the format of a directory saetui wrote


@contextmanager
def staged_directory(out: Path, export_format: str) -> Iterator[Path]:
    """Yield an empty staging sibling of ``out``; on success it replaces ``out`` by renames,
    on failure it is removed, so ``out`` holds a whole export or what it held before.

    ``out`` may be missing, empty, or an earlier saetui export of the same format (its
    marker file says so); anything else is refused rather than deleted."""
    out = Path(out).expanduser().absolute()
    if out.exists():
        _check_replaceable(out, export_format)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-staging-", dir=out.parent))
    except OSError as error:
        raise SaetuiInputError(
            f"cannot write next to {out}: {error.strerror or error}; choose a writable --out."
        ) from None
    try:
        yield staging
        (staging / MARKER).write_text(
            json.dumps({"format": export_format, "written": time.time()}) + "\n"
        )
        if out.exists():
            old = out.with_name(f".{out.name}-replaced-{os.getpid()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_replaceable(out: Path, export_format: str) -> None:
    if not out.is_dir():
        raise SaetuiInputError(
            f"--out {out} is a file: give a directory for the {export_format} export."
        )
    if not any(out.iterdir()):
        return
    try:
        written = json.loads((out / MARKER).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        written = None
    if written != export_format:
        raise SaetuiInputError(
            f"--out {out} already holds files that are not a saetui {export_format} export: "
            "give a new or empty directory (an earlier export of this format is replaced)."
        )


def parse_feature_spec(spec: str | None, d_sae: int) -> np.ndarray | None:
    """Feature ids from ``"3,10-20,512"`` (ranges inclusive), sorted and unique; None for
    no spec (every feature)."""
    if spec is None:
        return None
    ids: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = (int(low), int(high)) if sep else (int(part), int(part))
        except ValueError:
            raise SaetuiInputError(
                f"--features {spec!r}: {part!r} is not a feature id or a range; expected e.g. "
                "'3,10-20,512'."
            ) from None
        if first > last or first < 0 or last >= d_sae:
            raise SaetuiInputError(
                f"--features {spec!r}: {part!r} is outside this index's features 0-{d_sae - 1}; "
                "give ids in that range."
            )
        ids.extend(range(first, last + 1))
    if not ids:
        raise SaetuiInputError(f"--features {spec!r} names no feature; expected e.g. '3,10-20'.")
    return np.unique(np.asarray(ids, dtype=np.int64))


class Throttled:
    """Calls ``say`` at most every ``interval`` seconds (and always for ``final``)."""

    def __init__(self, say: Callable[[str], None], interval: float = 2.0) -> None:
        self._say, self._interval, self._last = say, interval, 0.0

    def __call__(self, message: str, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self._last >= self._interval:
            self._last = now
            self._say(message)
