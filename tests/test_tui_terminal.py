"""Snapshot tests at fixed sizes and one real-terminal run under tmux."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saetui.tui.app import SaetuiApp

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory) -> Path:
    """A small deterministic index written by the real writer (same bytes every run)."""
    from saetui.index.synthetic import SyntheticCorpus, write_synthetic

    path = tmp_path_factory.mktemp("snap") / "index"
    write_synthetic(path, SyntheticCorpus(d_sae=512, ctx_len=32), 200)
    return path


async def _loaded(pilot) -> None:
    app = pilot.app
    table = app.query_one("FeatureTable")
    status = app.query_one("#table-status")
    for _ in range(600):
        ready = app.run_state is not None and table.current_row is not None
        if ready and "1/" in str(status.render()):
            break
        await pilot.pause(0.05)
    await pilot.pause(0.3)


def _feature_loaded(feature: int):
    async def run_before(pilot) -> None:
        await _loaded(pilot)
        await pilot.press("slash", *f"#{feature}", "enter")
        view = pilot.app.query_one("FeatureView")
        for _ in range(400):
            if view.detail is not None and view.detail.row.feature == feature:
                break
            await pilot.pause(0.05)
        await pilot.pause(0.2)

    return run_before


def test_snapshot_table_80x24(snap_compare, synthetic_index):
    app = SaetuiApp(synthetic_index, watch_terminal=False)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_loaded)


def test_snapshot_table_sorted_by_density_120x30(snap_compare, synthetic_index):
    async def run_before(pilot) -> None:
        await _loaded(pilot)
        await pilot.press("s", "s")  # id -> label -> density (descending)
        await _loaded(pilot)
        for _ in range(100):
            row = pilot.app.query_one("FeatureTable").current_row
            if row is not None and row.feature != 0:
                break
            await pilot.pause(0.05)
        await pilot.pause(0.2)

    app = SaetuiApp(synthetic_index, watch_terminal=False)
    assert snap_compare(app, terminal_size=(120, 30), run_before=run_before)


def test_snapshot_feature_view_80x24(snap_compare, synthetic_index):
    app = SaetuiApp(synthetic_index, watch_terminal=False)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_feature_loaded(2))


def test_snapshot_help_80x24(snap_compare, synthetic_index):
    async def run_before(pilot) -> None:
        await _loaded(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.2)

    app = SaetuiApp(synthetic_index, watch_terminal=False)
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


# ---------------------------------------------------------------------- tmux


def _command(index: Path) -> str:
    """`python -m saetui open INDEX` once the CLI has it, else the same entry point directly."""
    helptext = subprocess.run(
        [sys.executable, "-m", "saetui", "--help"], capture_output=True, text=True, cwd=REPO
    ).stdout
    if " open " in helptext or "{open" in helptext or ",open" in helptext:
        return f"{sys.executable} -m saetui open {index}"
    code = "import sys; from saetui.tui.app import run_app; sys.exit(run_app(sys.argv[1]))"
    return f'{sys.executable} -c "{code}" {index}'


class Tmux:
    def __init__(self, session: str, command: str, width: int = 80, height: int = 24) -> None:
        self.session = session
        subprocess.run(
            [
                "tmux",
                "new-session",
                "-d",
                "-s",
                session,
                "-x",
                str(width),
                "-y",
                str(height),
                f"cd {REPO} && {command}; echo EXITED $?; sleep 60",
            ],
            check=True,
        )

    def keys(self, *keys: str) -> None:
        for key in keys:  # one at a time: "Escape" then "1" would read as alt+1
            subprocess.run(["tmux", "send-keys", "-t", self.session, key], check=True)
            time.sleep(0.15)

    def screen(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.session], capture_output=True, text=True
        ).stdout

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_real_terminal_open_browse_and_quit(synthetic_index):
    """What a user sees in a real 80x24 terminal: the table, a feature, help, a clean quit."""
    tmux = Tmux(f"saetui-test-{time.monotonic_ns()}", _command(synthetic_index))
    try:
        screen = tmux.wait_for("density")
        assert "top tokens" in screen and "1/512" in tmux.wait_for("1/512")
        tmux.keys("j", "j", "Enter")
        screen = tmux.wait_for("Top activations")
        assert "#2" in screen and "density" in screen
        tmux.keys("?")
        assert "Everywhere" in tmux.wait_for("saetui keys")
        tmux.keys("Escape")
        time.sleep(0.3)
        tmux.keys("b")
        tmux.wait_for("top tokens")
        tmux.keys("q")
        assert "EXITED 0" in tmux.wait_for("EXITED")
    finally:
        tmux.close()
