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


def _context_open(pilot_feature: int):
    async def run_before(pilot) -> None:
        await _feature_loaded(pilot_feature)(pilot)
        await pilot.press("enter")  # the first top context
        for _ in range(400):
            screen = pilot.app.screen
            if screen.__class__.__name__ == "ContextScreen" and screen.active:
                break
            await pilot.pause(0.05)
        await pilot.pause(0.3)

    return run_before


async def _run_pane(pilot) -> None:
    await _loaded(pilot)
    await pilot.press("1")
    for _ in range(200):
        if pilot.app.query_one("TabbedContent").active == "run":
            break
        await pilot.pause(0.05)
    await pilot.pause(0.8)


@pytest.mark.parametrize("size", [(80, 24), (120, 30)], ids=["80x24", "120x30"])
@pytest.mark.parametrize("pane", ["run", "feature", "context", "probe"])
def test_snapshot_every_pane(snap_compare, synthetic_index, pane, size, monkeypatch):
    """Each pane at both sizes (the probe before its first run: no model here). The app
    opens the index by a relative path, as typed, so the run pane's path is stable."""
    monkeypatch.chdir(synthetic_index.parent)
    run_before = {
        "run": _run_pane,
        "feature": _feature_loaded(2),
        "context": _context_open(2),
        "probe": _probe_pane,
    }[pane]
    app = SaetuiApp(Path(synthetic_index.name), watch_terminal=False)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


async def _probe_pane(pilot) -> None:
    await _loaded(pilot)
    await pilot.press("4")
    for _ in range(200):  # until the text box has focus (the cursor is part of the picture)
        focused = pilot.app.focused
        if focused is not None and focused.id == "probe-input":
            focused.cursor_blink = False  # a blinking cursor makes the picture timing-dependent
            break
        await pilot.pause(0.05)
    await pilot.pause(0.5)


# ---------------------------------------------------------------------- tmux


def _command(index: Path) -> str:
    """`python -m saetui open INDEX`: the command a user types (no other entry point)."""
    return f"{sys.executable} -m saetui open {index}"


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


def _collect_in_tmux(session: str, out: Path, model: Path, sae: Path, corpus: Path) -> Tmux:
    command = (
        f"{sys.executable} -m saetui collect --model {model} --sae {sae} --data {corpus} "
        f"--out {out} --ctx-len 24 --batch-size 2 --device cpu --metrics-tokens 400"
    )
    return Tmux(session, command)


def _describe(pids: list[str]) -> str:
    """``ps`` lines of ``pids`` (state, kernel wait channel, command) for a failure message."""
    ps = ["ps", "-o", "pid,ppid,stat,wchan:20,etime,args", "-p", ",".join(pids)]
    return subprocess.run(ps, capture_output=True, text=True).stdout


def _processes_of(out: Path) -> list[str]:
    """The saetui process collecting into ``out`` and its children (not the tmux shell)."""
    pattern = f"^{sys.executable} -m saetui collect .*--out {out}"
    apps = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    children = [
        child
        for app in apps
        for child in subprocess.run(
            ["pgrep", "-P", app], capture_output=True, text=True
        ).stdout.split()
    ]
    return apps + children


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_real_terminal_collect_stays_responsive_and_q_stops_it(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, busy_cores
):
    """`saetui collect` with its TUI, both cores busy: tabs answer within 2 s while the
    child collects, q ends everything within 10 s with exit 130 and the resume line."""
    import json

    from conftest import tiny_documents

    from saetui.index import open_index

    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(tiny_documents(3000, seed=6)))
    out = tmp_path / "index"
    tmux = _collect_in_tmux(
        f"saetui-live-{time.monotonic_ns()}", out, tiny_gpt2_dir, tiny_sae_dir, corpus
    )
    try:
        tmux.wait_for("phase collecting", timeout=120)
        for key, text in (("2", "top tokens"), ("1", "phase collecting"), ("2", "density")):
            tmux.keys(key)
            tmux.wait_for(text, timeout=2.0)
        tmux.keys("q")
        screen = tmux.wait_for("EXITED", timeout=10.0)
        assert "EXITED 130" in screen
        assert "resumable" in screen and "saetui collect" in screen
        assert not _processes_of(out)  # the collector child is gone too
        with open_index(out) as index:
            assert index.progress().tokens > 0 and not index.progress().finished
    finally:
        tmux.close()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_terminal_gone_stops_the_app_and_its_collector(tmp_path, tiny_gpt2_dir, tiny_sae_dir):
    """ssh drops (the terminal sends SIGHUP): the app and its collector end, resumable."""
    import json

    from conftest import tiny_documents

    from saetui.index import open_index

    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(tiny_documents(3000, seed=7)))
    out = tmp_path / "index"
    tmux = _collect_in_tmux(
        f"saetui-hup-{time.monotonic_ns()}", out, tiny_gpt2_dir, tiny_sae_dir, corpus
    )
    try:
        tmux.wait_for("phase collecting", timeout=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the first commit
            try:
                with open_index(out) as index:
                    if index.progress().tokens > 0:
                        break
            except Exception:
                pass
            time.sleep(0.2)
        assert _processes_of(out)
    finally:
        tmux.close()  # kills the pane: SIGHUP to the app
    deadline = time.monotonic() + 15
    while _processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _processes_of(out)
    assert not left, _describe(left)
    with open_index(out) as index:
        assert index.progress().tokens > 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.parametrize("colours", ["truecolor", "256", "NO_COLOR"])
def test_the_firing_token_stays_marked_and_the_cursor_is_not_heat(synthetic_index, colours):
    """In truecolor, 256 colours and monochrome (NO_COLOR) the firing token of a context
    is underlined; with colours, the cursor row's background is blue, the heat orange."""
    import re

    env = {"truecolor": "COLORTERM=truecolor", "256": "COLORTERM=", "NO_COLOR": "NO_COLOR=1"}
    command = f"env {env[colours]} TERM=tmux-256color {_command(synthetic_index)}"
    tmux = Tmux(f"saetui-colour-{time.monotonic_ns()}", command)
    try:
        tmux.wait_for("1/512")
        tmux.keys("j", "j", "Enter")
        tmux.wait_for("Top activations")
        time.sleep(0.5)
        raw = subprocess.run(
            ["tmux", "capture-pane", "-e", "-p", "-t", tmux.session],
            capture_output=True,
            text=True,
        ).stdout
        marked = [line for line in raw.splitlines() if "\x1b[4m" in line or ";4m" in line]
        assert marked  # the underlined (firing) token
        rgb = [tuple(map(int, m)) for m in re.findall(r"48;2;(\d+);(\d+);(\d+)", raw)]
        if colours == "NO_COLOR":  # monochrome: greys only, the mark carries the meaning
            assert all(max(c) - min(c) <= 8 for c in rgb), set(rgb)
        elif colours == "truecolor":
            assert any(r > b + 60 for r, _, b in rgb)  # orange heat
            assert any(b > r + 60 for r, _, b in rgb)  # the blue cursor row
    finally:
        tmux.close()
