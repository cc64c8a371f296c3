"""A bad command-line input found by the collector leaves the TUI with exit code 2 and
one sentence, exactly as in the headless mode."""

from __future__ import annotations

import asyncio

import pytest

from saetui.errors import SaetuiInputError
from saetui.tui.app import SaetuiApp


def test_collector_input_error_exits_the_app_with_code_2(tmp_path):
    def collect(progress, should_stop):
        raise SaetuiInputError("Hook blocks.99.hook_resid_post does not exist in tiny.")

    async def flow():
        app = SaetuiApp(tmp_path / "index", collect=collect, watch_terminal=False)
        codes = []
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(200):
                if app.return_code is not None:
                    break
                await pilot.pause(0.05)
            codes.append(app.return_code)
        return app, codes

    app, codes = asyncio.run(flow())
    assert codes == [2]
    assert app.input_error == "Hook blocks.99.hook_resid_post does not exist in tiny."


def test_run_app_turns_the_input_error_into_the_cli_sentence(tmp_path, monkeypatch):
    from saetui.tui import app as app_module

    def collect(progress, should_stop):
        raise SaetuiInputError("Corpus corpus.json does not exist.")

    # run_app drives the real app headlessly here: the test has no terminal.
    original_run = SaetuiApp.run

    def run_headless(self, *args, **kwargs):
        return original_run(self, *args, headless=True, **kwargs)

    monkeypatch.setattr(SaetuiApp, "run", run_headless)
    with pytest.raises(SaetuiInputError, match="corpus.json does not exist"):
        app_module.run_app(tmp_path / "index", collect=collect)
