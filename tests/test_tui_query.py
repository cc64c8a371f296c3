"""Pilot test of the query bar over a synthetic index with postings: matches and counts as
the query API gives them, a bad expression's sentence, a match opened in the context view."""

from __future__ import annotations

import asyncio

import pytest

from saetui.index import build_postings, open_index, open_query
from saetui.index.synthetic import SyntheticCorpus, write_synthetic
from saetui.tui.app import SaetuiApp
from saetui.tui.screens.context import ContextScreen
from saetui.tui.screens.query import QueryScreen

SIZE = (110, 30)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("tui-query")
    write_synthetic(path, SyntheticCorpus(d_sae=64, ctx_len=16, k=6, vocab_size=60), 40)
    build_postings(path, part_nnz=800)
    return path


async def wait_for(pilot, condition, tries=400):
    for _ in range(tries):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("condition not reached")


def test_query_bar_lists_matches_and_opens_one(index):
    reader, engine = open_query(index)
    expected = engine.query("f:3 & !f:5", limit=50)
    document = engine.document(engine.document_of(int(expected.positions[0])), [3])
    engine.close()
    reader.close()
    assert expected.total > 0

    async def flow():
        app = SaetuiApp(index, watch_terminal=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.2)
            await pilot.press("Q")
            await wait_for(pilot, lambda: isinstance(app.screen, QueryScreen))
            screen = app.screen
            await pilot.press(*"f:3 &&", "enter")
            await wait_for(pilot, lambda: "cannot read the query" in str(status(screen)))
            assert screen.result is None
            screen.query_one("#query-input").value = ""
            screen.query_one("#query-input").focus()
            await pilot.press(*"f:3 & !f:5", "enter")
            await wait_for(pilot, lambda: screen.result is not None)
            result = screen.result
            assert result.total == expected.total
            assert [(m.shard, m.window, m.position) for m in result.matches] == [
                (s, g // 16, g % 16) for s, g in expected.locations()
            ]
            options = screen.query_one("#query-results")
            assert options.option_count == len(expected.positions)
            assert f"{expected.total:,} matches" in str(status(screen))
            # Enter opens the highlighted match in the context view, on feature 3
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ContextScreen))
            assert app.screen.feature == 3
            assert app.screen.context.value == pytest.approx(float(expected.values[0, 0]))
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, QueryScreen))
            # d: the match's whole document, across windows, shaded by feature 3
            await pilot.press("d")
            await wait_for(pilot, lambda: isinstance(app.screen, ContextScreen))
            context = app.screen.context
            assert context.tokens == document.tokens
            assert context.values == pytest.approx(document.activations[0].tolist())
            assert len({w for w, _ in context.locations}) >= 2  # it spans windows
            assert context.position == document.index_of(int(expected.positions[0]))
            # moving along the document lists the features of the token in its own window
            screen_ctx = app.screen
            target = min(context.position + 1, len(context.tokens) - 1)
            window, position = context.locations[target]
            with open_index(index) as reader:
                want = set(reader.token(window, position).feature_ids.tolist())
            assert want
            await pilot.press("l")
            await wait_for(pilot, lambda: {a.feature for a in screen_ctx.active} == want)
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, QueryScreen))
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, QueryScreen))

    asyncio.run(flow())


def status(screen):
    return screen.query_one("#query-status").render()
