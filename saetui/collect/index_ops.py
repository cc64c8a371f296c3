"""The index a collection writes: its writer opened (or resumed) with the run's identity and
details, its stored request and committed windows read back, a rebuilt index swapped in
for the old one, a distributed run's shards gathered."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saetui.collect.distributed import Team
from saetui.collect.inputs import LoadedRun
from saetui.collect.job import CollectConfig, request_record
from saetui.errors import SaetuiInputError
from saetui.lm.device import dtype_name


def run_config_of(config: CollectConfig, run: LoadedRun) -> dict[str, Any]:
    """The fields that identify a run: a resumed index must match all of them."""
    inputs = config.inputs
    return {
        "model": inputs.model,
        "hook": run.hook,
        "numerics": run.numerics,
        "dtype": dtype_name(run.model.dtype),
        "sae_path": str(Path(inputs.sae).resolve()),
        "sae_sha256": run.sae.content_hash(),
        "sae_format": run.sae.format,
        "sae_architecture": run.sae.architecture,
        "batchtopk_mode": run.sae.batchtopk_mode if run.sae.architecture == "batchtopk" else None,
        "threshold": _threshold_value(run.sae),
        "corpus": str(inputs.data),
        "corpus_sha256": run.corpus.content_hash,
        "text_field": inputs.text_field,
        "ctx_len": inputs.ctx_len,
    }


def _threshold_value(sae: Any) -> float | None:
    threshold = getattr(sae, "threshold", None)
    if sae.architecture == "batchtopk" and threshold is not None and threshold.numel() == 1:
        return float(threshold)
    return None


def open_writer(config: CollectConfig, run: LoadedRun, team: Team) -> Any:
    from saetui.index import IndexWriter

    if team.is_main:
        _check_other_shards(config.work_dir, team.world, config.overwrite)
    writer = IndexWriter.create_or_resume(
        config.work_dir,
        run_config_of(config, run),
        d_sae=run.sae.d_sae,
        ctx_len=config.inputs.ctx_len,
        vocab=run.model.vocabulary(),
        overwrite=config.overwrite,
        top_k=config.top_k_examples,
        summary_device=run.model.device,
        shard=team.rank,
        layout=team.layout,
    )
    try:
        details = {**run.model.describe(), "sae": _sae_facts(run.sae), "precision": precision(run)}
        writer.put_meta("run_details", details)
        if run.sae.history:  # the TUI reads the training history from the index, not the SAE
            writer.put_meta("sae_history", run.sae.history)
        writer.put_meta("request", request_record(config))
    except BaseException:
        writer.close()
        raise
    return writer


def _check_other_shards(path: Path, world: int, overwrite: bool) -> None:
    """Shards past this run's ranks come from a run with more processes: removed with
    overwrite, refused otherwise (they would be read as part of this index)."""
    import shutil

    from saetui.errors import SaetuiInputError
    from saetui.index import format as fmt

    if not Path(path).is_dir():
        return
    extra = sorted(
        p
        for p in Path(path).iterdir()
        if p.is_dir()
        and p.name.startswith(fmt.SHARD_PREFIX)
        and p.name[len(fmt.SHARD_PREFIX) :].isdigit()
        and int(p.name[len(fmt.SHARD_PREFIX) :]) >= world
    )
    if not extra:
        return
    if overwrite:
        for shard in extra:
            shutil.rmtree(shard)
        return
    from saetui.index.merge import read_shard

    try:
        layout = read_shard(extra[-1], int(extra[-1].name[len(fmt.SHARD_PREFIX) :])).layout
        by = f"{layout.world} processes" if layout else "more processes"
    except SaetuiInputError:
        by = "more processes"
    raise SaetuiInputError(
        f"the index {path} was collected by {by} (it holds {extra[-1].name}), not "
        f"{world}: run again with as many processes to resume it, or pass --overwrite to "
        "rebuild it."
    )


def _sae_facts(sae: Any) -> dict[str, Any]:
    from saetui.sae import describe

    return {key: value for key, value in describe(sae).items() if key != "path"}


def precision(run: LoadedRun) -> dict[str, str]:
    """The dtypes the model runs in and the SAE encodes in (its own, whatever the model's)."""
    return {"model": dtype_name(run.model.dtype), "sae": dtype_name(run.sae.dtype)}


def stored_request(path: Path) -> Any:
    from saetui.index import open_index

    try:
        with open_index(path) as index:
            return index.get_meta("request")
    except SaetuiInputError:
        return None


def swap_in(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` index at ``out``; the old one's labels come along."""
    retired = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    labels = out / "user"
    if labels.is_dir() and not (staging / "user").exists():
        labels.rename(staging / "user")
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)


def gather_shards(config: CollectConfig, team: Team, say: Callable[[str], None] | None) -> None:
    """Copy every rank's finished shard from its shard directory into ``config.out``."""
    from saetui.index.merge import copy_shard, verify_index

    if Path(config.work_dir).resolve() != Path(config.out).resolve():
        copy_shard(config.work_dir, team.rank, config.out, replace=True)
    team.finish()
    if team.is_main:
        report = verify_index(config.out)
        if say is not None:
            say(report.summary())


def index_batches(index: Any, window_ids: Any, batch_size: int) -> Iterator[Any]:
    """Window batches (as :func:`saetui.corpus.batch_windows` makes them) of committed
    windows read back from an index: the collection's own tokens, no re-tokenising."""
    from saetui.corpus.windows import Segment, WindowBatch

    ids = [int(w) for w in window_ids]
    for a in range(0, len(ids), batch_size):
        views = [index.window(w) for w in ids[a : a + batch_size]]
        width = max(len(v.token_ids) for v in views)
        tokens = np.zeros((len(views), width), dtype=np.int64)
        mask = np.zeros((len(views), width), dtype=bool)
        for row, view in enumerate(views):
            tokens[row, : len(view.token_ids)] = view.token_ids
            mask[row, : len(view.mask)] = view.mask
        yield WindowBatch(
            tokens=tokens,
            lengths=np.array([len(v.token_ids) for v in views], dtype=np.int64),
            mask=mask,
            window_ids=np.array(ids[a : a + batch_size], dtype=np.int64),
            segments=[
                [Segment(s.doc_id, s.doc_offset, s.start, s.length) for s in v.segments]
                for v in views
            ],
        )
