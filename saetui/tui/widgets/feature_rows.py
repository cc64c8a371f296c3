"""The feature view's rows: what :class:`saetui.tui.widgets.feature_view.FeatureView` shows
for a feature, as a list of painters (a Text, or a function of the width that returns the
row's segments) and what Enter does on each row. No widget here: only rich renderables."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from saetui.tui.model import Context, FeatureDetail
from saetui.tui.render import context_segments, feature_ref, format_value, show_token

NEIGHBOUR_TITLES = {
    "cosine": "Nearest features by decoder cosine",
    "decoder_cosine": "Nearest features by decoder cosine",
    "jaccard": "Co-occurring features (Jaccard)",
    "npmi": "Co-occurring features (NPMI)",
    "p_g_given_f": "Co-occurring features (P(g|f))",
}
HEADING = Style(bold=True, color="bright_cyan")
VALUE = Style(bold=True)

Painter = Callable[[int], list[Segment]]  # width -> the row's segments
Row = Text | Painter  # a Text row is rendered through the app's console


@dataclass(frozen=True)
class Target:
    """What Enter on a row does."""

    kind: str  # "context" or "feature"
    feature: int = -1
    context: Context | None = None


def _context_painter(context: Context, top: float, delta: float | None = None) -> Painter:
    """A context row: the activation, the loss change of its ablation when known, then
    the tokens around the firing one."""

    def paint(width: int) -> list[Segment]:
        value = Segment(f"{format_value(context.value):>6} ", VALUE)
        cells = [value]
        if delta is not None:
            style = Style(color="green" if delta > 0 else "red")
            cells.append(Segment(f"Δ{delta:+.2f} ", style))
        used = sum(len(cell.text) for cell in cells)
        line = context_segments(
            context.tokens, context.values, context.position, width - used, max_value=top
        )
        return [*cells, *line]

    return paint


def histogram_rows(histogram: list[tuple[float, int]], width: int = 30) -> list[Text]:
    """A horizontal bar chart, one row per octave [lo, 2·lo): the value axis on the left,
    the token count on the right."""
    octaves: dict[float, int] = {}
    for lower, count in histogram:
        octave = 2.0 ** math.floor(math.log2(lower)) if lower > 0 else 0.0
        octaves[octave] = octaves.get(octave, 0) + count
    top = max(octaves.values(), default=0) or 1
    rows = []
    for low in sorted(octaves, reverse=True):
        count = octaves[low]
        cells = count / top * width
        bar = "█" * int(cells) + (" ▏▎▍▌▋▊▉"[int((cells % 1) * 8)] if cells % 1 else "")
        rows.append(
            Text.assemble(
                (f"  {format_value(low):>6}–{format_value(2 * low):<6} ", "dim"),
                (f"{bar:<{width + 1}}", "green"),
                f" {count:,}",
            )
        )
    return rows


def logit_rows(
    promoted: list[tuple[str, float]], suppressed: list[tuple[str, float]]
) -> list[Text]:
    """Promoted and suppressed tokens side by side, each with its logit effect."""
    rows = []
    for i in range(max(len(promoted), len(suppressed))):
        up = promoted[i] if i < len(promoted) else None
        down = suppressed[i] if i < len(suppressed) else None
        row = Text("  ")
        if up is not None:
            row.append(f"↑ {repr(show_token(up[0]))[:18]:<18} ", "green")
            row.append(f"{up[1]:+7.3f}")
        else:
            row.append(" " * 28)
        if down is not None:
            row.append(f"    ↓ {repr(show_token(down[0]))[:18]:<18} ", "red")
            row.append(f"{down[1]:+7.3f}")
        rows.append(row)
    return rows


def feature_rows(
    detail: FeatureDetail,
    ablations: dict[tuple[int, int], float],
    ablation_note: str,
    ablation_effects: dict[tuple[int, int], Any],
) -> tuple[list[Row], list[Target | None]]:
    """The feature view's rows for ``detail`` and what Enter does on each (None: nothing):
    top contexts (with their ablation's loss change when known), interval samples, the
    ablation's effects, histogram, top tokens, logit effects and neighbours."""
    painters: list[Row] = []
    targets: list[Target | None] = []
    feature = detail.row.feature

    def text_row(text: Text, target: Target | None = None) -> None:
        painters.append(text)
        targets.append(target)

    def heading(text: str) -> None:
        text_row(Text(text, style=HEADING))

    def note(text: str | Text) -> None:
        text_row(text if isinstance(text, Text) else Text(text, style="dim"))

    def context_row(context: Context, top: float) -> None:
        delta = ablations.get((context.window, context.window_position))
        painters.append(_context_painter(context, top, delta))
        targets.append(Target("context", feature, context))

    top = detail.row.max or max((c.value for c in detail.contexts), default=0.0)
    if detail.row.count == 0:
        note(
            Text(
                "This feature never fired in the tokens collected so far"
                f" ({detail.tokens_seen:,} tokens).",
                style="yellow",
            )
        )
    heading(f"Top activations ({len(detail.contexts)})")
    note(
        Text(ablation_note, style="italic")
        if ablation_note
        else "  a: ablate — each context's loss change (Δ) when this feature is removed"
    )
    if not detail.contexts:
        note("  none yet")
    for context in detail.contexts:
        context_row(context, top)
    if detail.samples:
        heading("Activation intervals (samples from high to low)")
        for interval, contexts in detail.samples:
            note(Text(f"  {interval}", style="italic"))
            for context in contexts:
                context_row(context, top)
    if ablation_effects:
        heading("Ablation: what it did at the firing token (next token; logits it moved)")
        for context in detail.contexts:
            effect = ablation_effects.get((context.window, context.window_position))
            if effect is None:
                continue
            row = Text(f"  Δ{effect['delta']:+.2f} → {show_token(effect.get('next', ''))!r}  ")
            for token, value in effect.get("promoted", []):
                row.append(f"{show_token(token)!r} {value:+.2f} ", "green")
            for token, value in effect.get("suppressed", []):
                row.append(f"{show_token(token)!r} {value:+.2f} ", "red")
            text_row(row, Target("context", feature, context))
    if detail.histogram:
        heading("Activation histogram (count per octave of activation value)")
        for row in histogram_rows(detail.histogram):
            note(row)
    if detail.top_tokens:
        heading("Top tokens (in the top activations)")
        shown = "  ".join(f"{show_token(t)}×{c}" for t, c in detail.top_tokens[:30])
        note(Text(shown))
    heading("Logit effects (W_dec · W_U): tokens it promotes ↑ and suppresses ↓")
    if detail.promoted or detail.suppressed:
        for row in logit_rows(detail.promoted, detail.suppressed):
            note(row)
    else:
        note("  not stored in this index; computed once the model is loaded (tab 4)")
    if not detail.neighbours:
        heading("Related features")
        note("  no neighbours stored in this index yet")
    for metric, entries in detail.neighbours.items():
        heading(NEIGHBOUR_TITLES.get(metric, f"Related features ({metric})"))
        for entry in entries:
            text_row(
                Text("  ") + feature_ref(entry.feature, entry.label, entry.top_tokens, entry.value),
                Target("feature", entry.feature),
            )
    return painters, targets
