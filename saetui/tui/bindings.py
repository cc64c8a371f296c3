"""One registry of key bindings: it feeds every widget's BINDINGS, the footer, the help
screen and the command palette, so a key shown anywhere is the key that works.

Every binding has an id (``scope.name``), so users can rebind keys by id through
``App.set_keymap`` (posting's pattern).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding, BindingType

from saetui.errors import SaetuiInputError


@dataclass(frozen=True)
class KeyAction:
    """A key bound to an action within a scope (the widget or screen that owns it)."""

    id: str
    key: str  # Textual key string; commas separate alternatives ("k,up")
    action: str
    description: str
    show: bool = True  # shown in the footer
    palette: bool = True  # offered in the command palette
    priority: bool = False

    @property
    def scope(self) -> str:
        return self.id.split(".", 1)[0]

    def binding(self) -> Binding:
        return Binding(
            self.key,
            self.action,
            self.description,
            show=self.show,
            priority=self.priority,
            id=self.id,
            key_display=key_label(self.key.split(",")[0]),
        )


SCOPE_TITLES = {
    "app": "Everywhere",
    "table": "Feature table",
    "feature": "Feature view",
    "context": "Context view",
    "probe": "Probe",
    "run": "Run & metrics",
    "query": "Query bar",
    "label": "Label editor",
    "compare": "Comparison",
}

REGISTRY: tuple[KeyAction, ...] = (
    # everywhere
    KeyAction("app.quit", "q", "app.quit_app", "Quit"),
    KeyAction("app.help", "question_mark", "app.help", "Help"),
    KeyAction("app.search", "slash", "app.search", "Search"),
    KeyAction("app.query", "Q", "app.query", "Query the corpus", show=False),
    KeyAction("app.back", "b,backspace", "app.back", "Back"),
    KeyAction("app.forward", "f", "app.forward", "Forward", show=False),
    KeyAction("app.run_tab", "1", "app.show_tab('run')", "Run", show=False),
    KeyAction("app.table_tab", "2", "app.show_tab('features')", "Features", show=False),
    KeyAction("app.feature_tab", "3", "app.show_tab('feature')", "Feature", show=False),
    KeyAction("app.probe_tab", "4", "app.show_tab('probe')", "Probe", show=False),
    KeyAction("app.pause", "p", "app.toggle_collection", "Pause/resume", show=False),
    KeyAction(
        "app.next_tab",
        "tab",
        "app.next_tab(1)",
        "Next pane",
        show=False,
        palette=False,
        priority=True,
    ),
    KeyAction(
        "app.prev_tab",
        "shift+tab",
        "app.next_tab(-1)",
        "Previous pane",
        show=False,
        palette=False,
        priority=True,
    ),
    # feature table
    KeyAction("table.down", "j,down", "cursor_down", "Down", show=False, palette=False),
    KeyAction("table.up", "k,up", "cursor_up", "Up", show=False, palette=False),
    KeyAction("table.top", "g,home", "cursor_top", "Top", show=False, palette=False),
    KeyAction("table.bottom", "G,end", "cursor_bottom", "Bottom", show=False, palette=False),
    KeyAction(
        "table.page_down", "pagedown,ctrl+d", "page_down", "Page down", show=False, palette=False
    ),
    KeyAction("table.page_up", "pageup,ctrl+u", "page_up", "Page up", show=False, palette=False),
    KeyAction("table.open", "enter,l", "open", "Open", show=False),
    KeyAction("table.sort", "s", "next_sort", "Sort"),
    KeyAction("table.reverse", "S", "reverse_sort", "Reverse sort", show=False),
    KeyAction("table.filter", "x", "next_filter", "Filter"),
    KeyAction("table.density", "d", "app.density_filter", "Density range", show=False),
    KeyAction("table.bookmark", "m", "bookmark", "Bookmark", show=False),
    KeyAction("table.label", "e", "edit_label", "Label", show=False),
    # feature view
    KeyAction("feature.down", "j,down", "cursor_down", "Down", show=False, palette=False),
    KeyAction("feature.up", "k,up", "cursor_up", "Up", show=False, palette=False),
    KeyAction("feature.top", "g,home", "first", "Top", show=False, palette=False),
    KeyAction("feature.bottom", "G,end", "last", "Bottom", show=False, palette=False),
    KeyAction(
        "feature.page_down", "pagedown,ctrl+d", "page_down", "Page down", show=False, palette=False
    ),
    KeyAction("feature.page_up", "pageup,ctrl+u", "page_up", "Page up", show=False, palette=False),
    KeyAction("feature.open", "enter,l", "open", "Open", show=False),
    KeyAction("feature.bookmark", "m", "bookmark", "Bookmark"),
    KeyAction("feature.label", "e", "edit_label", "Label/notes"),
    KeyAction("feature.copy", "c", "copy", "Copy context", show=False),
    KeyAction("feature.next", "n", "step(1)", "Next feature in the table's order", show=False),
    KeyAction("feature.prev", "N", "step(-1)", "Previous feature in the table's order", show=False),
    KeyAction("feature.probe", "P", "probe", "Shade my text by this feature", show=False),
    KeyAction("feature.ablate", "a", "ablate", "Ablate on the top contexts"),
    KeyAction("feature.reference", "y", "copy_reference", "Copy a reference to this feature"),
    # context view
    KeyAction("context.right", "l,right", "move(1)", "Next token", show=False, palette=False),
    KeyAction("context.left", "h,left", "move(-1)", "Prev token", show=False, palette=False),
    KeyAction("context.word_right", "w", "move(8)", "8 tokens right", show=False, palette=False),
    KeyAction("context.word_left", "B", "move(-8)", "8 tokens left", show=False, palette=False),
    KeyAction("context.down", "j,down", "list_down", "Down", show=False, palette=False),
    KeyAction("context.up", "k,up", "list_up", "Up", show=False, palette=False),
    KeyAction("context.open", "enter", "open", "Open feature"),
    KeyAction("context.copy", "c", "copy", "Copy window"),
    KeyAction("context.close", "escape", "close", "Close"),
    # probe
    KeyAction("probe.input", "i", "focus_input", "Edit text"),
    KeyAction("probe.right", "l,right", "move(1)", "Next token", show=False, palette=False),
    KeyAction("probe.left", "h,left", "move(-1)", "Prev token", show=False, palette=False),
    KeyAction("probe.down", "j,down", "list_down", "Down", show=False, palette=False),
    KeyAction("probe.up", "k,up", "list_up", "Up", show=False, palette=False),
    KeyAction("probe.switch", "t", "switch_list", "Token/ranked list"),
    KeyAction("probe.open", "enter", "open", "Open feature"),
    KeyAction("probe.shade", "s", "shade", "Shade the text by this feature"),
    KeyAction("probe.shade_all", "a", "shade_all", "Shade by each token's top feature"),
    KeyAction("probe.steer", "g", "steer", "Steer a generation"),
    # query bar
    KeyAction("query.edit", "ctrl+l", "edit", "Edit the query"),
    KeyAction("query.document", "d", "document", "Whole document"),
    KeyAction("query.close", "escape", "close", "Close"),
    # label editor
    KeyAction("label.save", "ctrl+s", "save", "Save"),
    KeyAction("label.cancel", "escape", "cancel", "Cancel"),
    # comparison of two indexes
    KeyAction("compare.show", "C", "app.compare", "Compare with the second index", show=False),
    KeyAction("compare.down", "j", "cursor(1)", "Down", show=False, palette=False),
    KeyAction("compare.up", "k", "cursor(-1)", "Up", show=False, palette=False),
    KeyAction("compare.sort", "s", "next_sort", "Sort"),
    KeyAction("compare.reverse", "S", "reverse_sort", "Reverse sort", show=False),
    KeyAction("compare.splits", "t", "toggle_splits", "Pairs/splits"),
    KeyAction("compare.side_a", "h", "choose('a')", "Side A"),
    KeyAction("compare.side_b", "l", "choose('b')", "Side B"),
    KeyAction("compare.open", "enter", "open", "Open the chosen side's feature", show=False),
    KeyAction("compare.close", "escape,b", "close", "Back"),
)

_BY_ID = {entry.id: entry for entry in REGISTRY}


def bindings(scope: str) -> list[BindingType]:
    """The Textual bindings of one scope, for a class's BINDINGS."""
    return [entry.binding() for entry in REGISTRY if entry.scope == scope]


def entry(binding_id: str) -> KeyAction:
    return _BY_ID[binding_id]


def key_label(key: str) -> str:
    """How a key string reads in help text ("question_mark" -> "?")."""
    names = {
        "question_mark": "?",
        "slash": "/",
        "backspace": "⌫",
        "enter": "⏎",
        "escape": "esc",
        "pagedown": "PgDn",
        "pageup": "PgUp",
    }
    return " ".join(names.get(part, part) for part in key.split(","))


def keys_path() -> Path:
    """Where user key bindings live: $XDG_CONFIG_HOME/saetui/keys.toml (or keys.json)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    folder = Path(base) / "saetui"
    toml = folder / "keys.toml"
    json_path = folder / "keys.json"
    return json_path if json_path.exists() and not toml.exists() else toml


def load_keymap(path: Path | None = None) -> dict[str, str]:
    """Binding id -> key string from a user file (``{"table.sort": "o"}`` in JSON, or a
    ``[keys]`` table / top-level keys in TOML); {} when there is no file."""
    path = keys_path() if path is None else path
    if not path.exists():
        return {}
    try:
        text = path.read_text()
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            if sys.version_info >= (3, 11):
                import tomllib

                raw = tomllib.loads(text)
            else:
                raise SaetuiInputError(
                    f"{path}: reading TOML needs Python 3.11; write the same mapping to "
                    f"{path.with_suffix('.json')} instead."
                )
    except (OSError, ValueError) as error:
        raise SaetuiInputError(
            f"{path} is not a readable key-binding file ({error}): fix or delete it."
        ) from None
    raw = raw.get("keys", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in raw.items()
    ):
        raise SaetuiInputError(
            f'{path} should map binding ids to keys, e.g. "table.sort" = "o": fix it.'
        )
    unknown = sorted(set(raw) - set(_BY_ID))
    if unknown:
        raise SaetuiInputError(
            f"{path} names unknown binding ids {', '.join(unknown)}: use ids from the help "
            "screen's table (docs/TUI.md lists them)."
        )
    return {k: v.strip() for k, v in raw.items()}


def effective_key(entry: KeyAction, keymap: dict[str, str] | None = None) -> str:
    """The key that triggers ``entry`` after the user's remapping."""
    return (keymap or {}).get(entry.id, entry.key)
