"""Headless collection: a progress bar on a terminal, plain lines every few seconds in logs
(tmux, nohup, slurm), a metrics summary at the end; SIGINT/SIGTERM stop resumably."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from saetui.collect.pipeline import CollectConfig, CollectProgress, CollectResult, run_collection

LOG_INTERVAL_S = 5.0
EXIT_STOPPED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressPrinter:
    """Renders :class:`CollectProgress` as a one-line bar (TTY) or as log lines."""

    def __init__(self, stream: TextIO, is_tty: bool | None = None, width: int = 28):
        self.stream = stream
        self.is_tty = stream.isatty() if is_tty is None else is_tty
        self.width = width
        self._last_line = 0.0
        self._phase = ""

    def line(self, update: CollectProgress) -> str:
        done, total = update.tokens_done, update.tokens_total
        parts = [f"{update.phase:<10}"]
        if total:
            fraction = min(done / total, 1.0)
            if self.is_tty:
                filled = int(fraction * self.width)
                parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
            parts.append(f"{done:,}/{total:,} tokens ({fraction:.0%})")
        elif done:
            parts.append(f"{done:,} tokens")
        if update.tokens_per_s:
            parts.append(f"{update.tokens_per_s:,.0f} tok/s")
        if update.eta_s is not None and update.phase == "collecting":
            parts.append(f"ETA {_duration(update.eta_s)}")
        if update.message:
            parts.append(update.message)
        return "  ".join(parts)

    def __call__(self, update: CollectProgress) -> None:
        now = time.monotonic()
        new_phase = update.phase != self._phase
        if self.is_tty:
            end = "\n" if update.phase == "done" else ""
            if new_phase and self._phase:
                self.stream.write("\n")
            self.stream.write("\r\x1b[2K" + self.line(update) + end)
        elif new_phase or now - self._last_line >= LOG_INTERVAL_S:
            self.stream.write(self.line(update) + "\n")
            self._last_line = now
        self._phase = update.phase
        self.stream.flush()


def format_metrics(metrics: dict[str, Any]) -> list[str]:
    """The final summary: one metric per line, the ones users look at first."""
    rows = [
        ("L0 (mean ± std)", "l0_mean", lambda m: f"{m['l0_mean']:.1f} ± {m['l0_std']:.1f}"),
        ("L1 (mean)", "l1_mean", None),
        ("explained variance", "explained_variance", None),
        ("explained variance (legacy per-token)", "explained_variance_legacy", None),
        ("MSE", "mse", None),
        ("cosine(x, x_hat)", "cosine", None),
        ("L2 ratio", "l2_ratio", None),
        ("CE clean", "ce_clean", None),
        ("CE with SAE", "ce_with_sae", None),
        ("CE zero-ablation", "ce_zero_ablation", None),
        ("CE loss recovered", "ce_loss_recovered", None),
        ("KL(clean || SAE)", "kl_clean_sae", None),
        (
            "dead features",
            "dead_features",
            lambda m: f"{m['dead_features']} ({m['dead_fraction']:.1%})",
        ),
        ("dense > 1% / > 10%", "dense_1pct", lambda m: f"{m['dense_1pct']} / {m['dense_10pct']}"),
        (
            "tokens (metrics / collection)",
            "tokens",
            lambda m: f"{m['tokens']:,} / {m.get('collection_tokens', 0):,}",
        ),
    ]
    lines = []
    for label, key, render in rows:
        if key not in metrics:
            continue
        value = render(metrics) if render else f"{metrics[key]:.4f}"
        lines.append(f"  {label:<40} {value}")
    return lines


def run_headless(
    config: CollectConfig,
    *,
    stream: TextIO | None = None,
    say: Callable[[str], None] | None = None,
) -> int:
    """Run a collection without the TUI; returns the process exit code."""
    out = stream or sys.stdout
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: stop now, the last commit is still intact
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        out.write("\nstopping at the next commit (signal again to stop at once)\n")

    previous = {sig: signal.signal(sig, on_signal) for sig in EXIT_STOPPED}
    try:
        result: CollectResult = run_collection(
            config, progress=ProgressPrinter(out), should_stop=stop.is_set, say=say
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result.status == "stopped":
        out.write(
            f"stopped after {result.tokens:,} tokens; the index at {result.out} is resumable: "
            "run the same command again to continue.\n"
        )
        return EXIT_STOPPED.get(received[0], 130) if received else 130
    out.write(
        f"collected {result.tokens:,} tokens into {result.out} in {_duration(result.seconds)} "
        f"({result.collect_tokens_per_s:,.0f} tokens/s while collecting)\n"
    )
    out.write("metrics:\n" + "\n".join(format_metrics(result.metrics)) + "\n")
    out.flush()
    return 0
