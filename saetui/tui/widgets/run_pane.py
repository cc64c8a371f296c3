"""Run & metrics pane: run config, live collection progress, metric cards, plots."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.widgets import ProgressBar, Static
from textual_plotext import PlotextPlot

from saetui.tui.model import RunPlots, RunState

# Each card names its family: "saetui" (saetui's definitions) or "SAELens" (as SAELens'
# evals.py computes them; stored under metrics["saelens"], looked up as "saelens.<key>").
CARDS = (
    ("L0", ("l0_mean", "l0")),
    ("dead", ("dead_fraction", "dead_pct", "dead_features")),
    ("dense >1%", ("dense_1pct", "dense_features_1pct", "dense_1")),
    ("dense >10%", ("dense_10pct", "dense_features_10pct", "dense_10")),
    ("EV saetui", ("explained_variance",)),
    ("CE saetui", ("ce_loss_recovered", "ce_recovered")),
    ("KL saetui", ("kl_clean_sae", "kl_div", "kl")),
    ("cos saetui", ("cosine",)),
    ("EV SAELens", ("saelens.explained_variance",)),
    ("CE SAELens", ("saelens.ce_loss_score",)),
    ("KL SAELens", ("saelens.kl_div_with_sae",)),
)


def _lookup(metrics: dict[str, Any], name: str) -> Any:
    family, _, key = name.rpartition(".")
    scope = metrics.get(family) if family else metrics
    return scope.get(key) if isinstance(scope, dict) else None


def _metric(metrics: dict[str, Any], names: tuple[str, ...]) -> str:
    for name in names:
        value = _lookup(metrics, name)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            if name.endswith(("fraction", "pct")) and value <= 1:
                return f"{value * 100:.1f}%"
            return f"{value:.3g}"  # a card is ~16 columns at 80x24
        return str(value)
    return "–"


def _card(title: str, value: str) -> Text:
    """A metric card: its title above its value, so neither wraps out of an 80-column row."""
    return Text.assemble((title, "dim"), "\n", (value, "bold"), justify="center")


def run_facts(state: RunState) -> list[tuple[str, str]]:
    """The run's identity as (name, value) rows: index, model, hook, SAE, corpus, numerics."""
    config, details = state.config, state.details
    sae = details.get("sae") or {}
    rows = [("index", _home(state.path)), ("model", str(config.get("model", "?")))]
    rows.append(("hook", str(config.get("hook", "?"))))
    sae_kind = " ".join(
        str(part)
        for part in (
            config.get("sae_format"),
            config.get("sae_architecture"),
            f"k={sae['k']}" if sae.get("k") else None,
            f"d_sae={state.d_sae:,}",
        )
        if part
    )
    rows.append(("sae", sae_kind))
    if config.get("sae_path"):
        rows.append(("sae path", _home(str(config["sae_path"]))))
    if config.get("corpus"):
        rows.append(("corpus", _home(str(config["corpus"]))))
    rows.extend(
        (key.replace("_", " "), str(config[key]))
        for key in ("numerics", "batchtopk_mode", "threshold", "dtype", "ctx_len")
        if config.get(key) not in (None, "")
    )
    if details.get("device"):
        rows.append(("device", str(details["device"])))
    return rows


def _home(path: str) -> str:
    import os

    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if home != "/" and path.startswith(home + "/") else path


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class RunPane(VerticalScroll, can_focus=True):
    DEFAULT_CSS = """
    RunPane { padding: 0 1; }
    RunPane #run-top { height: auto; }
    RunPane #run-config { width: 1fr; height: auto; }
    RunPane #run-progress { width: 1fr; height: auto; }
    RunPane ProgressBar { width: 100%; }
    RunPane #cards { grid-size: 4; grid-gutter: 0 1; height: auto; margin: 1 0 0 0; }
    RunPane .card { border: round $panel; height: 4; }
    RunPane PlotextPlot { height: 14; min-width: 30; }
    RunPane #plots-a, RunPane #plots-b { height: auto; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal(id="run-top"):
            yield Static("", id="run-config")
            with VerticalScroll(id="run-progress"):
                yield Static("", id="progress-text")
                yield ProgressBar(total=None, show_eta=False, id="progress-bar")
                yield Static("", id="run-note")
        with Grid(id="cards"):
            for number, (title, _) in enumerate(CARDS):
                yield Static(title, classes="card", id=f"card-{number}")
        with Horizontal(id="plots-a"):
            yield PlotextPlot(id="density-plot")
            yield PlotextPlot(id="l0-plot")
        with Horizontal(id="plots-b"):
            yield PlotextPlot(id="scatter-plot")
            yield PlotextPlot(id="history-plot")

    # ------------------------------------------------------------------ updates

    def show_state(self, state: RunState) -> None:
        config = Table(box=None, show_header=False, padding=(0, 1), expand=True)
        config.add_column(style="dim", no_wrap=True)
        config.add_column(overflow="fold")  # long paths and hook names wrap, never cut
        for key, value in run_facts(state):
            config.add_row(key, value)
        self.query_one("#run-config", Static).update(config)
        cards = list(self.query(".card").results(Static))
        for card, (title, names) in zip(cards, CARDS, strict=True):
            card.update(_card(title, _metric(state.metrics, names)))

    def show_note(self, text: str) -> None:
        """The collector's latest remark (e.g. how long the model took to load)."""
        self.query_one("#run-note", Static).update(Text(text, style="dim italic"))

    def show_progress(
        self,
        *,
        phase: str,
        tokens: int,
        tokens_total: int | None,
        tokens_per_s: float = 0.0,
        eta_s: float | None = None,
        message: str = "",
        running: bool = False,
        paused: bool = False,
    ) -> None:
        status = "paused (p resumes)" if paused else (phase or "idle")
        lines = Text.assemble(
            ("phase ", "dim"),
            (status, "bold"),
            "\n",
            ("tokens ", "dim"),
            f"{tokens:,}",
            f" / {tokens_total:,}" if tokens_total else "",
            "\n",
            ("speed ", "dim"),
            f"{tokens_per_s:,.0f} tokens/s" if running else "–",
            ("   eta ", "dim"),
            format_eta(eta_s) if running else "–",
        )
        if message:
            lines.append("\n" + message, style="italic")
        if running:
            lines.append("\np pauses (stops at the next commit, resumable)", style="dim")
        self.query_one("#progress-text", Static).update(lines)
        bar = self.query_one(ProgressBar)
        if tokens_total:
            bar.update(total=tokens_total, progress=tokens)
        elif running:
            bar.update(total=None)
        else:
            bar.update(total=max(tokens, 1), progress=max(tokens, 1) if phase == "done" else 0)

    def show_counts(self, plots: RunPlots, d_sae: int, metrics: dict[str, Any]) -> None:
        """Dead and dense counts straight from the feature densities, when the run's metrics
        do not carry them yet (they are counts over committed data, not estimates)."""
        alive = len(plots.density)
        derived = {
            "dead_features": f"{d_sae - alive:,} ({(d_sae - alive) / max(d_sae, 1):.1%})",
            "dense_1pct": f"{sum(d > 0.01 for d in plots.density):,}",
            "dense_10pct": f"{sum(d > 0.1 for d in plots.density):,}",
        }
        cards = list(self.query(".card").results(Static))
        for card, (title, names) in zip(cards, CARDS, strict=True):
            if _metric(metrics, names) != "–":
                continue
            for name in names:
                if name in derived:
                    card.update(_card(title, derived[name]))

    def _blank_plot(self, selector: str) -> tuple[PlotextPlot, Any]:
        """The plot widget at ``selector`` and its plotext handle, cleared for redrawing."""
        widget = self.query_one(selector, PlotextPlot)
        widget.plt.clear_data()
        widget.plt.clear_figure()
        return widget, widget.plt

    def show_plots(self, plots: RunPlots, history: dict[str, list[Any]] | None) -> None:
        density, plt = self._blank_plot("#density-plot")
        plt.title("feature density (log10)")
        if plots.log10_density:
            plt.hist(plots.log10_density, bins=30)
        density.refresh()

        l0, plt = self._blank_plot("#l0-plot")
        if plots.l0_histogram:
            plt.title("L0 per token")
            plt.bar([e for e, _ in plots.l0_histogram], [c for _, c in plots.l0_histogram])
        else:
            plt.title("L0 per token (not recorded yet)")
        l0.refresh()

        scatter, plt = self._blank_plot("#scatter-plot")
        plt.title("log10 density vs mean activation")
        if plots.log10_density:
            plt.scatter(plots.log10_density, plots.mean_activation, marker="dot")
        scatter.refresh()

        hist_plot, plt = self._blank_plot("#history-plot")
        series = {k: v for k, v in (history or {}).items() if isinstance(v, list) and v}
        if series:
            plt.title("SAE training history")
            for name in ("loss", "recon_loss", "sparsity")[:2]:
                values = [float(v) for v in series.get(name, []) if isinstance(v, (int, float))]
                if values:
                    plt.plot(values, label=name)
        else:
            plt.title("training history (no history.json)")
        hist_plot.refresh()
