"""Regenerate docs/TUI.md from the real app, so its captures and key table cannot go stale.

Runs ``saetui open INDEX`` in a real terminal (tmux, 100x30), walks the panes with the
keyboard, and replaces each ```text block that follows a ``<!-- capture:NAME -->`` marker
with what the terminal shows; the key table between ``<!-- keys:begin -->`` and
``<!-- keys:end -->`` is generated from the binding registry.

    python scripts/tui_captures.py [INDEX]

Without INDEX it builds (or reuses) the documented one:
``saetui demo --headless --out /tmp/readme-index --max-tokens 20000 --metrics-tokens 2000``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "TUI.md"
DEFAULT_INDEX = Path("/tmp/readme-index")
WIDTH, HEIGHT = 100, 30

# (capture name, keys to send, text that shows the pane is ready)
WALK: list[tuple[str, list[str], str]] = [
    ("run", ["1"], "phase"),
    ("table", ["2"], "top tokens"),
    ("feature", ["s", "s", "j", "Enter"], "Top activations"),
    ("context", ["Enter"], "features active here"),
    ("probe", ["Escape", "4", *"def main():", "Enter"], "fired"),
    ("help", ["?"], "saetui keys"),
]


class Terminal:
    """A tmux session running one command."""

    def __init__(self, command: str) -> None:
        self.name = f"saetui-captures-{time.monotonic_ns()}"
        subprocess.run(
            [
                "tmux",
                "new-session",
                "-d",
                "-s",
                self.name,
                "-x",
                str(WIDTH),
                "-y",
                str(HEIGHT),
                f"cd {REPO} && {command}; sleep 30",
            ],
            check=True,
        )

    def keys(self, *keys: str) -> None:
        for key in keys:
            subprocess.run(["tmux", "send-keys", "-t", self.name, key], check=True)
            time.sleep(0.2)

    def screen(self) -> str:
        done = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True
        )
        return done.stdout

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                time.sleep(0.5)  # let the rest of the pane paint
                return self.screen()
            time.sleep(0.2)
        raise SystemExit(f"{text!r} never appeared; the screen was:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def ensure_index(index: Path) -> None:
    if (index / "saetui-index.json").exists():
        return
    command = [sys.executable, "-m", "saetui", "demo", "--headless", "--out", str(index)]
    command += ["--max-tokens", "20000", "--metrics-tokens", "2000"]
    subprocess.run(command, check=True, cwd=REPO)


def captures(index: Path) -> dict[str, str]:
    terminal = Terminal(f"{sys.executable} -m saetui open {index}")
    out: dict[str, str] = {}
    try:
        terminal.wait_for("density")
        for name, keys, ready in WALK:
            terminal.keys(*keys)
            out[name] = terminal.screen() if not ready else terminal.wait_for(ready)
        terminal.keys("Escape", "q")
    finally:
        terminal.close()
    return {name: _tidy(text) for name, text in out.items()}


def _tidy(screen: str) -> str:
    lines = [line.rstrip() for line in screen.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def key_table() -> str:
    sys.path.insert(0, str(REPO))
    from saetui.tui.bindings import REGISTRY, SCOPE_TITLES, key_label

    rows = ["| where | key | action | binding id |", "|---|---|---|---|"]
    for entry in REGISTRY:
        keys = key_label(entry.key)
        rows.append(
            f"| {SCOPE_TITLES[entry.scope]} | `{keys}` | {entry.description} | `{entry.id}` |"
        )
    rows.append("| Help screen | `esc` `q` `?` | Close | |")
    rows.append(
        "| Everywhere | `ctrl+p` | Command palette: feature N · sort by … · filter … · "
        "export … · every action above | |"
    )
    return "\n".join(rows)


def rewrite(doc: str, shots: dict[str, str], keys: str) -> str:
    for name, text in shots.items():
        pattern = re.compile(rf"(<!-- capture:{name} -->\n```text\n)(.*?)(\n```)", re.S)
        if not pattern.search(doc):
            raise SystemExit(f"{DOC} has no '<!-- capture:{name} -->' marker before a text block")
        doc = pattern.sub(lambda m, text=text: m.group(1) + text + m.group(3), doc)
    keys_pattern = re.compile(r"(<!-- keys:begin -->\n)(.*?)(\n<!-- keys:end -->)", re.S)
    if not keys_pattern.search(doc):
        raise SystemExit(f"{DOC} has no '<!-- keys:begin -->' ... '<!-- keys:end -->' block")
    return keys_pattern.sub(lambda m: m.group(1) + keys + m.group(3), doc)


def main() -> int:
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed: the captures come from a real terminal")
    index = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_INDEX
    ensure_index(index)
    shots = captures(index)
    DOC.write_text(rewrite(DOC.read_text(), shots, key_table()))
    print(f"rewrote {DOC} ({len(shots)} captures, key table from the registry)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
