"""EleutherAI delphi's latent cache, written from an index, so delphi's explainers and
scorers (detection, fuzzing) run without collecting activations again; and delphi's
explanations and scores read back (``saetui labels import``).

Layout under OUT (what delphi's ``LatentCache.save_splits`` / ``save_config`` write and
``LatentDataset`` reads)::

    latents/<hookpoint>/<start>_<end>.safetensors   one file per latent range (end inclusive):
        locations    uint16 | uint32 [n, 3]: (batch, position, latent - start); uint16 when
                     both the batch and the latent offset fit, as delphi decides
        activations  float16 [n]: the nonzero activations (|a| > 1e-5, delphi's threshold)
        tokens       int32 [n_batches, ctx_len]: every window's tokens (delphi reads them from
                     whichever file it opens first, so each file holds them)
    latents/<hookpoint>/config.json                 delphi's CacheConfig fields + model_name
    log/hookpoint_firing_counts.pt                  {hookpoint: int64 [d_sae]} tokens fired on

A "batch" row is one saetui window (shards one after another), its positions the window's;
start tokens and padding carry no activations, as in the index. Written in one streaming
pass: nonzeros go to per-split scratch files, then each safetensors file is assembled by
copying (bounded memory whatever the corpus), all inside a staging directory renamed
into place at the end.

Explanations: ``explanations/<hookpoint>_latent<N>.txt`` holds a JSON string. Scores:
``scores/<scorer>/<hookpoint>_latent<N>.txt`` holds a JSON list of classified examples
(``activating``, ``prediction``, ``correct``, ...); a latent's score is delphi's
balanced accuracy over those with a prediction.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saetui.errors import SaetuiInputError
from saetui.export.staging import Throttled, staged_directory

ACTIVE_THRESHOLD = 1e-5  # delphi keeps |activation| > 1e-5
COPY_ITEMS = 1 << 21  # numbers per read when assembling the files (8 MB of uint32)
LATENT_FILE = re.compile(r"^(?P<hook>.+)_latent(?P<latent>\d+)\.txt$")


@dataclass(frozen=True)
class DelphiExport:
    out: Path
    hookpoint: str
    files: list[Path]
    nonzeros: int
    windows: int
    ctx_len: int
    bytes: int
    seconds: float


def default_hookpoint(hook: str | None) -> str:
    """delphi names hookpoints by the model's module: the residual stream after block L is
    the output of ``layers.L`` (sparsify's and delphi's convention); other hooks keep
    their TransformerLens name."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook or "")
    if match:
        return f"layers.{match.group(1)}"
    return hook or "hook"


def split_ranges(d_sae: int, n_splits: int) -> list[tuple[int, int]]:
    """delphi's latent ranges: ``n_splits`` near-equal parts, each ``(start, end)`` inclusive."""
    bounds = np.linspace(0, d_sae, n_splits + 1).astype(np.int64)
    return [(int(a), int(b) - 1) for a, b in itertools.pairwise(bounds)]


def export_delphi(
    index_path: Path,
    out: Path,
    *,
    n_splits: int = 5,
    hookpoint: str | None = None,
    say: Callable[[str], None] = print,
) -> DelphiExport:
    """Write the index's activations as delphi's latent cache under ``out``."""
    from saetui.index import open_index

    started = time.perf_counter()
    with open_index(index_path) as index:
        d_sae = index.meta.d_sae
        if not 1 <= n_splits <= d_sae:
            raise SaetuiInputError(
                f"--splits {n_splits} must be between 1 and d_sae ({d_sae}): delphi splits the "
                "latents into that many files."
            )
        if not index.progress().finished:
            say("delphi: the index is still being collected; exporting what is committed")
        config = index.meta.run_config
        ctx_len = index.meta.ctx_len
        hookpoint = hookpoint or default_hookpoint(config.get("hook"))
        if not hookpoint or "/" in hookpoint or hookpoint.startswith("."):
            raise SaetuiInputError(
                f"--hookpoint {hookpoint!r} cannot be a directory name; give the module name "
                "delphi knows the SAE by, e.g. layers.9."
            )
        with staged_directory(Path(out), "delphi") as staging:
            module_dir = staging / "latents" / hookpoint
            module_dir.mkdir(parents=True)
            scratch = staging / ".scratch"
            scratch.mkdir()
            ranges = split_ranges(d_sae, n_splits)
            cache = _stream_nonzeros(index, scratch, ranges, say)
            files = []
            for i, (start, end) in enumerate(ranges):
                path = module_dir / f"{start}_{end}.safetensors"
                _write_split(path, scratch, i, cache, index.meta.ctx_len)
                files.append(path)
                say(f"delphi: wrote {path.name} ({cache.counts[i]:,} activations)")
            _write_config(module_dir / "config.json", index, cache, n_splits)
            _write_firing_counts(staging / "log", hookpoint, cache.firing)
            for part in scratch.iterdir():
                part.unlink()
            scratch.rmdir()
            size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    final = Path(out).expanduser().absolute()
    return DelphiExport(
        out=final,
        hookpoint=hookpoint,
        files=[final / "latents" / hookpoint / p.name for p in files],
        nonzeros=int(sum(cache.counts)),
        windows=cache.windows,
        ctx_len=ctx_len,
        bytes=size,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------- streaming pass


@dataclass
class _Scratch:
    counts: list[int]  # nonzeros per split
    max_batch: list[int]  # largest batch row per split (-1: none)
    max_offset: list[int]  # largest latent - start per split
    firing: np.ndarray  # int64 [d_sae]
    windows: int
    tokens: int
    pad_id: int


class _TokenRows:
    """Appends every window's tokens, padded to ctx_len, in global batch order; windows the
    activation pass skips (no counted token) are read here so no row is missing."""

    def __init__(self, index: Any, handle: Any, ctx_len: int, pad_id: int) -> None:
        self.index, self.handle, self.ctx, self.pad = index, handle, ctx_len, pad_id
        self.written = 0

    def add(self, row: int, shard: int, local: int, view: Any | None = None) -> None:
        while self.written < row:  # a gap: windows of this shard before ``local``
            gap = local - (row - self.written)
            self._put(self.index.window(gap, shard))
        if view is not None and self.written == row:
            self._put(view)

    def _put(self, view: Any) -> None:
        row = np.full(self.ctx, self.pad, dtype=np.int32)
        ids = np.asarray(view.token_ids, dtype=np.int64)[: self.ctx]
        row[: len(ids)] = ids
        row.tofile(self.handle)
        self.written += 1


def _pad_id(index: Any) -> int:
    start = (index.get_meta("run_details") or {}).get("start_token") or {}
    return int(start.get("id") or 0) if isinstance(start, dict) else 0


def _stream_nonzeros(
    index: Any, scratch: Path, ranges: list[tuple[int, int]], say: Callable[[str], None]
) -> _Scratch:
    """One pass over the forward index: (batch, position, latent offset) and the value of
    every active latent appended to its split's scratch files, window tokens to another."""
    progress = index.progress()
    shard_windows = [int(s["windows"]) for s in progress.shards]
    total_windows = sum(shard_windows)
    ctx = index.meta.ctx_len
    d_sae = index.meta.d_sae
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    n = len(ranges)
    cache = _Scratch([0] * n, [-1] * n, [0] * n, np.zeros(d_sae, np.int64), total_windows, 0, 0)
    cache.pad_id = _pad_id(index)
    loc_files = [(scratch / f"{i}.loc").open("wb") for i in range(n)]
    act_files = [(scratch / f"{i}.act").open("wb") for i in range(n)]
    shard_order: list[int] = []
    report = Throttled(say)
    try:
        with (scratch / "tokens").open("wb") as token_handle:
            rows = _TokenRows(index, token_handle, ctx, cache.pad_id)
            for chunk in index.iter_forward():
                if chunk.shard not in shard_order:
                    if shard_order:  # finish the previous shard's trailing windows
                        _finish_shard(rows, shard_order, shard_windows)
                    shard_order.append(chunk.shard)
                base = sum(shard_windows[: len(shard_order) - 1])
                batch, position = _chunk_rows(index, chunk, base, rows)
                lengths = np.diff(chunk.offsets)
                ids = chunk.feature_ids.astype(np.int64)
                values = chunk.values
                keep = np.abs(values) > ACTIVE_THRESHOLD
                b = np.repeat(batch, lengths)[keep]
                p = np.repeat(position, lengths)[keep]
                ids, values = ids[keep], values[keep]
                cache.firing += np.bincount(ids[values > 0], minlength=d_sae)
                split = np.searchsorted(starts, ids, side="right") - 1
                for i in range(n):
                    mine = split == i
                    if not mine.any():
                        continue
                    offset = ids[mine] - starts[i]
                    np.stack([b[mine], p[mine], offset], axis=1).astype(np.uint32).tofile(
                        loc_files[i]
                    )
                    values[mine].astype(np.float16).tofile(act_files[i])
                    cache.counts[i] += int(mine.sum())
                    cache.max_batch[i] = max(cache.max_batch[i], int(b[mine].max()))
                    cache.max_offset[i] = max(cache.max_offset[i], int(offset.max()))
                cache.tokens += len(lengths)
                report(
                    f"delphi: {rows.written:,}/{total_windows:,} windows, "
                    f"{sum(cache.counts):,} activations"
                )
            if shard_order:
                _finish_shard(rows, shard_order, shard_windows)
            if rows.written != total_windows:
                raise SaetuiInputError(
                    f"the index {index.path} has {rows.written:,} readable windows of the "
                    f"{total_windows:,} its progress records: open it again once its collector "
                    "has committed, or collect it again."
                )
    finally:
        for handle in loc_files + act_files:
            handle.close()
    report(f"delphi: {total_windows:,} windows, {sum(cache.counts):,} activations", final=True)
    return cache


def _finish_shard(rows: _TokenRows, order: list[int], shard_windows: list[int]) -> None:
    """Token rows for the last shard's windows after its last counted token."""
    k = len(order) - 1
    end = sum(shard_windows[: k + 1])
    if rows.written < end:
        rows.add(end, order[k], shard_windows[k])


def _chunk_rows(index: Any, chunk: Any, base: int, rows: _TokenRows) -> tuple[Any, Any]:
    """Global batch row and window position of each counted token of a forward chunk."""
    n_tokens = len(chunk.offsets) - 1
    batches, positions = [], []
    local, consumed = chunk.first_window, 0
    while consumed < n_tokens:
        view = index.window(local, chunk.shard)
        rows.add(base + local, chunk.shard, local, view)
        counted = np.flatnonzero(view.mask)
        batches.append(np.full(len(counted), base + local, dtype=np.int64))
        positions.append(counted.astype(np.int64))
        consumed += len(counted)
        local += 1
    if consumed != n_tokens:
        raise SaetuiInputError(
            f"the index {index.path} holds windows whose tokens and activations disagree: "
            "collect it again."
        )
    if not batches:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(batches), np.concatenate(positions)


# ---------------------------------------------------------------------- files


def _write_split(path: Path, scratch: Path, i: int, cache: _Scratch, ctx_len: int) -> None:
    """Assemble one safetensors file (tokens, locations, activations) from scratch files."""
    n = cache.counts[i]
    small = cache.max_batch[i] < 2**16 and cache.max_offset[i] < 2**16
    loc_dtype, loc_name = (np.uint16, "U16") if small else (np.uint32, "U32")
    token_bytes = cache.windows * ctx_len * 4
    loc_bytes = n * 3 * np.dtype(loc_dtype).itemsize
    act_start = token_bytes + loc_bytes
    header = {
        "__metadata__": {"written_by": "saetui", "first_latent": path.stem.split("_")[0]},
        "tokens": {
            "dtype": "I32",
            "shape": [cache.windows, ctx_len],
            "data_offsets": [0, token_bytes],
        },
        "locations": {"dtype": loc_name, "shape": [n, 3], "data_offsets": [token_bytes, act_start]},
        "activations": {
            "dtype": "F16",
            "shape": [n],
            "data_offsets": [act_start, act_start + 2 * n],
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        _copy(scratch / "tokens", handle, np.int32, np.int32, ctx_len)
        _copy(scratch / f"{i}.loc", handle, np.uint32, loc_dtype, 3)
        _copy(scratch / f"{i}.act", handle, np.float16, np.float16, 1)


def _copy(source: Path, handle: Any, stored: Any, written: Any, width: int) -> None:
    with source.open("rb") as part:
        while True:
            block = np.fromfile(part, dtype=stored, count=max(1, COPY_ITEMS // width) * width)
            if not len(block):
                return
            block.astype(written, copy=False).tofile(handle)


def _write_config(path: Path, index: Any, cache: _Scratch, n_splits: int) -> None:
    config = index.meta.run_config
    request = (index.get_meta("request") or {}).get("inputs", {})
    payload = {
        # delphi's CacheConfig fields; the "dataset" is the corpus the index was built from
        "dataset_repo": str(config.get("corpus") or ""),
        "dataset_split": "",
        "dataset_name": "",
        "dataset_column": str(config.get("text_field") or "text"),
        "batch_size": int(request.get("batch_size") or 1),
        "cache_ctx_len": int(index.meta.ctx_len),
        "n_tokens": int(cache.windows * index.meta.ctx_len),
        "n_splits": int(n_splits),
        "model_name": str(config.get("model") or ""),
        "saetui": {
            "index": str(Path(index.path).resolve()),
            "hook": config.get("hook"),
            "sae_path": config.get("sae_path"),
            "d_sae": int(index.meta.d_sae),
            "counted_tokens": int(cache.tokens),
            "note": "batches are saetui windows; start tokens and padding carry no activations",
        },
    }
    path.write_text(json.dumps(payload, indent=4))


def _write_firing_counts(folder: Path, hookpoint: str, firing: np.ndarray) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({hookpoint: torch.from_numpy(firing.copy())}, folder / "hookpoint_firing_counts.pt")


# ---------------------------------------------------------------------- results back


def _latent_files(folder: Path) -> Iterator[tuple[str, int, Path]]:
    for path in sorted(folder.iterdir()):
        match = LATENT_FILE.match(path.name)
        if match and path.is_file():
            yield match.group("hook"), int(match.group("latent")), path


def is_delphi_results(path: Path) -> bool:
    """Whether ``path`` is a delphi run directory or its explanations or scores folder
    (a folder holding ``<hookpoint>_latent<N>.txt`` files, or one level above them)."""
    path = Path(path)
    if not path.is_dir():
        return False
    folders = [path, *(p for p in path.iterdir() if p.is_dir())]
    if (path / "scores").is_dir():
        folders += [p for p in (path / "scores").iterdir() if p.is_dir()]
    return any(any(True for _ in _latent_files(folder)) for folder in folders)


def read_delphi_results(
    path: Path, hookpoint: str | None = None
) -> tuple[dict[int, str], dict[int, dict[str, float]]]:
    """Explanations and per-scorer scores by latent from a delphi run directory (or its
    ``explanations`` / ``scores`` folder). Files of other hookpoints are refused unless
    ``hookpoint`` picks one."""
    path = Path(path)
    if (path / "explanations").is_dir() or (path / "scores").is_dir():
        explanations_dir, scores_dir = path / "explanations", path / "scores"
    elif any(True for _ in _latent_files(path)):
        explanations_dir, scores_dir = path, path / "-"
    else:
        explanations_dir, scores_dir = path / "-", path
    hooks: set[str] = set()
    explanations: dict[int, str] = {}
    if explanations_dir.is_dir():
        for hook, latent, file in _latent_files(explanations_dir):
            hooks.add(hook)
            if hookpoint is None or hook == hookpoint:
                explanations[latent] = _json_string(file)
    scores: dict[int, dict[str, float]] = {}
    if scores_dir.is_dir():
        for scorer_dir in sorted(p for p in scores_dir.iterdir() if p.is_dir()):
            for hook, latent, file in _latent_files(scorer_dir):
                hooks.add(hook)
                if hookpoint is None or hook == hookpoint:
                    value = balanced_accuracy(_json_list(file))
                    if value is not None:
                        scores.setdefault(latent, {})[scorer_dir.name] = value
    if hookpoint is None and len(hooks) > 1:
        raise SaetuiInputError(
            f"{path} holds delphi results of several hookpoints ({', '.join(sorted(hooks))}); "
            "pick the one of this index with --hookpoint."
        )
    if not explanations and not scores:
        raise SaetuiInputError(
            f"{path} holds no delphi explanations or scores"
            + (f" for hookpoint {hookpoint}" if hookpoint else "")
            + ": give a delphi run directory (with explanations/ and scores/)."
        )
    return explanations, scores


def _json_string(path: Path) -> str:
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, OSError):
        raise SaetuiInputError(
            f"{path} is not a delphi explanation (a JSON string); fix or remove it."
        ) from None
    if not isinstance(value, str):
        raise SaetuiInputError(
            f"{path} holds {type(value).__name__}, not a delphi explanation "
            "(a JSON string); fix or remove it."
        )
    return value.strip()


def _json_list(path: Path) -> list[dict[str, Any]]:
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, OSError):
        raise SaetuiInputError(
            f"{path} is not a delphi score file (a JSON list of classified examples); fix or "
            "remove it."
        ) from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SaetuiInputError(
            f"{path} is not a delphi score file (a JSON list of classified examples); fix or "
            "remove it."
        )
    return value


def balanced_accuracy(examples: list[dict[str, Any]]) -> float | None:
    """delphi's per-latent accuracy: the mean of the true-positive and true-negative rates
    over examples that got a prediction; None when none did."""
    judged = [e for e in examples if e.get("prediction") is not None and "activating" in e]
    if not judged:
        return None
    positives = [e for e in judged if e["activating"]]
    negatives = [e for e in judged if not e["activating"]]
    tp = sum(1 for e in positives if float(e["prediction"]) >= 0.5)
    tn = sum(1 for e in negatives if float(e["prediction"]) < 0.5)
    tpr = tp / len(positives) if positives else 0.0
    tnr = tn / len(negatives) if negatives else 0.0
    return (tpr + tnr) / 2
