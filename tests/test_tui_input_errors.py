"""A bad command-line input found by the collector leaves the TUI with exit code 2 and
one sentence, exactly as in the headless mode."""

from __future__ import annotations

import asyncio

import pytest
from conftest import tiny_collect_config

from saetui.errors import SaetuiInputError
from saetui.tui.app import SaetuiApp


def test_collector_input_error_exits_the_app_with_code_2(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    config = tiny_collect_config(
        tmp_path / "index", tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file,
        hook="blocks.99.hook_resid_post",
    )  # fmt: skip

    async def flow():
        app = SaetuiApp(tmp_path / "index", collect=config, watch_terminal=False)
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(1200):
                if app.return_code is not None:
                    break
                await pilot.pause(0.05)
        return app

    app = asyncio.run(flow())
    app.shutdown()
    assert app.return_code == 2
    assert "blocks.99.hook_resid_post" in app.input_error
    assert not (tmp_path / "index").exists()


def test_run_app_turns_the_input_error_into_the_cli_sentence(tmp_path, monkeypatch):
    from saetui.tui import app as app_module

    config = tiny_collect_config(
        tmp_path / "index", tmp_path / "no-model", tmp_path / "no-sae", tmp_path / "no.json"
    )
    # run_app drives the real app headlessly here: the test has no terminal.
    original_run = SaetuiApp.run

    def run_headless(self, *args, **kwargs):
        return original_run(self, *args, headless=True, **kwargs)

    monkeypatch.setattr(SaetuiApp, "run", run_headless)
    with pytest.raises(SaetuiInputError, match="no-sae does not exist"):
        app_module.run_app(tmp_path / "index", collect=config)
