"""Rich text for token contexts: each token shaded by an activation, one token marked.

Lines are capped (``MAX_LINE``) before styling: a pathological 10k-character context must
not make every repaint slow.
"""

from __future__ import annotations

import math

from rich.style import Style
from rich.text import Text

MAX_LINE = 400
_BASE = (30, 30, 30)
_HOT = (230, 120, 20)
_SPACE_GLYPHS = str.maketrans({"\n": "⏎", "\t": "→", "\r": "␍"})


def show_token(token: str) -> str:
    """A token as one visible line: newlines and tabs become glyphs."""
    return token.translate(_SPACE_GLYPHS) or "∅"


def heat(value: float, max_value: float) -> Style | None:
    """Background shade for an activation; None for zero (no style, cheaper to render)."""
    if value <= 0 or max_value <= 0:
        return None
    share = min(1.0, value / max_value)
    # sqrt so small activations are still visible
    share = math.sqrt(share)
    rgb = tuple(int(b + (h - b) * share) for b, h in zip(_BASE, _HOT, strict=True))
    colour = f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"
    return Style(bgcolor=colour, color="white" if share < 0.6 else "black")


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


def context_line(
    tokens: list[str],
    values: list[float],
    mark: int,
    width: int,
    *,
    max_value: float | None = None,
    lead: float = 0.35,
) -> Text:
    """One line of at most ``width`` cells around token ``mark`` (placed about ``lead`` of the
    way in), shaded, the marked token emphasised."""
    width = max(8, min(width, MAX_LINE))
    shown = [show_token(t) for t in tokens]
    left_budget = int(width * lead)
    start = mark
    used = len(shown[mark]) if 0 <= mark < len(shown) else 0
    while start > 0 and used + len(shown[start - 1]) <= left_budget:
        start -= 1
        used += len(shown[start])
    stop = mark + 1
    while stop < len(shown) and used + len(shown[stop]) <= width:
        used += len(shown[stop])
        stop += 1
    text = shaded_tokens(tokens, values, max_value=max_value, mark=mark, start=start, stop=stop)
    text.truncate(width, overflow="ellipsis")
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
    if density <= 0:
        return "dead"
    if density >= 0.01:
        return f"{density * 100:.1f}%"
    return f"{density:.1e}"


def format_value(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
