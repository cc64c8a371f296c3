"""What the app displays, as plain dataclasses, and the one protocol it reads data through.

Widgets only ever see these types; :mod:`saetui.tui.source` fills them from the index
reader. Every method of :class:`FeatureSource` may block (LMDB reads, decompression), so the
app calls them only from thread workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

SORT_COLUMNS = ("id", "label", "density", "mean", "max", "score")
FILTERS = ("all", "alive", "dead", "dense", "labelled", "unlabelled", "bookmarked")


@dataclass(frozen=True)
class TableQuery:
    """Sort, filter and search of the feature table."""

    sort: str = "id"
    descending: bool = False
    filter: str = "all"
    search: str = ""
    density_min: float | None = None
    density_max: float | None = None

    def describe(self) -> str:
        if self.search and self.sort == "id" and not self.descending:
            parts = ["best matches first"]
        else:
            parts = [f"sort {self.sort} {'↓' if self.descending else '↑'}"]
        if self.filter != "all":
            parts.append(f"filter {self.filter}")
        if self.density_min is not None or self.density_max is not None:
            lo = "0" if self.density_min is None else f"{self.density_min:g}"
            hi = "1" if self.density_max is None else f"{self.density_max:g}"
            parts.append(f"density {lo}..{hi}")
        if self.search:
            parts.append(f"search {self.search!r}")
        return " · ".join(parts)


def parse_density_range(text: str) -> tuple[float | None, float | None]:
    """``"1e-4..0.01"``, ``"0.1%..5%"``, ``"..1e-3"``, ``"1e-3.."`` or two numbers -> (min, max)
    as fractions of tokens; empty text clears the range."""
    from saetui.errors import SaetuiInputError

    text = text.strip()
    if not text:
        return None, None
    if ".." in text:
        parts = text.split("..", 1)
    else:
        parts = text.replace(",", " ").split()
        if len(parts) == 1:
            parts = [parts[0], ""]

    def number(part: str) -> float | None:
        part = part.strip()
        if not part:
            return None
        scale = 0.01 if part.endswith("%") else 1.0
        try:
            value = float(part.rstrip("%")) * scale
        except ValueError:
            raise SaetuiInputError(
                f"density range {text!r}: {part!r} is not a number; type e.g. 1e-4..0.01 or "
                "0.1%..5%."
            ) from None
        if not 0.0 <= value <= 1.0:
            raise SaetuiInputError(
                f"density range {text!r}: {part!r} is outside 0..1 (a fraction of tokens, or "
                "0%..100%); type e.g. 1e-4..0.01."
            )
        return value

    if len(parts) != 2:
        raise SaetuiInputError(
            f"density range {text!r} should be MIN..MAX, e.g. 1e-4..0.01 or 0.1%..5%."
        )
    low, high = number(parts[0]), number(parts[1])
    if low is not None and high is not None and low > high:
        raise SaetuiInputError(
            f"density range {text!r} has its minimum above its maximum: swap them."
        )
    return low, high


@dataclass(frozen=True)
class FeatureRow:
    feature: int
    label: str = ""
    density: float = 0.0
    mean: float = 0.0
    max: float = 0.0
    count: int = 0
    top_tokens: str = ""
    bookmarked: bool = False
    score: float | None = None  # an imported explanation score (delphi detection / fuzz)


@dataclass(frozen=True)
class TablePage:
    total: int  # rows matching the query
    offset: int
    rows: list[FeatureRow]
    generation: int = 0


@dataclass(frozen=True)
class Context:
    """A stretch of a window around one token, with one feature's activation per token:
    the part of the window that belongs to the token's document, without BOS/padding."""

    window: int
    position: int  # the marked token's position within `tokens`
    value: float  # the feature's activation at the marked token
    tokens: list[str]
    values: list[float]
    window_position: int = 0  # the marked token's position within the window
    document: int = -1  # the document the tokens belong to (-1: unknown)
    document_offset: int = -1  # the marked token's offset within its document
    # (window, position) of each token when they span windows (a whole document)
    locations: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class ActiveFeature:
    """A feature named in a list (neighbours, a token's features, probe results)."""

    feature: int
    value: float
    label: str = ""
    top_tokens: str = ""  # what its top activations fire on, for unlabelled features


@dataclass
class FeatureDetail:
    row: FeatureRow
    notes: str = ""
    contexts: list[Context] = field(default_factory=list)
    samples: list[tuple[str, list[Context]]] = field(default_factory=list)  # (interval, ...)
    histogram: list[tuple[float, int]] = field(default_factory=list)  # (lower edge, count)
    top_tokens: list[tuple[str, int]] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    neighbours: dict[str, list[ActiveFeature]] = field(default_factory=dict)  # metric -> list
    tokens_seen: int = 0


@dataclass
class WindowDetail:
    """A whole window with one feature's activations (the context view)."""

    window: int
    tokens: list[str]
    values: list[float]
    feature: int | None = None


@dataclass
class RunState:
    """Run config, progress and metrics as committed to the index."""

    path: str
    config: dict[str, Any] = field(default_factory=dict)
    d_sae: int = 0
    tokens: int = 0  # tokens committed
    tokens_total: int | None = None
    windows: int = 0
    phase: str = ""
    finished: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    generation: int = 0  # changes whenever new data becomes readable
    history: dict[str, list[Any]] | None = None
    details: dict[str, Any] = field(default_factory=dict)  # model and SAE facts of the run


@dataclass
class RunPlots:
    """Arrays for the run pane's plots (lists, so no numpy in widgets)."""

    log10_density: list[float] = field(default_factory=list)
    mean_activation: list[float] = field(default_factory=list)
    density: list[float] = field(default_factory=list)
    l0_histogram: list[tuple[float, int]] = field(default_factory=list)


class FeatureSource(Protocol):
    """What the app needs from an index. All methods may block: call from workers."""

    def run_state(self) -> RunState: ...

    def run_plots(self) -> RunPlots: ...

    def page(self, query: TableQuery, offset: int, limit: int) -> TablePage: ...

    def feature(self, feature: int) -> FeatureDetail: ...

    def window(self, window: int, feature: int | None) -> WindowDetail: ...

    def token_features(self, window: int, position: int) -> list[ActiveFeature]: ...

    def set_label(self, feature: int, label: str, notes: str) -> None: ...

    def set_bookmark(self, feature: int, bookmarked: bool) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class QueryMatch:
    """One match of a query: where it is and its window as a Context of the first feature."""

    shard: int
    window: int
    position: int  # inside the window
    key: int  # the engine's position of the match (shard << 40 | global index)
    values: list[float]  # of the query's positive features at the match
    context: Context


@dataclass(frozen=True)
class QueryResult:
    """A page of a query's matches with the counts the query bar shows."""

    expression: str
    total: int
    features: list[int]
    counts: dict[str, int]
    pmi: float | None
    matches: list[QueryMatch]
