"""The compare screen: two indexes of the same windows, collected with two SAEs.

A table of matched pairs (sortable by decoder cosine, Jaccard of firing sets, density change)
or the split trees of the smaller SAE's features, with both features' top contexts side by
side underneath; Enter opens the chosen side's feature in a full feature view. The
comparison (saetui.analysis.compare_report) runs in a thread worker.
The chosen side's full feature view is ``screens.side_feature``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, Tree
from textual.widgets.tree import TreeNode
from textual.worker import get_current_worker

from saetui.errors import SaetuiInputError
from saetui.tui.bindings import bindings
from saetui.tui.compare_model import PAIR_SORTS, Comparison, PairRow, SplitTree
from saetui.tui.model import Context
from saetui.tui.render import show_token
from saetui.tui.screens.side_feature import SideFeatureScreen, feature_heading
from saetui.tui.source import IndexSource
from saetui.tui.widgets.side_preview import SidePreview

SCREEN_NAME = "compare"
NAME_WIDTH = 14
PREVIEW_CONTEXTS = 12
SIDES = ("a", "b")


class _Stopped(Exception):
    """The screen went away while the comparison ran."""


def show_comparison(app: App[Any], path_a: Path, path_b: Path) -> None:
    """Open the compare screen of ``path_a`` against ``path_b`` (made once per app, so its
    result, order and cursor survive closing and reopening it)."""
    if not app.is_screen_installed(SCREEN_NAME):
        app.install_screen(CompareScreen(path_a, path_b), SCREEN_NAME)
    if app.screen is not app.get_screen(SCREEN_NAME):
        app.push_screen(SCREEN_NAME)


def feature_name(source: IndexSource, feature: int, labels: dict[int, str]) -> str:
    """A feature's label, else the tokens its top activations fire on."""
    if feature in labels:
        return labels[feature]
    (named,) = source.named([(feature, 0.0)], {})
    return named.top_tokens


def window_context(source: IndexSource, window: int, position: int, features: list[int]) -> Context:
    """Token ``position`` of ``window`` in its document, shaded by the largest activation of
    ``features`` on each token."""
    reader = source.reader
    view = reader.window(window)
    values = reader.window_activations(window, features, view.shard).max(axis=0)
    start, stop = 0, len(view.tokens)
    for segment in view.segments:
        if segment.start <= position < segment.start + segment.length:
            start, stop = segment.start, segment.start + segment.length
    while start < position and not view.mask[start]:
        start += 1
    return Context(
        window=window,
        position=position - start,
        value=float(values[position]),
        tokens=list(view.tokens[start:stop]),
        values=values[start:stop].astype(float).tolist(),
        window_position=position,
    )


class CompareScreen(Screen[None]):
    """Matched pairs and split trees of index A against index B."""

    BINDINGS: ClassVar[list[BindingType]] = [*bindings("compare")]
    DEFAULT_CSS = """
    CompareScreen #compare-title { height: 1; background: $panel; padding: 0 1; }
    CompareScreen #compare-status { height: 1; padding: 0 1; color: $text-muted; }
    CompareScreen DataTable, CompareScreen Tree { height: 1fr; }
    CompareScreen #compare-sides { height: 1fr; }
    """

    def __init__(self, path_a: Path, path_b: Path) -> None:
        super().__init__()
        self.paths = {"a": Path(path_a), "b": Path(path_b)}
        self.sources = {side: IndexSource(path) for side, path in self.paths.items()}
        self.comparison: Comparison | None = None
        self.names: dict[str, dict[int, str]] = {"a": {}, "b": {}}
        self.sort = "cosine"
        self.descending = True
        self.side = "a"
        self.mode = "pairs"
        self.rows: list[PairRow] = []
        self.phase = "starting"
        self.error: str | None = None
        self._started = time.monotonic()

    def compose(self) -> ComposeResult:
        yield Static(
            Text.assemble(
                (" compare ", "bold reverse"),
                f" A {self.paths['a'].name}  ⇄  B {self.paths['b'].name}",
            ),
            id="compare-title",
        )
        yield Static("", id="compare-status")
        yield DataTable(id="compare-pairs", cursor_type="row", zebra_stripes=True)
        tree: Tree[dict[str, Any]] = Tree("splits", id="compare-splits")
        tree.auto_expand = False
        tree.display = False
        yield tree
        with Horizontal(id="compare-sides"):
            yield SidePreview(id="preview-a")
            yield SidePreview(id="preview-b")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#preview-a", SidePreview).add_class("-chosen")
        for side in SIDES:
            self._preview(side).show_message(side.upper(), "comparing…")
        self._tick = self.set_interval(0.5, self._show_status)
        self._show_status()
        self.query_one(DataTable).focus()
        self.compute()

    def on_unmount(self) -> None:
        for source in self.sources.values():
            source.close()

    # ------------------------------------------------------------------ computing

    @work(thread=True, exclusive=True, exit_on_error=False, group="compare")
    def compute(self) -> None:
        from saetui.analysis.compare_report import compare, load_side

        worker = get_current_worker()

        def check_stop() -> None:
            if worker.is_cancelled:
                raise _Stopped

        def progress(phase: str) -> None:
            self.phase = phase

        started = time.monotonic()
        try:
            progress("loading the SAEs")
            side_a, side_b = load_side(self.paths["a"]), load_side(self.paths["b"])
            report = compare(side_a, side_b, progress=progress, check_stop=check_stop)
            comparison = Comparison.from_report(report, time.monotonic() - started)
            progress("naming features")
            names: dict[str, dict[int, str]] = {}
            for side, features in comparison.features_shown().items():
                source = self.sources[side]
                labels = source.labels_of_all()
                names[side] = {}
                for feature in sorted(features):
                    check_stop()
                    names[side][feature] = feature_name(source, feature, labels)
        except _Stopped:
            return
        except SaetuiInputError as error:
            self.app.call_from_thread(self._show_error, str(error))
            return
        except Exception as error:  # shown, not raised: the rest of the app goes on
            self.app.call_from_thread(
                self._show_error, f"the comparison failed: {type(error).__name__}: {error}"
            )
            return
        if not worker.is_cancelled:
            self.app.call_from_thread(self._show_comparison, comparison, names)

    def _show_status(self) -> None:
        status = self.query_one("#compare-status", Static)
        if self.error is not None:
            status.update(Text(self.error, style="bold red"))
        elif self.comparison is None:
            elapsed = time.monotonic() - self._started
            status.update(Text(f"comparing… {self.phase} ({elapsed:.0f} s)", style="yellow"))
        else:
            status.update(self._status_text())

    def _status_text(self) -> Text:
        comparison = self.comparison
        assert comparison is not None
        title, _ = PAIR_SORTS[self.sort]
        arrow = "↓" if self.descending else "↑"
        if self.mode == "pairs":
            where = f"{len(self.rows):,} pairs · sort {title} {arrow}"
        else:
            where = f"{len(comparison.splits):,} split trees (parents in {self._parent_name()})"
        return Text.assemble((f"{where} · ", "bold"), (comparison.describe(), "dim"))

    def _parent_name(self) -> str:
        side = self.comparison.parent_side if self.comparison else None
        return (side or "?").upper()

    def _show_error(self, text: str) -> None:
        self.error = text
        self._tick.stop()
        self._show_status()
        for side in SIDES:
            self._preview(side).show_message(side.upper(), "no comparison")

    def _show_comparison(self, comparison: Comparison, names: dict[str, dict[int, str]]) -> None:
        self.comparison = comparison
        self.names = names
        self._tick.stop()
        table = self.query_one(DataTable)
        table.add_column("A", key="a", width=6)
        table.add_column("A feature", key="a_name", width=NAME_WIDTH)
        table.add_column("B", key="b", width=6)
        table.add_column("B feature", key="b_name", width=NAME_WIDTH)
        table.add_column("cos", key="cosine", width=5)
        table.add_column("Jacc", key="jaccard", width=5)
        table.add_column("Δdens", key="density", width=6)
        self._fill_table()
        self._fill_tree()
        self._show_status()

    # ------------------------------------------------------------------ the pair table

    def _feature_text(self, side: str, feature: int) -> Text:
        return Text(show_token(self.names[side].get(feature, "")), no_wrap=True, style="dim")

    def _fill_table(self, keep: PairRow | None = None) -> None:
        assert self.comparison is not None
        table = self.query_one(DataTable)
        self.rows = self.comparison.sorted_pairs(self.sort, self.descending)
        table.clear()
        for pair in self.rows:
            change = pair.density_change
            table.add_row(
                Text(f"#{pair.a}"),
                self._feature_text("a", pair.a),
                Text(f"#{pair.b}"),
                self._feature_text("b", pair.b),
                Text(f"{pair.cosine:.2f}", style="bold" if pair.cosine >= 0.7 else ""),
                Text("—" if pair.jaccard is None else f"{pair.jaccard:.2f}"),
                Text("—" if change is None else f"{change:+.2f}"),
                key=f"{pair.a}:{pair.b}",
            )
        if keep is not None and keep in self.rows:
            table.move_cursor(row=self.rows.index(keep), animate=False)
        elif self.rows:
            table.move_cursor(row=0, animate=False)
        self._pair_highlighted()

    @property
    def current_pair(self) -> PairRow | None:
        row = self.query_one(DataTable).cursor_row
        return self.rows[row] if 0 <= row < len(self.rows) else None

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._pair_highlighted()

    def _pair_highlighted(self) -> None:
        pair = self.current_pair
        if pair is not None:
            self.load_previews({"a": ("feature", pair.a), "b": ("feature", pair.b)})

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    @on(DataTable.HeaderSelected)
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        sort = {"a": "a", "cosine": "cosine", "jaccard": "jaccard", "density": "density"}.get(key)
        if sort is not None:
            self._sort_by(sort, PAIR_SORTS[sort][1] if sort != self.sort else not self.descending)

    def _sort_by(self, sort: str, descending: bool) -> None:
        if self.comparison is None:
            return
        keep = self.current_pair
        self.sort, self.descending = sort, descending
        self._fill_table(keep)
        self._show_status()

    def action_next_sort(self) -> None:
        order = list(PAIR_SORTS)
        sort = order[(order.index(self.sort) + 1) % len(order)]
        self._sort_by(sort, PAIR_SORTS[sort][1])

    def action_reverse_sort(self) -> None:
        self._sort_by(self.sort, not self.descending)

    # ------------------------------------------------------------------ the split trees

    def _fill_tree(self) -> None:
        assert self.comparison is not None
        comparison = self.comparison
        tree: Tree[dict[str, Any]] = self.query_one(Tree)
        tree.clear()
        parent_side, child_side = comparison.parent_side, comparison.child_side
        if parent_side is None or child_side is None:
            tree.root.set_label(Text("no splits: both sides must be indexes of the same windows"))
            return
        tree.root.set_label(
            Text(
                f"{len(comparison.splits):,} features of {parent_side.upper()} split into 2+ "
                f"of {child_side.upper()}  (coverage: parent's firings with a child / "
                "children's with the parent)"
            )
        )
        for split in comparison.splits:
            node = tree.root.add(
                Text.assemble(
                    (f"{parent_side.upper()} #{split.parent} ", "bold"),
                    (f"{self.names[parent_side].get(split.parent, '')[:NAME_WIDTH]} ", "dim"),
                    f"×{split.count:,} → {len(split.children)} · covered ",
                    (f"{split.parent_covered:.0%}", "bold"),
                    " / ",
                    (f"{split.children_covered:.0%}", "bold"),
                ),
                data={"kind": "parent", "split": split},
            )
            for child in split.children:
                node.add_leaf(
                    Text.assemble(
                        (f"{child_side.upper()} #{child.feature} ", "bold"),
                        (f"{self.names[child_side].get(child.feature, '')[:NAME_WIDTH]} ", "dim"),
                        f"cos {child.cosine:.2f} · with parent {child.cofire:,}/{child.count:,}",
                    ),
                    data={"kind": "child", "split": split, "child": child.feature},
                )
            node.add_leaf(
                Text(
                    f"parent without children: {len(split.parent_only)} shown · children "
                    f"without parent: {len(split.children_only)} shown",
                    style="italic",
                ),
                data={"kind": "absorbed", "split": split},
            )
        tree.root.expand()

    @on(Tree.NodeHighlighted)
    def _node_highlighted(self, event: Tree.NodeHighlighted[dict[str, Any]]) -> None:
        self._tree_node_shown(event.node)

    def _tree_node_shown(self, node: TreeNode[dict[str, Any]] | None) -> None:
        comparison = self.comparison
        if node is None or node.data is None or comparison is None:
            return
        parent_side, child_side = comparison.parent_side, comparison.child_side
        if parent_side is None or child_side is None:
            return
        split: SplitTree = node.data["split"]
        kind = node.data["kind"]
        children = [c.feature for c in split.children]
        if kind == "absorbed":
            self.load_previews(
                {
                    parent_side: ("parent_only", split.parent, split.parent_only, [split.parent]),
                    child_side: ("children_only", split.parent, split.children_only, children),
                }
            )
            return
        child = node.data.get("child", children[0] if children else None)
        shown: dict[str, tuple[Any, ...]] = {parent_side: ("feature", split.parent)}
        if child is not None:
            shown[child_side] = ("feature", child)
        self.load_previews(shown)

    @on(Tree.NodeSelected)
    def _node_selected(self, event: Tree.NodeSelected[dict[str, Any]]) -> None:
        event.stop()
        self.action_open()

    def action_toggle_splits(self) -> None:
        if self.comparison is None:
            return
        self.mode = "splits" if self.mode == "pairs" else "pairs"
        table, tree = self.query_one(DataTable), self.query_one(Tree)
        table.display = self.mode == "pairs"
        tree.display = self.mode == "splits"
        if self.mode == "splits":
            tree.focus()
            self._tree_node_shown(tree.cursor_node)
        else:
            table.focus()
            self._pair_highlighted()
        self._show_status()

    # ------------------------------------------------------------------ previews

    def _preview(self, side: str) -> SidePreview:
        return self.query_one(f"#preview-{side}", SidePreview)

    @work(thread=True, exclusive=True, exit_on_error=False, group="compare-preview")
    def load_previews(self, shown: dict[str, tuple[Any, ...]]) -> None:
        """Per side: ("feature", f) its top contexts; (kind, parent, [(window, position)],
        features) those tokens shaded by the largest of ``features``."""
        worker = get_current_worker()
        time.sleep(0.05)  # j held down: only the row it stops on is read
        for side, what in shown.items():
            if worker.is_cancelled:
                return
            source = self.sources[side]
            title = side.upper()
            try:
                if what[0] == "feature":
                    detail = source.feature(what[1])
                    title = f"{side.upper()} #{what[1]}"
                    args: tuple[Any, ...] = (title, feature_heading(detail), detail.contexts)
                    args = (*args, what[1])
                else:
                    kind, parent, where, features = what
                    contexts = [window_context(source, w, p, features) for w, p in where]
                    heading = Text(
                        f"#{parent} fires, no child does"
                        if kind == "parent_only"
                        else "a child fires, the parent does not",
                        style="italic",
                    )
                    args = (f"{side.upper()} · {kind.replace('_', ' ')}", heading, contexts, None)
            except Exception as error:
                self.app.call_from_thread(self._preview(side).show_message, title, str(error))
                continue
            if not worker.is_cancelled:
                self.app.call_from_thread(self._preview(side).show_contexts, *args)

    # ------------------------------------------------------------------ opening

    def action_choose(self, side: str) -> None:
        self.side = side
        for each in SIDES:
            self._preview(each).set_class(each == side, "-chosen")

    def action_cursor(self, delta: int) -> None:
        widget = self.query_one(DataTable) if self.mode == "pairs" else self.query_one(Tree)
        if delta > 0:
            widget.action_cursor_down()
        else:
            widget.action_cursor_up()

    def action_open(self) -> None:
        """Open the chosen side's feature (a pair's, a split node's) in a feature view."""
        feature = self._preview(self.side).feature
        if feature is None:
            self.notify("Nothing to open on this side here: move to a pair or a feature.")
            return
        self.app.push_screen(SideFeatureScreen(self.sources[self.side], self.side.upper(), feature))

    def action_close(self) -> None:
        self.app.pop_screen()
