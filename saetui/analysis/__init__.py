"""saetui.analysis."""
