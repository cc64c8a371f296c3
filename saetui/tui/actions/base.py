"""What the parts of the app share: the attributes :class:`saetui.tui.app.SaetuiApp` sets
up and the methods one part calls on another (declared here for the type checker, defined
by the part that owns them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from textual.app import App
    from textual.worker import Worker

    from saetui.analysis.service import ProbeService
    from saetui.collect.controller import CollectionController
    from saetui.tui.history import History, Visit
    from saetui.tui.model import FeatureDetail, RunPlots, RunState
    from saetui.tui.source import IndexSource

    _App = App[int]
else:
    _App = object


class AppPart(_App):
    """Base of every part of the app (at run time a plain mixin: ``object``)."""

    index_path: Path
    compare_path: Path | None
    source: IndexSource
    collection: CollectionController
    history: History
    run_state: RunState | None
    label_cache: dict[int, str]
    current_feature: int | None
    current_detail: FeatureDetail | None
    _plots: RunPlots | None
    _probe: ProbeService | None

    if TYPE_CHECKING:

        def poll(self) -> None: ...

        def open_feature(
            self, feature: int, remember: bool = True, restore: Visit | None = None
        ) -> None: ...

        def load_feature(
            self, feature: int, keep_position: bool = False, restore: Visit | None = None
        ) -> Worker[None]: ...

        def action_show_tab(self, tab: str) -> None: ...

        def update_status_line(self) -> None: ...

        def update_table_header(self) -> None: ...

        def exit_code(self) -> int: ...
