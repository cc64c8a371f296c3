"""saetui.export."""
