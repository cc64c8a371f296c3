"""Command palette (ctrl+p): "feature N", "sort by ...", "filter ...", "export ...", and every
action of the binding registry that makes sense from the palette."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from textual.command import DiscoveryHit, Hit, Hits, Provider

from saetui.tui.bindings import REGISTRY, SCOPE_TITLES, key_label
from saetui.tui.model import FILTERS, SORT_COLUMNS


class SaetuiCommands(Provider):
    def _commands(self) -> list[tuple[str, Callable[[], Any], str]]:
        app: Any = self.app
        commands: list[tuple[str, Callable[[], Any], str]] = []
        for column in SORT_COLUMNS:
            for descending in (False, True):
                word = "descending" if descending else "ascending"
                commands.append(
                    (
                        f"sort by {column} ({word})",
                        partial(app.set_table_query, sort=column, descending=descending),
                        "feature table order",
                    )
                )
        commands.extend(
            (f"filter: {name}", partial(app.set_table_query, filter=name), "feature table rows")
            for name in FILTERS
        )
        commands.append(
            (
                "filter: clear search",
                partial(app.set_table_query, search="", filter="all"),
                "show every feature",
            )
        )
        if app.current_feature is not None:
            feature = app.current_feature
            commands.append(
                (
                    f"export feature {feature} as JSON",
                    partial(app.export_feature, feature),
                    "asks where to write it (default: the current directory)",
                )
            )
        commands.append(("export labels as JSON", app.export_labels, "saetui-labels.json"))
        commands.append(
            ("export table as JSON", app.export_table, "the table's rows: saetui-features.json")
        )
        for entry in REGISTRY:
            if not entry.palette or entry.scope not in ("app",):
                continue
            commands.append(
                (
                    f"{entry.description} ({key_label(entry.key)})",
                    partial(app.call_later, app.run_action, entry.action.removeprefix("app.")),
                    SCOPE_TITLES[entry.scope],
                )
            )
        return commands

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        app: Any = self.app
        words = query.strip().lower().removeprefix("feature").strip().lstrip("#")
        if words.isdigit():
            feature = int(words)
            yield Hit(
                1.0,
                f"feature {feature}",
                partial(app.open_feature, feature),
                help="open this feature",
            )
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
