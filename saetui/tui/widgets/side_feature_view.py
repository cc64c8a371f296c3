"""The feature view over one side of a comparison (``saetui open A --compare B``): the
ordinary feature view whose bookmarks and labels go to that side's index."""

from __future__ import annotations

from saetui.tui.messages import OpenFeature
from saetui.tui.screens.label import LabelScreen
from saetui.tui.source import IndexSource
from saetui.tui.widgets.feature_view import FeatureView


class SideFeatureView(FeatureView):
    """The feature view over one side's index: bookmarks and labels go to that index; the
    model actions (ablate, probe) and table steps live in that index's own session."""

    def __init__(self, source: IndexSource, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.source = source

    def action_bookmark(self) -> None:
        if self.detail is None:
            return
        feature = self.detail.row.feature
        marked = not self.source.is_bookmarked(feature)
        self.source.set_bookmark(feature, marked)
        self.notify(f"#{feature} {'bookmarked' if marked else 'bookmark removed'}")

    def action_edit_label(self) -> None:
        if self.detail is None:
            return
        feature = self.detail.row.feature

        def saved(result: tuple[str, str] | None) -> None:
            if result is not None:
                self.source.set_label(feature, *result)
                self.post_message(OpenFeature(feature))  # shown afresh

        self.app.push_screen(LabelScreen(feature, self.detail.row.label, self.detail.notes), saved)

    def _elsewhere(self) -> None:
        self.notify(
            f"Open the index itself for that: saetui open {self.source.path}", severity="warning"
        )

    def action_ablate(self) -> None:
        self._elsewhere()

    def action_probe(self) -> None:
        self._elsewhere()

    def action_step(self, delta: int) -> None:
        self._elsewhere()

    def action_copy_reference(self) -> None:
        if self.detail is not None:
            reference = (
                f"saetui open {self.source.path.resolve()} --feature {self.detail.row.feature}"
            )
            self.app.copy_to_clipboard(reference)
            self.notify(f"Copied (OSC 52): {reference}")
