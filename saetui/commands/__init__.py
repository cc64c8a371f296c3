"""The handlers of the ``saetui`` subcommands, one module per area: ``collect`` (collect,
demo, merge, info), ``browse`` (open, query, postings, compare), ``export`` (export, labels,
share, ablate, steer). ``saetui.cli`` holds the argument tree and ``main``. No module here
imports Textual at import time: the TUI loads inside the handlers that open it."""
