"""The run side of the app: polling the index, the status line and the run pane, and the
collection's controls (start, pause/resume, quit) — the controller
(:class:`saetui.collect.controller.CollectionController`) decides, this part displays.

Threads: the poll reads the index in a thread worker; the collector child's messages come
from its reader thread as :class:`CollectionEvent` messages, so every state change happens
on the event loop.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from rich.text import Text
from textual import work
from textual.message import Message
from textual.widgets import Static
from textual.worker import get_current_worker

from saetui.collect.controller import STOP_GRACE_SECONDS
from saetui.collect.job import CollectConfig, CollectProgress
from saetui.collect.process import CollectionProcess
from saetui.errors import SaetuiInputError
from saetui.tui.actions.base import AppPart
from saetui.tui.model import RunPlots, RunState
from saetui.tui.source import IndexNotReady
from saetui.tui.widgets.feature_table import FeatureTable
from saetui.tui.widgets.feature_view import FeatureView
from saetui.tui.widgets.run_pane import RunPane

POLL_SECONDS = 1.0
PLOT_SECONDS = 5.0


class CollectionEvent(Message):
    """What the collection process reported (see saetui.collect.process); a newer progress
    update replaces an unprocessed older one."""

    def __init__(self, kind: str, payload: Any) -> None:
        super().__init__()
        self.kind = kind
        self.payload = payload

    def can_replace(self, message: Message) -> bool:
        return (
            self.kind == "progress"
            and isinstance(message, CollectionEvent)
            and message.kind == "progress"
        )


class RunActions(AppPart):
    """Polling, the status line and the collection's controls."""

    _generation: int | None
    _last_plot: float
    _plot_generation: int | None

    # ------------------------------------------------------------------ the controller's state

    @property
    def collect(self) -> CollectConfig | None:
        return self.collection.config

    @property
    def job(self) -> CollectionProcess | None:
        return self.collection.job

    @property
    def collecting(self) -> bool:
        return self.collection.collecting

    @property
    def paused(self) -> bool:
        return self.collection.paused

    @property
    def outcome(self) -> tuple[int, str, str, int] | None:
        return self.collection.outcome

    @property
    def collection_error(self) -> str | None:
        return self.collection.collection_error

    @property
    def input_error(self) -> str | None:
        """A bad command-line input the collector found."""
        return self.collection.input_error

    @property
    def _progress(self) -> CollectProgress | None:
        return self.collection.progress

    def _post_collection_message(self, kind: str, payload: Any) -> None:
        """The collector's reader thread: hand its message to the event loop."""
        self.post_message(CollectionEvent(kind, payload))

    # ------------------------------------------------------------------ polling

    def poll(self) -> None:
        self._poll_worker()

    @work(thread=True, exclusive=True, exit_on_error=False, group="poll")
    def _poll_worker(self) -> None:
        try:
            state = self.source.run_state()
            labels = self.source.labels_of_all()
        except IndexNotReady as waiting:
            self.call_from_thread(self._show_waiting, str(waiting))
            return
        except Exception as error:
            self.call_from_thread(self._show_index_error, str(error))
            return
        plots = None
        if (
            time.monotonic() - self._last_plot > PLOT_SECONDS
            and state.generation != self._plot_generation
        ):
            try:
                plots = self.source.run_plots()
                self._last_plot = time.monotonic()
                self._plot_generation = state.generation
            except Exception:
                plots = None
        if not get_current_worker().is_cancelled:
            self.call_from_thread(self._show_state, state, labels, plots)

    def _show_waiting(self, text: str) -> None:
        message = "waiting for the first commit of the index…"
        if self.collect is None:
            message = text
        self.query_one("#status-line", Static).update(Text(f"saetui · {message}", style="yellow"))

    def _show_index_error(self, text: str) -> None:
        self.query_one("#status-line", Static).update(
            Text(f"saetui · cannot read the index: {text}", style="bold red")
        )
        self.query_one(FeatureView).show_message(f"The index cannot be read: {text}")
        table = self.query_one(FeatureTable)
        table.error = text
        table.refresh()

    def _show_state(self, state: RunState, labels: dict[int, str], plots: RunPlots | None) -> None:
        first = self.run_state is None
        self.run_state = state
        self.label_cache = labels
        run_pane = self.query_one(RunPane)
        run_pane.show_state(state)
        if plots is not None:
            self._plots = plots
            run_pane.show_plots(plots, state.history)
        if self._plots is not None:
            run_pane.show_counts(self._plots, state.d_sae, state.metrics)
        if not self.collecting:
            run_pane.show_progress(
                phase="done" if state.finished else ("paused" if self.paused else "stored"),
                tokens=state.tokens,
                # paused: the bar keeps the share of the run's target collected so far
                tokens_total=self.collection.last_total if self.paused else None,
                paused=self.paused,
            )
        self.update_status_line()
        if first or state.generation != self._generation:
            self._generation = state.generation
            self.query_one(FeatureTable).reload()
            if not first and self.current_feature is not None:
                self.load_feature(self.current_feature, keep_position=True)

    def update_status_line(self) -> None:
        state = self.run_state
        parts = [Text("saetui", style="bold")]
        if state is not None:
            parts.append(Text(f" · {state.tokens:,} tokens · d_sae {state.d_sae:,}"))
        progress = self._progress
        if self.collecting and progress is not None:
            phase = progress.phase
            if phase == "collecting":
                parts.append(Text(f" · collecting {progress.tokens_per_s:,.0f} tok/s", "green"))
            elif phase == "metrics" and progress.tokens_total:
                done = f"{progress.tokens_done:,}/{progress.tokens_total:,}"
                parts.append(Text(f" · metrics {done} tokens", style="green"))
            else:
                parts.append(Text(f" · {phase}", style="green"))
        elif self.paused:
            parts.append(Text(" · paused (p resumes)", style="yellow"))
        elif state is not None and not state.finished:
            parts.append(Text(" · incomplete", style="yellow"))
        parts.append(Text(f" · {self.index_path.name}", style="dim"))
        self.query_one("#status-line", Static).update(Text.assemble(*parts))

    # ------------------------------------------------------------------ collection

    def start_collection(self) -> None:
        """Run the collection in a child process (saetui.collect.process)."""
        job = self.collection.start()
        if job is None:
            return
        self._launch_collector(job)
        self.update_status_line()

    @work(thread=True, exclusive=True, exit_on_error=False, group="collect")
    def _launch_collector(self, job: CollectionProcess) -> None:
        self.collection.launch(job)  # may read the index: not on the event loop

    def on_collection_event(self, event: CollectionEvent) -> None:
        kind, payload = event.kind, event.payload
        self.collection.receive(kind, payload)
        if kind == "progress":
            self._show_progress(payload)
        elif kind == "say":
            self.query_one(RunPane).show_note(str(payload))
        elif kind == "exit":
            self._collection_ended(int(payload))

    def _show_progress(self, progress: CollectProgress) -> None:
        self.query_one(RunPane).show_progress(
            phase=progress.phase,
            tokens=int(progress.tokens_done or 0),
            tokens_total=progress.tokens_total,
            tokens_per_s=float(progress.tokens_per_s or 0.0),
            eta_s=progress.eta_s,
            message=progress.message or "",
            running=True,
        )
        self.update_status_line()

    def _collection_ended(self, exit_code: int) -> None:
        tokens_now = self.run_state.tokens if self.run_state is not None else 0
        end = self.collection.ended(exit_code, tokens_now)
        if end is None:  # a bad command-line input: run_app says it (exit 2)
            self.exit(return_code=SaetuiInputError.exit_code)
            return
        if end.failed:
            self.notify(end.note, severity="error", timeout=20)
        else:
            self.notify(end.note)
        if end.reopen_index:
            self.source.reopen()  # the new index was swapped in at the end
        self.query_one(RunPane).show_progress(
            phase=end.phase,
            tokens=end.tokens,
            tokens_total=end.tokens_total,
            message=end.error,
            paused=self.paused,
        )
        self.update_status_line()
        self.poll()
        if end.quit:
            self.exit(return_code=self.exit_code())

    def _stop_later(self, job: CollectionProcess) -> None:
        """Kill ``job`` if it has not honoured the stop request after the grace time."""
        self.set_timer(STOP_GRACE_SECONDS, partial(self.collection.enforce_stop, job))

    def action_toggle_collection(self) -> None:
        if self.collect is None:
            self.notify("No collection in this session (saetui open only browses).")
            return
        job = self.collection.request_stop()
        if job is not None:
            self._stop_later(job)
            self.notify("Pausing: the collector stops at its next safe point (resumable).")
        else:
            self.start_collection()
            self.notify("Collection resumed from the last commit.")

    def exit_code(self) -> int:
        """0 when nothing was collected here or the collection finished; 130 when it was
        stopped (it resumes from the index); 1 when it failed."""
        state = self.run_state
        return self.collection.exit_code(index_finished=state is not None and state.finished)

    # ------------------------------------------------------------------ quitting

    def action_quit_app(self) -> None:
        job = self.collection.request_quit()
        if job is not None:
            self._stop_later(job)
            self.notify(
                "Stopping the collection at its next safe point; it stays resumable (run the "
                "same command again). Press q again to quit at once.",
                timeout=30,
            )
            return
        self.collection.kill()  # the index survives a kill: it resumes after its last commit
        self.exit(return_code=self.exit_code())
