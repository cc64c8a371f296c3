"""saetui.tui."""
