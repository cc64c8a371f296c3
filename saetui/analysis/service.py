"""The probe's model and SAE, behind one small interface, in a child process or in-process.

:class:`ProbeProcess` (what the TUI uses) loads the model and SAE in a child process on
the first request and answers probes and logit-effect lookups over a socket. Closing it
kills the child at once: nothing there needs saving, so quitting the TUI never waits for
a model load (a load in a thread of the TUI process cannot be interrupted, and the
process would wait for it at exit). :class:`InProcessProbe` serves an already loaded
model (notebooks, tests).

Protocol: the parent sends the loader spec (a dict of :func:`probe_loader` keywords),
the child answers ``("say", text)`` while loading, then ``("ready", facts)`` or
``("input_error", sentence)``; each request ``(kind, args)`` is answered ``("ok", value)``,
``("input_error", sentence)`` or ``("error", text)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import Any, Protocol

from saetui.errors import SaetuiInputError

Status = Callable[[str], None]
LogitEffects = tuple[list[tuple[str, float]], list[tuple[str, float]]]


class ProbeService(Protocol):
    """What the probe pane and the feature view ask of a loaded model and SAE."""

    @property
    def ready(self) -> bool: ...

    def probe(self, text: str, status: Status | None = None, focus: int | None = None) -> Any: ...

    def logit_effects(self, feature: int) -> LogitEffects: ...

    def ablate(self, token_ids: list[int], feature: int) -> Any: ...

    def steer(self, prompt: str, features: dict[int, float], **options: Any) -> Any: ...

    def close(self) -> None: ...


class InProcessProbe:
    """A probe over a model and SAE loaded in this process by ``loader`` (on first use)."""

    def __init__(self, loader: Callable[[], Any]) -> None:
        self._loader = loader
        self._inputs: Any = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._inputs is not None

    def _loaded(self) -> Any:
        with self._lock:
            if self._inputs is None:
                from saetui.analysis.probe import ProbeInputs

                loaded = self._loader()
                self._inputs = ProbeInputs(*loaded) if isinstance(loaded, tuple) else loaded
            return self._inputs

    def probe(self, text: str, status: Status | None = None, focus: int | None = None) -> Any:
        from saetui.analysis.probe import probe

        inputs = self._loaded()
        return probe(inputs.model, inputs.sae, inputs.hook, text, focus=focus)

    def logit_effects(self, feature: int) -> LogitEffects:
        from saetui.analysis.probe import feature_logit_effects

        return feature_logit_effects(self._loaded(), feature)

    def ablate(self, token_ids: list[int], feature: int) -> Any:
        from saetui.analysis.causal import ablate

        inputs = self._loaded()
        return ablate(inputs.model, inputs.sae, inputs.hook, token_ids, feature)

    def steer(self, prompt: str, features: dict[int, float], **options: Any) -> Any:
        from saetui.analysis.causal import steer

        inputs = self._loaded()
        return steer(inputs.model, inputs.sae, inputs.hook, prompt, features, **options)

    def close(self) -> None:
        self._inputs = None


class ProbeProcess:
    """A probe whose model and SAE live in a child process, started on first use."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one request at a time
        self._ready = False
        self._closed = False
        self._failure: str | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    def _start(self, status: Status | None) -> Connection:
        """The connection to a loaded child (starting and loading it if needed)."""
        if self._closed:
            raise SaetuiInputError("the probe is closed: the app is quitting.")
        if self._failure is not None:
            raise SaetuiInputError(self._failure)
        if self._conn is not None:
            return self._conn
        parent, child = Pipe(duplex=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "saetui.analysis.service", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        child.close()
        parent.send(self.spec)
        while True:
            kind, payload = _receive(parent)
            if kind == "say":
                if status is not None:
                    status(str(payload))
                continue
            if kind == "ready":
                self._conn, self._ready = parent, True
                return parent
            parent.close()
            self._failure = str(payload)
            raise SaetuiInputError(self._failure)

    def _request(self, kind: str, *args: Any, status: Status | None = None) -> Any:
        with self._lock:
            conn = self._start(status)
            conn.send((kind, args))
            answer, payload = _receive(conn)
        if answer == "ok":
            return payload
        raise SaetuiInputError(str(payload))

    def probe(self, text: str, status: Status | None = None, focus: int | None = None) -> Any:
        return self._request("probe", text, focus, status=status)

    def logit_effects(self, feature: int) -> LogitEffects:
        return self._request("logit_effects", int(feature))

    def ablate(self, token_ids: list[int], feature: int) -> Any:
        return self._request("ablate", [int(t) for t in token_ids], int(feature))

    def steer(self, prompt: str, features: dict[int, float], **options: Any) -> Any:
        return self._request("steer", prompt, dict(features), options)

    def close(self) -> None:
        """Kill the child (a request waiting on it then fails at once) and reap it."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        if self._conn is not None and self._lock.acquire(timeout=5):
            try:
                self._conn.close()
            finally:
                self._lock.release()


def _receive(conn: Connection) -> tuple[str, Any]:
    try:
        kind, payload = conn.recv()
    except (EOFError, OSError):
        raise SaetuiInputError(
            "the probe's model process ended unexpectedly (out of memory?); open the probe "
            "again to restart it."
        ) from None
    return kind, payload


# ---------------------------------------------------------------------- child side


def _child(fd: int) -> int:
    from saetui.analysis.causal import ablate, steer
    from saetui.analysis.probe import feature_logit_effects, probe, probe_loader

    conn = Connection(fd)
    spec = conn.recv()
    try:
        conn.send(("say", f"loading {spec.get('model')} and the SAE…"))
        inputs = probe_loader(**spec)()
    except SaetuiInputError as error:
        conn.send(("input_error", str(error)))
        return 2
    except Exception as error:
        conn.send(("input_error", f"the probe's model could not load: {error}"))
        return 1
    conn.send(("ready", {"hook": inputs.hook}))
    while True:
        try:
            kind, args = conn.recv()
        except (EOFError, OSError):
            return 0
        try:
            if kind == "probe":
                text, focus = args
                value: Any = probe(inputs.model, inputs.sae, inputs.hook, text, focus=focus)
            elif kind == "logit_effects":
                value = feature_logit_effects(inputs, *args)
            elif kind == "ablate":
                value = ablate(inputs.model, inputs.sae, inputs.hook, *args)
            elif kind == "steer":
                prompt, features, options = args
                value = steer(inputs.model, inputs.sae, inputs.hook, prompt, features, **options)
            else:
                raise SaetuiInputError(f"unknown probe request {kind!r}")
            conn.send(("ok", value))
        except SaetuiInputError as error:
            conn.send(("input_error", str(error)))
        except Exception as error:
            conn.send(("error", f"{type(error).__name__}: {error}"))


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
