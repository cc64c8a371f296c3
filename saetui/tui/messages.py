"""Messages more than one widget posts."""

from __future__ import annotations

from textual.message import Message


class OpenFeature(Message):
    """Open ``feature`` in the feature view (posted by the table, the feature view's
    neighbour rows and the probe's lists; the app handles it in ``on_open_feature``)."""

    def __init__(self, feature: int) -> None:
        super().__init__()
        self.feature = feature
