"""The metrics phase: reconstruction metrics accumulated while collecting (their sums saved
in the index, caught up after a resume), CE loss and KL on a sample of the collection's
windows, densities and the SAE's weight metrics; stored in the index, and recorded done."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from saetui.collect.distributed import Team
from saetui.collect.encoding import encode_windows_of
from saetui.collect.evaluate import EncodedWindows, add_reconstruction, measure_sample
from saetui.collect.index_ops import index_batches, precision
from saetui.collect.inputs import LoadedRun
from saetui.collect.job import CollectConfig, CollectProgress, Reporter
from saetui.collect.metrics import (
    BehaviourMetrics,
    ReconstructionAccumulator,
    density_metrics,
    merge_families,
    saelens_density_metrics,
    special_token_ids,
    weight_metrics,
)

RECONSTRUCTION_STATE = "reconstruction_state"  # meta: the folded reconstruction sums
RECONSTRUCTION_SAVE_S = 10.0
# The CE/KL sample when --metrics-tokens is not given: this share of the collection's tokens,
# at least CE_SAMPLE_MIN_TOKENS (or every token of a smaller run), at most CE_SAMPLE_MAX_TOKENS.
CE_SAMPLE_FRACTION = 0.01
CE_SAMPLE_MIN_TOKENS = 512
CE_SAMPLE_MAX_TOKENS = 20_000


class Reconstruction:
    """Both families' reconstruction metrics from the collection's own activations: added
    as batches are encoded, their folded sums saved in the index every few seconds (and on
    a stop), and, after a resume, caught up by re-encoding the few windows the saved sums
    do not cover."""

    def __init__(
        self, config: CollectConfig, run: LoadedRun, writer: Any, layout: Any = None
    ) -> None:
        self._config, self._run, self._writer, self._layout = config, run, writer, layout
        self.special_ids = special_token_ids(run.model.tokenizer)
        state = writer.get_meta(RECONSTRUCTION_STATE)
        if isinstance(state, dict) and state.get("folded_windows", 0) > writer.next_window:
            state = None  # written for windows this index does not hold
        self.accumulator = ReconstructionAccumulator.from_state(
            state, run.sae.d_in, run.sae.d_sae, run.model.device
        )
        self._saved = time.monotonic()

    def add(self, batch: Any, encoded: EncodedWindows, check_stop: Callable[[], None]) -> None:
        first = int(batch.window_ids[0])
        next_window = self.accumulator.next_window
        if next_window is not None and next_window < first:
            self.catch_up(first, check_stop)
        add_reconstruction(self.accumulator, self._run.sae, batch, encoded, self.special_ids)
        if time.monotonic() - self._saved >= RECONSTRUCTION_SAVE_S:
            self.save()

    def save(self) -> None:
        if self.accumulator.folded_windows:
            self._writer.put_meta(RECONSTRUCTION_STATE, self.accumulator.state())
        self._saved = time.monotonic()

    def catch_up(self, end: int, check_stop: Callable[[], None]) -> None:
        """Re-encode committed windows [next, end) (those this rank holds) that the saved
        sums do not cover."""
        from saetui.index import open_index

        layout = self._layout
        ids = [
            w
            for w in range(self.accumulator.next_window or 0, end)
            if layout is None or layout.owns(w)
        ]
        if not ids:
            return
        with open_index(self._config.work_dir) as index:
            for batch in index_batches(index, ids, self._config.inputs.batch_size):
                check_stop()
                encoded = encode_windows_of(self._run, batch)
                add_reconstruction(
                    self.accumulator, self._run.sae, batch, encoded, self.special_ids
                )


def ce_sample_windows(windows: int, tokens: int, requested: int | None) -> tuple[list[int], int]:
    """The windows whose CE loss and KL are measured, spread evenly over the collection, and
    the token budget they stand for: ``requested`` tokens, or (None) CE_SAMPLE_FRACTION of
    the collection's ``tokens`` within CE_SAMPLE_MIN_TOKENS and CE_SAMPLE_MAX_TOKENS."""
    if windows <= 0:
        return [], 0
    if requested is None:
        budget = round(tokens * CE_SAMPLE_FRACTION)
        budget = min(max(budget, CE_SAMPLE_MIN_TOKENS), CE_SAMPLE_MAX_TOKENS)
    else:
        budget = requested
    per_window = max(tokens / windows, 1.0)
    count = min(windows, max(1, int(np.ceil(budget / per_window))))
    picked = sorted({int((i + 0.5) * windows / count) for i in range(count)})
    return picked, budget


@dataclasses.dataclass
class MeasuredSample:
    """CE loss and KL already measured on the sample ``windows`` (with other SAEs, sharing
    the forward passes that do not depend on the SAE): the metrics phase uses them."""

    windows: list[int]
    behaviour: BehaviourMetrics


def metrics_done(writer: Any) -> bool:
    """Whether the index records its metrics phase done for the windows it holds."""
    phases = writer.get_meta("phases") or {}
    return bool(phases.get("metrics", {}).get("windows") == writer.next_window)


def metrics_step(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: Reporter,
    check_stop: Callable[[], None],
    reconstruction: Reconstruction,
    team: Team,
    enter: Callable[[str], None],
    measured: MeasuredSample | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The metrics phase, skipped when the index records it done (then its stored metrics),
    its completion recorded; ``measured``: CE loss and KL already measured on the sample.
    Returns the metrics and ``["metrics"]`` when skipped."""
    writer.flush()
    enter("metrics")
    if team.all_agree(metrics_done(writer)):
        return _stored_metrics(writer, team), ["metrics"]
    metrics = _metrics_phase(
        config, run, writer, report, check_stop, reconstruction, team, measured
    )
    phases = writer.get_meta("phases") or {}
    phases["metrics"] = {"windows": writer.next_window, "finished": time.time()}
    writer.put_meta("phases", phases)
    return metrics, []


def _metrics_phase(
    config: CollectConfig,
    run: LoadedRun,
    writer: Any,
    report: Reporter,
    check_stop: Callable[[], None],
    reconstruction: Reconstruction,
    team: Team | None = None,
    measured: MeasuredSample | None = None,
) -> dict[str, Any]:
    """Reconstruction metrics of every collected token (accumulated while collecting), CE
    loss and KL of both families on a sample of the collection's windows, densities over the
    whole run, the SAE's weight metrics. In a distributed run each rank adds its own windows
    and the sample windows it holds; the sums are added over ranks (every SAELens batch of
    16 windows lies within one rank's block), and the main rank stores the result."""
    from saetui.index import open_index

    team = team or Team()
    summaries = writer.summaries
    report(CollectProgress("metrics", message="reconstruction metrics"), force=True)
    reconstruction.catch_up(writer.next_window, check_stop)
    accumulator = reconstruction.accumulator
    accumulator.finish()
    accumulator.reduce(team.sum_array)
    windows, collected, counted = team.sum_ints(
        [writer.windows_added, int(summaries.n_tokens), int(summaries.n_counted)]
    )
    sample, budget = ce_sample_windows(windows, collected, config.metrics_tokens)
    share = len(sample) / max(windows, 1)
    report(
        CollectProgress(
            "metrics",
            0,
            None,
            message=f"CE loss and KL on {len(sample):,} of {windows:,} windows ({share:.1%})",
        ),
        force=True,
    )
    layout = team.layout
    mine = [w for w in sample if layout is None or layout.owns(w)]
    with open_index(config.work_dir) as index:
        mine_tokens = sum(len(index.window(w).token_ids) for w in mine)
        # small batches: a stop waits for at most one batch of five forward passes
        if measured is not None and measured.windows == mine:
            behaviour = measured.behaviour
        else:
            batches = index_batches(index, mine, max(1, config.inputs.batch_size // 4))
            behaviour = measure_sample(
                run.model,
                run.sae,
                run.hook,
                batches,
                progress=lambda n: report(CollectProgress("metrics", n, mine_tokens)),
                check_stop=check_stop,
            )
    behaviour = BehaviourMetrics.combine(team.gather_objects(behaviour))
    sample_tokens = team.sum_ints([mine_tokens])[0]
    reconstructed = accumulator.result()
    saelens_tokens = reconstructed.get("saelens", {}).get("tokens", 0)
    saelens_counts = accumulator.saelens_feature_counts.cpu().numpy()
    counts = team.sum_array(summaries.count.cpu().numpy().astype(np.int64))
    weights = weight_metrics(run.sae)
    cosine = np.asarray(weights["encoder_decoder_cosine_sim"])
    metrics = merge_families(
        reconstructed,
        density_metrics(counts, counted),
        {"collection_tokens": counted},
        {
            "saelens": {
                **saelens_density_metrics(saelens_counts, saelens_tokens),
                "encoder_decoder_cosine_sim_mean": float(cosine.mean()),
            }
        },
        behaviour.result(),
        {
            "ce_sample": {
                "windows": len(sample),
                "of_windows": windows,
                "tokens": sample_tokens,
                "of_tokens": collected,
                "requested_tokens": config.metrics_tokens,
                "budget_tokens": budget,
                "rule": "windows spread evenly over the collection",
            },
            "precision": precision(run),
        },
    )
    if team.is_main:
        writer.put_metrics(metrics)
        density = saelens_counts / max(saelens_tokens, 1)
        writer.put_meta("saelens_feature_metrics", {"feature_density": density.tolist(), **weights})
    return metrics


def _stored_metrics(writer: Any, team: Team) -> dict[str, Any]:
    """Metrics an earlier run stored (in the main rank's shard), on every rank."""
    return team.gather_objects(writer.get_meta("metrics") if team.is_main else None)[0] or {}
