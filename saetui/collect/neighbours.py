"""The neighbours phase: decoder-cosine neighbours, logit effects and co-occurrence
neighbours, for every feature, in bounded memory, interruptible and resumable, shared
among the ranks of a distributed run.

Each rank takes a contiguous share of the feature rows. Decoder cosine and logit effects
need only the SAE and the model (each rank computes its rows). Co-occurrence reads the
forward index once, in groups of windows in global order: each rank counts the pairs of
the windows it collected (its own shard, on its own disk), the counts of every row go to
the rank that owns it, which adds them to its bounded candidate tables
(analysis/cooccurrence.py). Folds happen when the pending entries of all ranks pass a
budget, so where they happen depends on the data only and a run with any number of ranks
-- or one stopped and resumed -- gives the same lists.

Progress survives a stop: each rank keeps its decoder-cosine rows done so far and, after
folds the ranks agree on, its co-occurrence tables, in ``neighbours-*.npz`` next to its
shard; the next run continues from them. Lists are stored (by the main rank) only when
all are computed, so a stop leaves none half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from saetui.analysis.cooccurrence import (
    DEFAULT_CANDIDATES,
    DEFAULT_PENDING_PAIRS,
    GROUP_TOKENS,
    METRICS,
    CooccurrenceCounter,
    pair_counts,
    tokens_matrix,
)
from saetui.collect.distributed import Team
from saetui.collect.job import CollectProgress
from saetui.index.layout import ShardLayout

CHECKPOINT_S = 60.0  # at most this much co-occurrence work is redone after a stop
DECODER_FILE = "neighbours-decoder.npz"
COOCCURRENCE_FILE = "neighbours-cooccurrence.npz"


def neighbours_phase(
    config: Any,
    run: Any,
    writer: Any,
    report: Callable[..., None],
    check_stop: Callable[[], None],
    team: Team,
    work_dir: Path,
) -> None:
    """Compute every neighbour list and store them in the main rank's shard."""
    from saetui.analysis.neighbours import logit_effects
    from saetui.index import open_index

    d_sae = run.sae.d_sae
    lo, hi = team.row_range(d_sae)
    state_dir = Path(writer.shard_path)
    report(CollectProgress("neighbours", message="decoder-cosine neighbours"), force=True)
    w_dec = run.sae.W_dec.detach()
    dec_ids, dec_scores = _decoder_rows(
        w_dec, lo, hi, config.neighbours, check_stop, state_dir, run.sae.content_hash()
    )
    w_u = getattr(run.model.bridge, "W_U", None)
    w_out = run.model.residual_directions(run.hook, w_dec)  # hook_z: through W_O
    lists: dict[str, np.ndarray] = {
        "decoder_cosine/ids": dec_ids,
        "decoder_cosine/scores": dec_scores,
    }
    if w_u is not None and w_out is not None and w_u.shape[0] == w_out.shape[1]:
        report(CollectProgress("neighbours", message="logit effects"), force=True)
        effects = logit_effects(
            w_out[lo:hi],
            w_u.detach(),
            check_stop=check_stop,
            vocab_size=run.model.tokenizer_vocab_size,
        )
        for name, ids, values in (
            ("logit_promoted", effects[0], effects[1]),
            ("logit_suppressed", effects[2], effects[3]),
        ):
            lists[f"{name}/ids"], lists[f"{name}/scores"] = ids.numpy(), values.numpy()
    # Co-occurrence reads the committed forward index: the writer's data must be on disk.
    writer.flush()
    report(CollectProgress("neighbours", message="co-occurrence"), force=True)
    counts = team.sum_array(writer.summaries.count.cpu().numpy().astype(np.int64))
    tokens, n_windows = team.sum_ints([int(writer.summaries.n_counted), writer.windows_added])
    with open_index(work_dir) as index:
        result = cooccurrence_rows(
            index,
            ForwardSource(writer.shard, writer.layout, n_windows),
            counts,
            tokens,
            team,
            (lo, hi),
            top_n=config.neighbours,
            min_count=config.cooccurrence_min_count,
            check_stop=check_stop,
            report=report,
            state_dir=state_dir,
        )
    for metric in METRICS:
        lists[f"{metric}/ids"], lists[f"{metric}/scores"] = (
            result.ids[metric],
            result.scores[metric],
        )
    gathered = team.gather_rows(lists)
    if gathered is not None:
        names = dict.fromkeys(key.split("/")[0] for key in gathered)
        for name in names:
            writer.put_neighbours(name, gathered[f"{name}/ids"], gathered[f"{name}/scores"])
        writer.put_meta(
            "cooccurrence",
            {
                "candidates": DEFAULT_CANDIDATES,
                "features_overflowed": team.sum_ints([result.overflowed])[0],
            },
        )
    else:
        team.sum_ints([result.overflowed])
    for name in (DECODER_FILE, COOCCURRENCE_FILE):
        (state_dir / name).unlink(missing_ok=True)


def _decoder_rows(
    w_dec: Any,
    lo: int,
    hi: int,
    top_n: int,
    check_stop: Callable[[], None],
    state_dir: Path,
    sae_sha256: str,
    rows_per_step: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Decoder-cosine neighbours of rows [lo, hi), resuming from and saving to a file of
    this rank's (no other rank needs these rows until they are all done)."""
    from saetui.analysis.neighbours import decoder_cosine_neighbours

    d_sae = w_dec.shape[0]
    n = min(top_n, d_sae - 1)
    identity = {"d_sae": d_sae, "rows": [lo, hi], "top_n": n, "sae_sha256": sae_sha256}
    saved = _load(state_dir / DECODER_FILE, identity)
    if saved is not None:
        done, ids, scores = int(saved["done"]), saved["ids"], saved["scores"]
    else:
        done = lo
        ids = np.zeros((hi - lo, n), dtype=np.int64)
        scores = np.zeros((hi - lo, n), dtype=np.float32)
    last_save = time.monotonic()
    for start in range(done, hi, rows_per_step):
        stop = min(start + rows_per_step, hi)
        part_ids, part_scores = decoder_cosine_neighbours(
            w_dec, top_n=top_n, check_stop=check_stop, rows=(start, stop)
        )
        ids[start - lo : stop - lo], scores[start - lo : stop - lo] = part_ids, part_scores
        if stop < hi and time.monotonic() - last_save >= CHECKPOINT_S:
            _save(state_dir / DECODER_FILE, identity, done=stop, ids=ids, scores=scores)
            last_save = time.monotonic()
    return ids, scores


@dataclass
class ForwardSource:
    """Where a rank reads the forward index: its shard, the windows dealt to it, and the
    number of windows of the whole collection."""

    shard: int
    layout: ShardLayout | None
    windows: int

    def local_range(self, first: int, end: int) -> tuple[int, int]:
        """This shard's local window ids of the global windows [first, end)."""
        if self.layout is None:
            return first, end
        return self.layout.owned_below(first), self.layout.owned_below(end)


def cooccurrence_rows(
    index: Any,
    source: ForwardSource,
    counts: np.ndarray,
    tokens: int,
    team: Team,
    rows: tuple[int, int],
    *,
    top_n: int,
    min_count: int,
    check_stop: Callable[[], None],
    report: Callable[..., None],
    state_dir: Path,
    candidates: int = DEFAULT_CANDIDATES,
    pending_pairs: int = DEFAULT_PENDING_PAIRS,
    group_tokens: int = GROUP_TOKENS,
) -> Any:
    """Co-occurrence neighbours of feature rows ``rows`` over the whole collection
    (``counts``, ``tokens``: per-feature token counts and counted tokens of all ranks)."""
    d_sae = index.meta.d_sae
    n_windows = source.windows
    group = max(1, group_tokens // index.meta.ctx_len)
    n_groups = -(-n_windows // group)
    counter = CooccurrenceCounter(
        d_sae,
        counts,
        tokens,
        rows=rows,
        top_n=top_n,
        min_count=min_count,
        candidates=candidates,
    )
    identity = {
        "d_sae": d_sae,
        "rows": list(rows),
        "top_n": top_n,
        "min_count": min_count,
        "candidates": candidates,
        "pending_pairs": pending_pairs,
        "group_windows": group,
        "windows": n_windows,
        "tokens": tokens,
        "counts_sha256": hashlib.sha256(counts.tobytes()).hexdigest(),
        "world": team.world,
    }
    path = state_dir / COOCCURRENCE_FILE
    saved = _load(path, identity)
    start = int(saved["next_group"]) if saved is not None else -1
    # resume only from a fold every rank saved
    if len(set(team.gather_objects(start))) == 1 and start >= 0 and saved is not None:
        counter.load_state({k: v for k, v in saved.items() if k != "next_group"})
    else:
        start = 0
    last_save = time.monotonic()
    for j in range(start, n_groups):
        a, b = j * group, min((j + 1) * group, n_windows)
        first, end = source.local_range(a, b)
        matrix = _forward_matrix(index, source.shard, first, end, d_sae)
        pairs = pair_counts(matrix) if matrix.nnz else sp.csr_matrix((d_sae, d_sae), dtype=np.int32)
        check_stop()
        counter.add(team.exchange_rows(pairs))
        del pairs
        want_save = int(team.is_main and time.monotonic() - last_save >= CHECKPOINT_S)
        pending, save = team.sum_ints([counter.pending_entries, want_save])
        if pending >= pending_pairs:
            counter.fold()
            if save and j + 1 < n_groups:
                _save(path, identity, next_group=j + 1, **counter.state())
                last_save = time.monotonic()
        report(
            CollectProgress(
                "neighbours",
                tokens_done=round(tokens * b / max(n_windows, 1)),
                tokens_total=tokens,
                message="co-occurrence",
            )
        )
    return counter.result()


def _forward_matrix(index: Any, shard: int, first: int, end: int, d_sae: int) -> sp.csr_matrix:
    """Binary token x feature matrix of a shard's windows [first, end) (local ids)."""
    offsets, ids = [np.zeros(1, dtype=np.int64)], []
    if end > first:
        for chunk in index.iter_forward(shard=shard, first=first, end=end):
            ids.append(chunk.feature_ids)
            offsets.append(offsets[-1][-1] + chunk.offsets[1:])
    if not ids:
        return sp.csr_matrix((0, d_sae), dtype=np.int32)
    return tokens_matrix(np.concatenate(offsets), np.concatenate(ids), d_sae)


def _save(path: Path, identity: dict[str, Any], **arrays: Any) -> None:
    """Write a state file atomically (a crash leaves the old one or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, identity=np.array(json.dumps(identity, sort_keys=True)), **arrays)
    os.replace(tmp, path)


def _load(path: Path, identity: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays of a state file written for exactly ``identity``, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["identity"]) != json.dumps(identity, sort_keys=True):
                return None
            return {key: data[key] for key in data.files if key != "identity"}
    except (OSError, ValueError, KeyError):
        return None
