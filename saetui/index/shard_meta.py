"""A shard's identity for writing: the checks of a writer's settings, the records a new
shard starts with (format, run config, shape, vocabulary, progress), and the comparison a
resuming writer makes against what the shard already holds."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saetui.errors import SaetuiInputError
from saetui.index import codec
from saetui.index import env as envs
from saetui.index import format as fmt
from saetui.index.layout import ShardLayout


def vocab_digest(vocab_json: bytes) -> str:
    return hashlib.sha256(vocab_json).hexdigest()


@dataclass(frozen=True)
class Identity:
    """What every shard of one index shares (``identity`` in the shape record)."""

    record: dict[str, Any]  # run_config, d_sae, ctx_len, vocab_sha256, top_k, samples_per_bin
    vocab_json: bytes

    @property
    def d_sae(self) -> int:
        return int(self.record["d_sae"])

    @property
    def ctx_len(self) -> int:
        return int(self.record["ctx_len"])


def check_identity(
    run_config: dict[str, Any],
    d_sae: int,
    ctx_len: int,
    vocab: Sequence[str],
    top_k: int,
    samples_per_bin: int,
    shard: int,
    layout: ShardLayout | None,
) -> Identity:
    """The identity of a writer's settings, or a SaetuiInputError sentence for a bad one."""
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
    record = {
        "run_config": json.loads(config_json),
        "d_sae": d_sae,
        "ctx_len": ctx_len,
        "vocab_sha256": vocab_digest(vocab_json),
        "top_k": top_k,
        "samples_per_bin": samples_per_bin,
    }
    return Identity(record, vocab_json)


def check_directory(path: Path) -> None:
    """``path`` is missing, empty or an index; else a sentence."""
    if not path.exists():
        return
    if not path.is_dir():
        raise SaetuiInputError(f"{path} is a file: pass a directory for the index.")
    if (path / fmt.MARKER_FILE).exists():
        fmt.read_marker(path)
    elif any(path.iterdir()):
        raise SaetuiInputError(
            f"{path} is a non-empty directory that is not a saetui index: pass a new "
            "or empty directory."
        )


def new_progress() -> dict[str, Any]:
    return {
        "windows": 0,
        "tokens": 0,
        "counted_tokens": 0,
        "nonzeros": 0,
        "summary_windows": 0,
        "summary_serial": 0,
        "commits": 0,
        "finished": False,
    }


def start_or_check(
    shared: envs.SharedEnv,
    path: Path,
    shard: int,
    layout: ShardLayout | None,
    identity: Identity,
) -> dict[str, Any]:
    """The shard's committed progress record: a resumed shard's after checking that it was
    built with the same identity and layout, a new shard's after writing its first
    records."""
    env, meta = shared.env, shared.dbs[fmt.DB_META]
    with env.begin() as txn:
        stored_shape = txn.get(fmt.META_SHAPE, db=meta)
        progress_raw = txn.get(fmt.META_PROGRESS, db=meta)
    if stored_shape is not None:
        stored = json.loads(stored_shape)
        diff = _differing_fields(stored.get("identity", {}), identity.record)
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
        if progress_raw is None:
            raise SaetuiInputError(
                f"shard {shard} of the index {path} has a shape but no progress record: "
                "pass overwrite to rebuild it."
            )
        progress: dict[str, Any] = json.loads(progress_raw)
        return progress
    progress = new_progress()
    shape: dict[str, Any] = {
        "identity": identity.record,
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
        txn.put(fmt.META_CONFIG, fmt.dumps(identity.record["run_config"]), db=meta)
        txn.put(fmt.META_SHAPE, fmt.dumps(shape), db=meta)
        txn.put(fmt.META_VOCAB, codec.compress(identity.vocab_json), db=meta)
        txn.put(fmt.META_PROGRESS, fmt.dumps(progress), db=meta)
    return progress


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
