"""Rich text for token contexts: each token shaded by an activation, one token marked.

Lines are capped (``MAX_LINE``) before styling: a pathological 10k-character context must
not make every repaint slow.
"""

from __future__ import annotations

import math
from functools import lru_cache

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

MAX_LINE = 400
# Activation heat runs from a dark grey to orange; cursors and selections use the theme's
# blue ($primary), so a highlighted row never looks "hot".
_BASE = (30, 30, 30)
_HOT = (230, 120, 20)
_SPACE_GLYPHS = str.maketrans({"\n": "⏎", "\t": "→", "\r": "␍"})


def show_token(token: str) -> str:
    """A token as one visible line: newlines and tabs become glyphs."""
    return token.translate(_SPACE_GLYPHS) or "∅"


HEAT_LEVELS = 48  # shades are quantised so each is one cached Style, not one per token


@lru_cache(maxsize=HEAT_LEVELS + 1)
def _heat_level(level: int) -> Style:
    share = level / HEAT_LEVELS
    rgb = tuple(int(b + (h - b) * share) for b, h in zip(_BASE, _HOT, strict=True))
    colour = f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"
    return Style(bgcolor=colour, color="white" if share < 0.6 else "black")


def heat(value: float, max_value: float) -> Style | None:
    """Background shade for an activation; None for zero (no style, cheaper to render)."""
    if value <= 0 or max_value <= 0:
        return None
    # sqrt so small activations are still visible
    share = math.sqrt(min(1.0, value / max_value))
    return _heat_level(max(1, round(share * HEAT_LEVELS)))


_MARK = Style(bold=True, underline=True)
_ELLIPSIS = Style(dim=True)


def shaded_tokens(
    tokens: list[str],
    values: list[float],
    *,
    max_value: float | None = None,
    mark: int | None = None,
    cursor: int | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Text:
    """Tokens ``start:stop`` as one Text, shaded by ``values``; ``mark`` underlined and bold,
    ``cursor`` reversed."""
    stop = len(tokens) if stop is None else stop
    top = max_value if max_value is not None else max((v for v in values), default=0.0)
    text = Text(no_wrap=True, overflow="ellipsis")
    for pos in range(start, stop):
        style = heat(values[pos] if pos < len(values) else 0.0, top)
        if pos == mark:
            style = (style or Style()) + Style(bold=True, underline=True)
        if pos == cursor:
            style = (style or Style()) + Style(reverse=True)
        text.append(show_token(tokens[pos]), style)
    return text


def context_span(
    tokens: list[str], mark: int, width: int, shown: dict[int, str] | None = None
) -> tuple[int, int]:
    """Tokens ``start:stop`` that fit in ``width`` cells, token ``mark`` in the middle
    (shifted to one side when the other runs out; all tokens when they fit). Only the tokens
    it walks over are measured, so a long window costs what one line shows; ``shown``
    collects their display forms."""
    n = len(tokens)
    shown = {} if shown is None else shown
    if not 0 <= mark < n:
        mark = 0 if n else -1
        if mark < 0:
            return 0, 0

    def cells(pos: int) -> int:
        text = shown.get(pos)
        if text is None:
            text = shown[pos] = show_token(tokens[pos])
        return cell_len(text)

    used = cells(mark)
    start, stop = mark, mark + 1
    half = (width - used) // 2
    left = 0
    while start > 0:
        step = cells(start - 1)
        if left + step > half:
            break
        start -= 1
        left += step
    used += left
    while stop < n:
        step = cells(stop)
        if used + step > width:
            break
        used += step
        stop += 1
    while start > 0:  # the right side ran out: give its room to the left
        step = cells(start - 1)
        if used + step > width:
            break
        start -= 1
        used += step
    return start, stop


def context_segments(
    tokens: list[str],
    values: list[float],
    mark: int,
    width: int,
    *,
    max_value: float | None = None,
) -> list[Segment]:
    """One line of at most ``width`` cells of ``tokens``, shaded by ``values``, the marked
    token bold and underlined and kept in view (centred when the line must be cut; an
    ellipsis shows a cut side)."""
    width = max(8, min(width, MAX_LINE))
    top = max_value if max_value is not None else max(values, default=0.0)
    shown: dict[int, str] = {}
    start, stop = context_span(tokens, mark, width, shown)
    if start > 0 or stop < len(tokens):  # cut: make room for an ellipsis each side
        start, stop = context_span(tokens, mark, width - 2, shown)
    n_values = len(values)
    segments: list[Segment] = []
    if start > 0:
        segments.append(Segment("…", _ELLIPSIS))
    for pos in range(start, stop):
        style = heat(values[pos], top) if pos < n_values else None
        if pos == mark:
            style = style + _MARK if style is not None else _MARK
        segments.append(Segment(shown[pos], style))
    if stop < len(tokens):
        segments.append(Segment("…", _ELLIPSIS))
    # crop: a single token can be wider than the line
    return list(Segment.adjust_line_length(segments, width, pad=False))


def context_line(
    tokens: list[str],
    values: list[float],
    mark: int,
    width: int,
    *,
    max_value: float | None = None,
) -> Text:
    """:func:`context_segments` as one Text (no wrapping)."""
    text = Text(no_wrap=True, overflow="ellipsis")
    for segment in context_segments(tokens, values, mark, width, max_value=max_value):
        text.append(segment.text, segment.style)
    return text


def sparkline(counts: list[int], width: int) -> str:
    """A one-line bar chart of ``counts`` resampled to ``width`` cells."""
    bars = " ▁▂▃▄▅▆▇█"
    if not counts or width <= 0:
        return ""
    if len(counts) > width:
        step = len(counts) / width
        counts = [sum(counts[int(i * step) : int((i + 1) * step)]) for i in range(width)]
    top = max(counts) or 1
    return "".join(bars[min(8, math.ceil(8 * c / top))] if c else bars[0] for c in counts)


def format_density(density: float) -> str:
    """A firing rate, always as a percentage of tokens (two significant digits below 10%)."""
    if density <= 0:
        return "dead"
    percent = density * 100
    if percent >= 99.95:
        return "100%"
    if percent >= 10:
        return f"{percent:.0f}%"
    if percent >= 1:
        return f"{percent:.1f}%"
    if percent >= 0.001:
        return f"{percent:.2g}%"
    return f"{percent:.1e}%"


def feature_ref(
    feature: int,
    label: str = "",
    top_tokens: str = "",
    score: float | None = None,
    *,
    bold: bool = False,
) -> Text:
    """How every list names a feature: its id, the score, then its label or, when it has
    none, the tokens its top activations fire on (dim), so no list shows bare ids."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"#{feature:<6}", Style(bold=bold))
    if score is not None:
        text.append(f" {format_score(score)}", Style(bold=bold))
    if label:
        text.append(f"  {label}")
    elif top_tokens:
        text.append(f"  {top_tokens}", Style(dim=True))
    return text


def format_score(value: float) -> str:
    """A neighbour score or activation in a fixed 7-cell column."""
    if abs(value) >= 100:
        return f"{value:7.0f}"
    if abs(value) >= 10:
        return f"{value:7.2f}"
    return f"{value:7.3f}"


def format_value(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
