"""Headless collection: a progress bar on a terminal, plain lines every few seconds in logs
(tmux, nohup, slurm), a metrics summary at the end; SIGINT/SIGTERM stop resumably in
every phase (exit 130 / 143) and the last line says how to go on."""

from __future__ import annotations

import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from saetui.collect.distributed import RankFailed, Team
from saetui.collect.job import (
    CollectConfig,
    CollectProgress,
    CollectResult,
    finished_result,
    resume_command,
)
from saetui.collect.pipeline import run_collection

LOG_INTERVAL_S = 5.0
EXIT_STOPPED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


MIN_BAR_WIDTH = 8


class ProgressPrinter:
    """Renders :class:`CollectProgress` as a one-line bar (TTY) or as log lines."""

    def __init__(self, stream: TextIO, is_tty: bool | None = None, width: int = 28):
        self.stream = stream
        self.is_tty = stream.isatty() if is_tty is None else is_tty
        self.width = width
        self._last_line = 0.0
        self._phase = ""

    def line(self, update: CollectProgress, bar_width: int | None = None) -> str:
        done, total = update.tokens_done, update.tokens_total
        parts = [f"{update.phase:<10}"]
        if total:
            fraction = min(done / total, 1.0)
            if self.is_tty:
                width = self.width if bar_width is None else bar_width
                filled = int(fraction * width)
                parts.append("[" + "#" * filled + "." * (width - filled) + "]")
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

    def fitted_line(self, update: CollectProgress) -> str:
        """The TTY line within the terminal's width (80 columns over ssh): a narrower bar
        first, then cut; a line that wrapped would leave a copy of itself per update."""
        columns = shutil.get_terminal_size((80, 24)).columns - 1
        line = self.line(update)
        if len(line) > columns:
            narrower = max(MIN_BAR_WIDTH, self.width - (len(line) - columns))
            line = self.line(update, narrower)
        return line[:columns]

    def __call__(self, update: CollectProgress) -> None:
        now = time.monotonic()
        new_phase = update.phase != self._phase
        if self.is_tty:
            end = "\n" if update.phase == "done" else ""
            if new_phase and self._phase:
                self.stream.write("\n")
            self.stream.write("\r\x1b[2K" + self.fitted_line(update) + end)
        elif new_phase or now - self._last_line >= LOG_INTERVAL_S:
            self.stream.write(self.line(update) + "\n")
            self._last_line = now
        self._phase = update.phase
        self.stream.flush()


_SAETUI_ROWS: list[tuple[str, str, Callable[[dict[str, Any]], str] | None]] = [
    ("L0 (mean ± std)", "l0_mean", lambda m: f"{m['l0_mean']:.1f} ± {m['l0_std']:.1f}"),
    ("L1 (mean)", "l1_mean", None),
    ("explained variance", "explained_variance", None),
    ("explained variance (legacy per-token)", "explained_variance_legacy", None),
    ("MSE (per element)", "mse", None),
    ("cosine(x, x_hat)", "cosine", None),
    ("L2 ratio", "l2_ratio", None),
    ("CE clean", "ce_clean", None),
    ("CE with SAE", "ce_with_sae", None),
    ("CE zero-ablation (counted tokens)", "ce_zero_ablation", None),
    ("CE loss recovered", "ce_loss_recovered", None),
    ("KL(clean || SAE)", "kl_clean_sae", None),
    (
        "dead features",
        "dead_features",
        lambda m: f"{m['dead_features']} ({m['dead_fraction']:.1%})",
    ),
    ("dense > 1% / > 10%", "dense_1pct", lambda m: f"{m['dense_1pct']} / {m['dense_10pct']}"),
]
_SAELENS_ROWS: list[tuple[str, str, Callable[[dict[str, Any]], str] | None]] = [
    ("l0 / l1", "l0", lambda m: f"{m['l0']:.1f} / {m['l1']:.4g}"),
    ("explained_variance", "explained_variance", None),
    ("explained_variance_legacy", "explained_variance_legacy", None),
    ("mse (per token / batch tokens)", "mse", None),
    ("cossim", "cossim", None),
    ("l2_ratio", "l2_ratio", None),
    ("relative_reconstruction_bias", "relative_reconstruction_bias", None),
    (
        "ce_loss without / with SAE / ablation",
        "ce_loss_without_sae",
        lambda m: (
            f"{m['ce_loss_without_sae']:.4f} / {m['ce_loss_with_sae']:.4f} / "
            f"{m['ce_loss_with_ablation']:.4f}"
        ),
    ),
    ("ce_loss_score", "ce_loss_score", None),
    (
        "kl_div with SAE / ablation",
        "kl_div_with_sae",
        lambda m: f"{m['kl_div_with_sae']:.4f} / {m['kl_div_with_ablation']:.4f}",
    ),
    ("kl_div_score", "kl_div_score", None),
    (
        "frac_alive / freq_over_1 / _10_percent",
        "frac_alive",
        lambda m: (
            f"{m['frac_alive']:.4f} / {m['freq_over_1_percent']:.4f} / "
            f"{m['freq_over_10_percent']:.4f}"
        ),
    ),
    ("encoder-decoder cosine (mean)", "encoder_decoder_cosine_sim_mean", None),
]


def _rows(
    metrics: dict[str, Any], rows: list[tuple[str, str, Callable[[dict[str, Any]], str] | None]]
) -> list[str]:
    lines = []
    for label, key, render in rows:
        if key not in metrics:
            continue
        try:
            value = render(metrics) if render else _number(metrics[key])
        except KeyError:
            continue
        lines.append(f"    {label:<40} {value}")
    return lines


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4g}"


def format_metrics(metrics: dict[str, Any]) -> list[str]:
    """The final summary: the saetui family, then the SAELens one, each under a label that
    says whose definitions it follows, then which tokens and dtypes they were measured on."""
    lines = ["  saetui (its own definitions, docs/METRICS.md):", *_rows(metrics, _SAETUI_ROWS)]
    saelens = metrics.get("saelens") or {}
    if saelens:
        lines.append("  SAELens / SAEBench (computed as their evals.py computes them):")
        lines += _rows(saelens, _SAELENS_ROWS)
    if "tokens" in metrics:
        lines.append(
            f"  reconstruction on {metrics['tokens']:,} tokens "
            f"(of {metrics.get('collection_tokens', metrics['tokens']):,} collected)"
        )
    sample = metrics.get("ce_sample")
    if sample:
        share = sample["windows"] / max(sample["of_windows"], 1)
        lines.append(
            f"  CE loss and KL on {sample['tokens']:,} tokens: {sample['windows']:,} of "
            f"{sample['of_windows']:,} windows ({share:.1%}), spread over the collection"
        )
    precision = metrics.get("precision")
    if precision:
        lines.append(f"  model in {precision['model']}, SAE encoding in {precision['sae']}")
    return lines


@dataclass
class Outcome:
    """How a job run under signal handling ended."""

    exit_code: int
    result: CollectResult | None  # None when it stopped before collecting anything
    phase: str  # the phase it was in when it ended
    tokens: int  # tokens in the index afterwards (several SAEs: the index with fewest)
    several: bool = False  # one index per SAE under the output folder

    def summary(self, out: Any) -> str:
        """One line for the user: what the index holds and how to go on."""
        if self.exit_code == 0 and self.result is not None:
            done_before = "collecting" in self.result.skipped
            already = " (already finished: nothing to do)" if done_before else ""
            if self.result.members:
                paths = [Path(out) / name for name, _ in self.result.members]
                return (
                    f"the indexes {', '.join(map(str, paths))} hold {self.tokens:,} tokens "
                    f"each{already}; browse one with: saetui open {shlex.quote(str(paths[0]))}"
                )
            return (
                f"the index {out} holds {self.tokens:,} tokens{already}; browse it with: "
                f"saetui open {shlex.quote(str(out))}"
            )
        where = f"the index {out}; it is"
        if self.several:
            where = f"the indexes under {out}; they are"
        return (
            f"stopped while {self.phase} with {self.tokens:,} tokens in {where} "
            f"resumable: run `{resume_command()}` again to continue."
        )


def run_with_signals(
    config: CollectConfig,
    *,
    progress: Callable[[CollectProgress], None] | None = None,
    say: Callable[[str], None] | None = None,
    notice: Callable[[str], None] | None = None,
    team: Team | None = None,
) -> Outcome:
    """Run a collection in the main thread with SIGINT/SIGTERM as stop requests.

    While collecting, the first signal stops at the next commit and a second one at once.
    In the other phases nothing is left uncommitted, so the first signal stops at once.
    Either way the index stays resumable and the exit code is 130 (SIGINT) or 143
    (SIGTERM). SaetuiInputError passes through (the caller prints it, exit code 2), and so
    does RankFailed (another rank of a distributed ``team`` failed).
    """
    stop = threading.Event()
    received: list[int] = []
    phase = ["loading"]

    def on_progress(update: CollectProgress) -> None:
        phase[0] = update.phase
        if progress is not None:
            progress(update)

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        if stop.is_set() or phase[0] != "collecting":
            raise KeyboardInterrupt
        stop.set()
        if notice is not None:
            notice("stopping at the next commit (signal again to stop at once)")

    previous = {sig: signal.signal(sig, on_signal) for sig in EXIT_STOPPED}
    result: CollectResult | None = None
    try:
        result = run_collection(
            config, progress=on_progress, should_stop=stop.is_set, say=say, team=team
        )
    except KeyboardInterrupt:
        result = None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = EXIT_STOPPED.get(signal.Signals(received[0]), 130) if received else 130
    if result is None:
        result = finished_result(config)  # the stop came after the index was finished
    if result is not None and result.status == "finished":
        return Outcome(0, result, "done", result.tokens)
    where = result.phase if result is not None else phase[0]
    if config.several:
        from saetui.collect.job import member_configs

        tokens = min(_tokens_in(member.work_dir) for _, member in member_configs(config))
        return Outcome(code, result, where, tokens, several=True)
    return Outcome(code, result, where, _tokens_in(config.work_dir))


def _tokens_in(path: Any) -> int:
    """Tokens committed to the index at ``path`` (0 when there is none yet)."""
    from saetui.errors import SaetuiInputError
    from saetui.index import open_index

    try:
        with open_index(path) as index:
            return index.progress().tokens
    except (SaetuiInputError, OSError):
        return 0


def run_headless(
    config: CollectConfig,
    *,
    stream: TextIO | None = None,
    say: Callable[[str], None] | None = None,
    team: Team | None = None,
) -> int:
    """Run a collection without the TUI; returns the process exit code. Of a distributed
    ``team`` only the main rank prints (progress of the whole job, the summary)."""
    if team is not None and not team.is_main:
        return run_with_signals(config, team=team).exit_code
    out = stream or sys.stdout

    def notice(text: str) -> None:
        out.write(f"\n{text}\n")
        out.flush()

    outcome = run_with_signals(
        config, progress=ProgressPrinter(out), say=say, notice=notice, team=team
    )
    result = outcome.result
    if outcome.exit_code == 0 and result is not None:
        if "collecting" not in result.skipped:
            out.write(
                f"collected {result.tokens:,} tokens into {result.out} in "
                f"{_duration(result.seconds)} ({result.collect_tokens_per_s:,.0f} tokens/s "
                "while collecting)\n"
            )
        if result.metrics:
            out.write("metrics:\n" + "\n".join(format_metrics(result.metrics)) + "\n")
        for name, member in result.members:
            if member.metrics:
                lines = format_metrics(member.metrics)
                out.write(f"metrics of {name} ({result.out / name}):\n" + "\n".join(lines) + "\n")
    out.write(outcome.summary(config.out) + "\n")
    if outcome.exit_code == 0 and config.work_dir != config.out and not config.gather:
        out.write(
            f"the shards are in {config.work_dir}: gather them with saetui merge "
            f"{shlex.quote(str(config.work_dir))} --out {shlex.quote(str(config.out))}\n"
        )
    out.flush()
    return outcome.exit_code


def run_distributed(
    config: CollectConfig,
    *,
    stream: TextIO | None = None,
    say: Callable[[str], None] | None = None,
) -> int:
    """One rank of ``torchrun ... -m saetui collect``: joins the job, collects the windows
    dealt to it, and returns its exit code. A failure on any rank stops every rank at its
    next sync point with its shard closed (resumable); the main rank prints one sentence
    naming the rank that failed."""
    import os

    import torch

    from saetui.collect.distributed import TorchTeam
    from saetui.errors import SaetuiInputError

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.inputs.device in (None, "auto") and torch.cuda.is_available():
        config.inputs.device = f"cuda:{local_rank}"
    if config.inputs.device is not None and config.inputs.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(config.inputs.device))
    team = TorchTeam()
    err = sys.stderr
    try:
        return run_headless(config, stream=stream, say=say if team.is_main else None, team=team)
    except RankFailed as failed:
        if team.is_main:
            err.write(
                f"saetui: error: {failed}; every shard is closed and resumable: run the same "
                "command again to continue.\n"
            )
        return failed.exit_code
    except SaetuiInputError as error:
        if team.is_main:
            raise  # the command line prints it
        return error.exit_code  # the main rank names this rank and says why
    except Exception:
        if not team.broken:
            raise
        err.write(
            f"saetui: error: rank {team.rank} lost the other ranks (one was killed, or its "
            "machine failed); its shard is closed and resumable: run the same command again "
            "to continue.\n"
        )
        return 1
    finally:
        team.close()
