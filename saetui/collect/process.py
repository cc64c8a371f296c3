"""A collection in a child process, for the TUI.

The child owns the model, the SAE and the index writer; the TUI process only reads the
index. Nothing the child does can freeze the TUI (no shared GIL, no shared LMDB
environment), and a stop can always be honoured: the first request (SIGTERM) stops the
child at a safe point with exit 143, and if it has not ended after ``grace`` seconds it is
killed, which the index survives (it is crash-safe: the next run resumes after the last
commit).

Protocol: the parent sends the pickled :class:`CollectConfig` over a socket pair; the
child sends ``(kind, payload)`` tuples: ``progress`` (CollectProgress), ``say`` (str),
``outcome`` (exit code, status, phase, tokens), ``input_error`` (one sentence) or
``error`` (an internal failure, with the log file that holds the traceback). The child
runs in its own session (terminal signals do not reach it) and stops at its next safe
point when the parent disappears (the socket closes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

from saetui.collect.job import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, CollectConfig

MessageSink = Callable[[str, Any], None]


class CollectionProcess:
    """One run of a collection in a child process, seen from the parent."""

    def __init__(
        self, config: CollectConfig, on_message: MessageSink, *, log_path: Path | None = None
    ) -> None:
        self.config = config
        self.on_message = on_message
        self.log_path = log_path or _default_log_path()
        self.exit_code: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._stop_sent_at: float | None = None
        self._cancelled = False  # stopped before it started: start() spawns nothing
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._proc is not None and self.exit_code is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Spawn the child, unless a stop was requested first (then it reports exit 130)."""
        with self._lock:
            if self._cancelled:
                self.exit_code = EXIT_INTERRUPTED
            else:
                self._spawn()
        if self._proc is None:
            self.on_message("exit", EXIT_INTERRUPTED)

    def _spawn(self) -> None:
        parent, child = Pipe(duplex=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "saetui.collect.process", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"},
            )
        child.close()
        self._conn = parent
        parent.send(self.config)
        self._reader = threading.Thread(target=self._read, name="saetui-collect-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self._conn is not None and self._proc is not None
        try:
            while True:
                try:
                    kind, payload = self._conn.recv()
                except (EOFError, OSError):
                    break
                self.on_message(kind, payload)
        finally:
            code = self._proc.wait()
            self._conn.close()
            with self._lock:
                self.exit_code = code
            self.on_message("exit", code)

    def request_stop(self) -> None:
        """Ask the child to stop at its next safe point (SIGTERM); a second request kills."""
        with self._lock:
            if self._proc is None:
                self._cancelled = True
                return
            if self.exit_code is not None:
                return
            if self._stop_sent_at is None:
                self._stop_sent_at = time.monotonic()
                _signal(self._proc, signal.SIGTERM)
            else:
                _signal(self._proc, signal.SIGKILL)

    def stop_requested_for(self) -> float | None:
        """Seconds since the stop request, None when none was made."""
        return None if self._stop_sent_at is None else time.monotonic() - self._stop_sent_at

    def kill(self) -> None:
        with self._lock:
            if self._proc is None:
                self._cancelled = True
            elif self.exit_code is None:
                _signal(self._proc, signal.SIGKILL)

    def close(self, grace: float = 3.0) -> int | None:
        """Stop the child (at a safe point, killed after ``grace`` seconds) and join the
        reader thread; returns the child's exit code."""
        self.request_stop()
        if self._proc is None:
            return self.exit_code
        try:
            self._proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
        if self._reader is not None:
            self._reader.join()
        return self.exit_code


def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


def _default_log_path() -> Path:
    from saetui.lm.embedded import cache_root

    return cache_root() / "logs" / f"collect-{os.getpid()}-{time.time_ns()}.log"


# ---------------------------------------------------------------------- child side


def _child(fd: int) -> int:
    """Run the job the parent sends; report everything over the connection."""
    import traceback

    from saetui.collect.headless import run_with_signals
    from saetui.errors import SaetuiInputError

    conn = Connection(fd)
    config = conn.recv()

    def send(kind: str, payload: Any) -> None:
        # fails when the parent is gone: the watcher below stops the job
        with contextlib.suppress(OSError, ValueError):
            conn.send((kind, payload))

    def watch_parent() -> None:
        # the socket reads EOF when the parent closes it or dies
        try:
            while conn.poll(None):
                conn.recv()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, name="saetui-parent-watch", daemon=True).start()
    try:
        outcome = run_with_signals(
            config,
            progress=lambda update: send("progress", update),
            say=lambda text: send("say", text),
        )
    except SaetuiInputError as error:
        send("input_error", str(error))
        return EXIT_BAD_INPUT
    except Exception as error:
        traceback.print_exc()
        send("error", f"{type(error).__name__}: {error}")
        return EXIT_FAILED
    status = outcome.result.status if outcome.result is not None else "stopped"
    send("outcome", (outcome.exit_code, status, outcome.phase, outcome.tokens))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
