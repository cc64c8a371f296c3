"""The palette's exports: ask where to write (the current directory by default), then
write from a worker through :mod:`saetui.export.files` (atomic; a bad path is one
sentence)."""

from __future__ import annotations

from pathlib import Path

from textual import work

from saetui.export.files import default_name, export_feature, export_labels, export_rows
from saetui.tui.actions.base import AppPart
from saetui.tui.screens.path import PathScreen
from saetui.tui.widgets.feature_table import FeatureTable


class ExportActions(AppPart):
    """Feature, labels and table exports as JSON."""

    def export_feature(self, feature: int) -> None:
        self._ask_path("feature", f"Export feature #{feature} as JSON", feature)

    def export_labels(self) -> None:
        self._ask_path("labels", "Export labels as JSON")

    def export_table(self) -> None:
        self._ask_path("table", "Export the table's rows as JSON")

    def _ask_path(self, kind: str, title: str, feature: int | None = None) -> None:
        """Ask where to write, then export in a worker."""

        def chosen(path: str | None) -> None:
            if path:
                self._export(kind, feature, path)

        default = Path.cwd() / default_name(kind, feature)
        self.push_screen(PathScreen(title, str(default)), chosen)

    @work(thread=True, exit_on_error=False, group="export")
    def _export(self, kind: str, feature: int | None, path: str) -> None:
        try:
            if kind == "feature" and feature is not None:
                written = export_feature(self.source.reader, feature, path)
            elif kind == "labels":
                written = export_labels(self.source.reader, path)
            else:
                query = self.query_one(FeatureTable).query_state
                written = export_rows(self.source.export_table(query), path)
        except Exception as error:
            self.call_from_thread(self.notify, f"Export failed: {error}", severity="error")
            return
        self.call_from_thread(self.notify, f"Wrote {written}", timeout=10)
