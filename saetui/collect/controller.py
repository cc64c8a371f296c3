"""The collection controller a browsing session drives: starts, pauses and stops the
collector child (:class:`saetui.collect.process.CollectionProcess`) and keeps the run's
state — running or paused, how it ended, what failed — so that the TUI only displays it.

Nothing here blocks except :meth:`CollectionController.launch` (it may read the index to
see whether the request already finished): the TUI calls that one from a thread worker
and everything else from its event loop. The child's messages arrive on its reader thread;
the TUI forwards them to the event loop and hands them to :meth:`receive`, and the
child's ``exit`` to :meth:`ended`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saetui.collect.job import (
    EXIT_FAILED,
    EXIT_FINISHED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    CollectConfig,
    CollectProgress,
    finished_result,
    resume_command,
)
from saetui.collect.process import CollectionProcess, MessageSink

STOP_GRACE_SECONDS = 3.0  # a stopped collector that has not ended by then is killed
# exit codes of a collector that was stopped (signal or stop request), not one that failed
STOPPED_EXIT_CODES = (EXIT_INTERRUPTED, EXIT_TERMINATED, -9, -15)

Outcome = tuple[int, str, str, int]  # exit code, status ("finished"/"stopped"), phase, tokens


@dataclass(frozen=True)
class CollectionEnd:
    """What the end of one run of the collector means for the session."""

    phase: str  # "failed", "done" or "paused": what the run pane shows
    tokens: int  # tokens in the index at the end
    tokens_total: int | None  # the run's target, while it can still be resumed
    error: str  # the failure, or ""
    note: str  # one sentence for the user
    failed: bool
    reopen_index: bool  # --overwrite swapped a new index in: read it afresh
    quit: bool  # a quit asked for while it ran: exit now


class CollectionController:
    """One session's collection: at most one collector child at a time, resumable by
    starting it again (the index resumes after its last commit)."""

    def __init__(self, config: CollectConfig | None, on_message: MessageSink) -> None:
        self.config = config
        self.on_message = on_message
        self.job: CollectionProcess | None = None
        self.collecting = False
        self.paused = False
        self.outcome: Outcome | None = None
        self.collection_error: str | None = None
        self.input_error: str | None = None  # a bad command-line input found by the child
        self.progress: CollectProgress | None = None
        self.last_total: int | None = None
        self.quit_when_stopped = False

    # ------------------------------------------------------------------ start / stop

    def start(self) -> CollectionProcess | None:
        """A new collector child for the session's config (not yet started: pass it to
        :meth:`launch` from a worker); None when there is nothing to collect or one runs."""
        if self.config is None or self.collecting:
            return None
        self.collecting = True
        self.paused = False
        self.outcome = None
        self.collection_error = None
        self.job = CollectionProcess(self.config, self.on_message)
        return self.job

    def launch(self, job: CollectionProcess) -> None:
        """Start the child, unless this very request already finished (no model load).
        Unless postings are turned off the child runs anyway: it builds what the postings
        lack (nothing when they are complete or the index is past the size for postings by
        default) and loads no model either. Blocking."""
        config = job.config
        done = None if config.postings is not False else finished_result(config)
        if done is not None:
            job.on_message("outcome", (EXIT_FINISHED, "finished", "done", done.tokens))
            job.on_message("exit", EXIT_FINISHED)
            return
        try:
            job.start()
        except OSError as error:
            job.on_message("error", f"the collector could not start: {error}")
            job.on_message("exit", EXIT_FAILED)

    def request_stop(self) -> CollectionProcess | None:
        """Ask the running child to stop at its next safe point; returns it (to
        :meth:`enforce_stop` after :data:`STOP_GRACE_SECONDS`), or None when none runs."""
        if not self.collecting or self.job is None:
            return None
        self.job.request_stop()
        return self.job

    def request_quit(self) -> CollectionProcess | None:
        """A first quit while collecting: stop at the next safe point and quit once the
        child ended (returns it, as :meth:`request_stop`); None when the session may quit
        now (a second quit, or nothing running)."""
        if self.quit_when_stopped:
            return None
        job = self.request_stop()
        if job is not None:
            self.quit_when_stopped = True
        return job

    @staticmethod
    def enforce_stop(job: CollectionProcess) -> None:
        """A stop request ``job`` has not honoured within the grace time: kill it (the
        index keeps everything up to its last commit)."""
        if job.running:
            job.kill()

    def kill(self) -> None:
        """Quitting at once: kill a running child (the index resumes after its last
        commit)."""
        if self.job is not None and self.job.running:
            self.job.kill()

    def close(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop the child (killed after ``grace`` seconds) and join its reader thread."""
        if self.job is not None:
            self.job.close(grace)

    # ------------------------------------------------------------------ messages

    def receive(self, kind: str, payload: Any) -> None:
        """Keep what a message of the child says about the run (``exit`` goes to
        :meth:`ended`; ``say`` is only shown)."""
        if kind == "progress":
            self.progress = payload
            if payload.tokens_total:
                self.last_total = payload.tokens_total
        elif kind == "outcome":
            code, status, phase, tokens = payload
            self.outcome = (int(code), str(status), str(phase), int(tokens))
        elif kind == "input_error":
            self.input_error = str(payload)
        elif kind == "error":
            log = self.job.log_path if self.job is not None else None
            self.collection_error = f"{payload} (details in {log})"

    @property
    def finished(self) -> bool:
        return self.outcome is not None and self.outcome[1] == "finished"

    def ended(self, exit_code: int, tokens_now: int) -> CollectionEnd | None:
        """The child ended with ``exit_code``; ``tokens_now`` is what the index showed last
        (used when the child reported no outcome). None when the child found a bad input
        (:attr:`input_error`): the session ends with exit code 2."""
        self.collecting = False
        if self.input_error is not None:
            return None
        finished = self.finished
        if (
            self.collection_error is None
            and self.outcome is None
            and exit_code not in STOPPED_EXIT_CODES
        ):
            self.collection_error = f"the collector ended with exit code {exit_code}"
        self.paused = not finished and self.collection_error is None
        tokens = self.outcome[3] if self.outcome else tokens_now
        if self.collection_error:
            note = f"Collection failed: {self.collection_error}"
        elif finished:
            note = "Collection finished."
        else:
            phase = self.outcome[2] if self.outcome else "running"
            note = f"Collection stopped while {phase} at {tokens:,} tokens; p resumes."
        return CollectionEnd(
            phase="failed" if self.collection_error else ("done" if finished else "paused"),
            tokens=tokens,
            tokens_total=None if finished else self.last_total,
            error=self.collection_error or "",
            note=note,
            failed=self.collection_error is not None,
            reopen_index=finished
            and self.config is not None
            and self.config.overwrite
            and self.collection_error is None,
            quit=self.quit_when_stopped,
        )

    # ------------------------------------------------------------------ the session's end

    def exit_code(self, index_finished: bool) -> int:
        """0 when nothing was collected here or the collection finished; 130 when it was
        stopped (it resumes from the index); 1 when it failed."""
        if self.config is None:
            return EXIT_FINISHED
        if self.collection_error is not None:
            return EXIT_FAILED
        if self.finished:
            return EXIT_FINISHED
        if not self.collecting and self.outcome is None and index_finished:
            return EXIT_FINISHED  # an index that was already finished when the app opened
        return EXIT_INTERRUPTED

    def final_line(self, index_path: Path, code: int) -> str:
        """The one line printed after the TUI closed: what the index holds and how to go
        on (browse it, or resume the collection)."""
        from saetui.collect.headless import _tokens_in  # loads the pipeline: only now

        tokens = _tokens_in(index_path)
        if self.collection_error is not None:
            return f"saetui: internal error in the collector: {self.collection_error}"
        if code == EXIT_FINISHED:
            return (
                f"the index {index_path} holds {tokens:,} tokens; browse it again with: "
                f"saetui open {shlex.quote(str(index_path))}"
            )
        return (
            f"stopped with {tokens:,} tokens in the index {index_path}; it is resumable: "
            f"run `{resume_command()}` again to continue."
        )
