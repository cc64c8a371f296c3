"""saetui.collect."""
