"""What the feature view asks of the app: open a feature (from any list), step through the
table's order, ablate on the top contexts, shade the probe's text, open the context view,
copy a reference; and the probe's model service, started on first use."""

from __future__ import annotations

import shlex
import threading
from typing import Any

from textual import work
from textual.worker import get_current_worker

from saetui.analysis.service import InProcessProbe, ProbeProcess, ProbeService
from saetui.tui.actions.base import AppPart
from saetui.tui.messages import OpenFeature
from saetui.tui.screens.context import ContextScreen
from saetui.tui.widgets.feature_table import FeatureTable
from saetui.tui.widgets.feature_view import FeatureView
from saetui.tui.widgets.probe_pane import ProbePane

ABLATED_CONTEXTS = 10  # top contexts an ablation re-runs


class FeatureActions(AppPart):
    """The feature view's requests, and the probe's model."""

    model_loader: Any  # Callable[[], ProbeInputs] | None
    _probe_lock: threading.Lock

    def on_open_feature(self, message: OpenFeature) -> None:
        self.open_feature(message.feature)

    def on_feature_view_step(self, message: FeatureView.Step) -> None:
        self._step(message.feature, message.delta)

    @work(thread=True, exclusive=True, exit_on_error=False, group="step")
    def _step(self, feature: int, delta: int) -> None:
        query = self.query_one(FeatureTable).query_state
        target = self.source.step(query, feature, delta)
        if target == feature:
            self.call_from_thread(self.notify, "no further feature in the table's order")
        elif not get_current_worker().is_cancelled:
            self.call_from_thread(self.open_feature, target)

    def on_feature_view_ablate(self, message: FeatureView.Ablate) -> None:
        self.notify(f"Ablating #{message.feature} on its top contexts (loads the model once)…")
        self._ablate(message.feature)

    @work(thread=True, exclusive=True, exit_on_error=False, group="ablate")
    def _ablate(self, feature: int, contexts: int = ABLATED_CONTEXTS) -> None:
        """Each top context re-run with the feature removed (results kept in the index)."""
        view = self.query_one(FeatureView)
        deltas: dict[tuple[int, int], float] = {}
        effects: dict[tuple[int, int], Any] = {}
        means = []
        try:
            inputs = self.source.ablation_inputs(feature, contexts)
            for done, (where, token_ids) in enumerate(inputs, 1):
                summary = self.source.cached_ablation(feature, where)
                if summary is None:
                    result = self.probe_service().ablate(token_ids, feature)
                    position = where[1]
                    summary = {
                        "delta": result.delta_loss[position],
                        "mean": result.mean_delta_where_fires,
                        "next": result.tokens[position + 1]
                        if position + 1 < len(token_ids)
                        else "",
                        "promoted": result.promoted[position][:3],
                        "suppressed": result.suppressed[position][:3],
                    }
                    self.source.keep_ablation(feature, where, summary)
                if get_current_worker().is_cancelled:
                    return
                deltas[where] = float(summary["delta"])
                effects[where] = summary
                means.append(float(summary["mean"]))
                note = (
                    f"  ablation ({done}/{len(inputs)}): loss where it fires "
                    f"{sum(means) / len(means):+.3f} on average; Δ = next-token loss change"
                )
                self.call_from_thread(view.show_ablations, feature, deltas, note, effects)
        except Exception as error:
            if not get_current_worker().is_cancelled:
                self.call_from_thread(self.notify, f"Ablation failed: {error}", severity="error")

    def on_feature_view_probe_feature(self, message: FeatureView.ProbeFeature) -> None:
        pane = self.query_one(ProbePane)
        self.action_show_tab("probe")
        pane.shade_by(message.feature)

    def on_feature_view_open_context(self, message: FeatureView.OpenContext) -> None:
        def opened(feature: int | None) -> None:
            if feature is not None:
                self.open_feature(feature)

        self.push_screen(ContextScreen(message.feature, message.context), opened)

    def action_copy_reference(self, feature: int) -> None:
        """A reference a colleague can open: the command and the index path."""
        reference = f"saetui open {shlex.quote(str(self.index_path.resolve()))} --feature {feature}"
        self.copy_to_clipboard(reference)
        self.notify(f"Copied (OSC 52): {reference}")

    # ------------------------------------------------------------------ probe model

    def probe_service(self) -> ProbeService:
        """The probe's model and SAE: a child process started on first use (or the
        in-process ``model_loader`` given to the app). Blocking: call from a worker."""
        with self._probe_lock:
            if self._probe is None:
                if self.model_loader is not None:
                    self._probe = InProcessProbe(self.model_loader)
                else:
                    from saetui.analysis.probe import probe_spec_from_run

                    spec = probe_spec_from_run(
                        self.source.run_state().config, self.source.run_details()
                    )
                    self._probe = ProbeProcess(spec)
            return self._probe
