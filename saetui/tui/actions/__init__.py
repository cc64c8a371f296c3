"""The app's behaviour, one part per pane (each a mixin of :class:`saetui.tui.app.SaetuiApp`).

- :mod:`.run` — polling the index and the run pane: the collector (through
  :class:`saetui.collect.controller.CollectionController`), the status line, quitting.
- :mod:`.navigation` — tabs, opening a feature, history (back/forward), search and help.
- :mod:`.table` — the feature table's search and density boxes, header and status line,
  labels and bookmarks.
- :mod:`.feature` — what the feature view asks for: step, ablate, probe, context view.
- :mod:`.exports` — the palette's exports (written by :mod:`saetui.export.files`).

Each part only arranges and displays; what is slow runs in thread workers.
"""
