"""Pilot tests driving the real app over a real index collected from the embedded model."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pytest
from conftest import random_relu_sae

from saetui.errors import SaetuiInputError
from saetui.tui.app import SaetuiApp, run_app
from saetui.tui.bindings import REGISTRY
from saetui.tui.history import History
from saetui.tui.screens.context import ContextScreen
from saetui.tui.widgets.feature_table import FeatureTable
from saetui.tui.widgets.feature_view import FeatureView
from saetui.tui.widgets.probe_pane import ProbePane

HOOK = "blocks.9.hook_resid_post"
SIZE = (100, 32)


def random_sae(d_in: int = 576, d_sae: int = 512, seed: int = 0):
    return random_relu_sae(d_in, d_sae, -1.0, seed, HOOK)


@pytest.fixture(scope="module")
def collected(tmp_path_factory, embedded_model):
    """(index path, sae dir): the real pipeline over the first ~2k tokens of the sample corpus
    with a small random SAE at layer 9 of the embedded model."""
    from saetui.collect.inputs import RunInputs
    from saetui.collect.pipeline import CollectConfig, run_collection
    from saetui.sae import save_sae

    root = tmp_path_factory.mktemp("tui-index")
    sae_dir = save_sae(random_sae(), root / "sae")
    corpus = Path(__file__).resolve().parent.parent / "sample_data" / "corpus.json"
    config = CollectConfig(
        out=root / "index",
        inputs=RunInputs(
            sae=sae_dir,
            data=str(corpus),
            model="smollm2-135m",
            device="cpu",
            dtype="float32",
            numerics="raw",
            ctx_len=64,
            batch_size=8,
            max_tokens=2048,
        ),
        metrics_tokens=128,
    )
    result = run_collection(config)
    assert result.status == "finished"
    return root / "index", sae_dir


@pytest.fixture
def index_copy(collected, tmp_path):
    """A private copy, so label edits in one test do not leak into another."""
    import shutil

    target = tmp_path / "index"
    shutil.copytree(collected[0], target)
    return target


def make_app(path: Path, **options) -> SaetuiApp:
    return SaetuiApp(path, watch_terminal=False, **options)


async def wait_for(pilot, condition, timeout: float = 20.0) -> None:
    """Let workers run until ``condition()`` holds (fails the test on timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await pilot.pause(0.05)


def all_rows_shown(app, table) -> bool:
    """The run state has arrived and the table lists every feature."""
    return app.run_state is not None and table.total == app.run_state.d_sae


def test_history_back_forward_branching_and_positions():
    history = History()
    for feature in (1, 2, 3):
        history.visit(feature)
        history.remember(feature * 10, feature * 2.0)
    assert history.back().feature == 2 and history.back().feature == 1
    assert history.back() is None
    visit = history.forward()
    assert (visit.feature, visit.row, visit.scroll) == (2, 20, 4.0)
    history.visit(7)  # drops the forward tail (3)
    assert history.forward() is None and history.current.feature == 7
    assert history.back().feature == 2


def test_context_line_keeps_the_firing_token_centred_and_measures_only_what_shows():
    from saetui.tui.render import context_line, context_span

    tokens = [f" w{i}" for i in range(200)]
    values = [0.0] * 200
    values[150] = 2.0
    line = context_line(tokens, values, 150, 40, max_value=2.0)
    text = line.plain
    assert len(text) <= 40 and text.startswith("…") and text.endswith("…")
    middle = text.index(" w150")
    assert abs(middle + 2 - len(text) / 2) <= 4  # centred
    assert any(
        span.style.underline for span in line.spans if text[span.start :].startswith(" w150")
    )
    shown: dict[int, str] = {}
    context_span(tokens, 150, 40, shown)
    assert len(shown) < 20  # only the tokens near the firing one were measured
    # near the end of the window the right side runs out: the line fills from the left
    start, stop = context_span(tokens, 199, 40)
    assert stop == 200 and sum(len(t) for t in tokens[start:stop]) > 30
    # a short context is shown whole, uncut
    assert context_line(tokens[:5], values[:5], 2, 40).plain == "".join(tokens[:5])


def test_contexts_are_cut_to_their_document_without_bos(collected):
    from saetui.tui.source import IndexSource

    source = IndexSource(collected[0])
    try:
        reader = source.reader
        page = reader.features(sort="density", descending=True, page_size=20)
        packed = cut = 0
        for feature in page.feature.tolist():
            for context in source.feature(feature).contexts:
                window = reader.window(context.window)
                packed += len(window.segments) > 1
                start = context.window_position - context.position
                stop = start + len(context.tokens)
                segment = next(
                    s
                    for s in window.segments
                    if s.start <= context.window_position < s.start + s.length
                )
                assert segment.start <= start and stop <= segment.start + segment.length
                assert window.mask[start:stop].all()  # no BOS / padding shown as text
                assert context.tokens[context.position] == window.tokens[context.window_position]
                assert context.values[context.position] == pytest.approx(context.value, rel=1e-2)
                cut += stop - start < len(window.tokens)
        assert packed and cut  # the corpus packs documents, so some contexts were cut
    finally:
        source.close()


def test_density_range_parsing():
    from saetui.tui.model import parse_density_range

    assert parse_density_range("") == (None, None)
    assert parse_density_range("1e-4..0.01") == (1e-4, 0.01)
    assert parse_density_range("0.1%..5%") == pytest.approx((0.001, 0.05))
    assert parse_density_range("..1e-3") == (None, 1e-3)
    assert parse_density_range("0.5") == (0.5, None)
    for bad in ("a..b", "0.2..0.1", "2..3", "1..2..3"):
        with pytest.raises(SaetuiInputError):
            parse_density_range(bad)


def test_density_filter_box_and_user_key_bindings(index_copy, tmp_path):
    from saetui.tui.bindings import load_keymap

    keys = tmp_path / "keys.json"
    keys.write_text('{"table.sort": "o", "table.density": "D"}')
    assert load_keymap(keys) == {"table.sort": "o", "table.density": "D"}
    (tmp_path / "bad.json").write_text('{"table.nope": "z"}')
    with pytest.raises(SaetuiInputError, match=re.escape("unknown binding ids table.nope")):
        load_keymap(tmp_path / "bad.json")

    async def flow():
        app = make_app(index_copy, keys_path=keys)
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(FeatureTable)
            await wait_for(pilot, lambda: all_rows_shown(app, table))
            table.focus()
            await pilot.press("s")  # rebound: s no longer sorts
            await pilot.press("o")
            await wait_for(pilot, lambda: table.query_state.sort == "label")
            await pilot.press("D", *"0.05..", "enter")
            await wait_for(pilot, lambda: table.query_state.density_min == 0.05)
            await wait_for(pilot, lambda: table.total is not None and table.current_row)
            assert 0 < table.total < app.run_state.d_sae
            assert table.current_row.density >= 0.05
            assert app.focused is table and not app.query_one("#density").display
            await pilot.press("D", *"x..y", "enter")  # a message, the range stays
            await pilot.pause(0.2)
            assert table.query_state.density_min == 0.05
            await pilot.press("escape")
            assert app.focused is table
            await pilot.press("D", "ctrl+u", "enter")  # empty clears
            await wait_for(pilot, lambda: table.query_state.density_min is None)
            await wait_for(pilot, lambda: all_rows_shown(app, table))

    asyncio.run(flow())


def test_binding_ids_are_unique_and_scoped():
    ids = [entry.id for entry in REGISTRY]
    assert len(ids) == len(set(ids))
    for scope in ("app", "table", "feature", "context", "probe"):
        assert any(entry.scope == scope for entry in REGISTRY)
    keys = {entry.key for entry in REGISTRY if entry.scope == "app"}
    assert {"q", "question_mark", "slash", "b,backspace", "f"} <= keys


def test_search_open_related_back_forward(index_copy):
    async def flow():
        app = make_app(index_copy)
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(FeatureTable)
            await wait_for(pilot, lambda: all_rows_shown(app, table))
            # search by token text: features whose top examples fire on "the"
            await pilot.press("slash", *"the", "enter")
            await wait_for(pilot, lambda: table.total is not None and table.current_row)
            assert 0 < table.total < app.run_state.d_sae
            first = table.current_row.feature
            await pilot.press("enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == first)
            assert app.query_one("TabbedContent").active == "feature"
            assert any("the" in token.lower() for token, _ in view.detail.top_tokens)
            # walk down to the first related feature (decoder-cosine neighbours) and open it
            related = next(
                i for i, t in enumerate(view.targets) if t is not None and t.kind == "feature"
            )
            view.highlighted = related
            neighbour = view.targets[related].feature
            await pilot.press("enter")
            await wait_for(pilot, lambda: view.detail.row.feature == neighbour)
            await pilot.press("b")
            await wait_for(pilot, lambda: view.detail.row.feature == first)
            await pilot.press("f")
            await wait_for(pilot, lambda: view.detail.row.feature == neighbour)
            # a feature id in the search box opens it directly
            await pilot.press("slash", *"#3", "enter")  # the box selects its old text
            await wait_for(pilot, lambda: view.detail.row.feature == 3)

    asyncio.run(flow())


def test_context_view_lists_features_at_token_and_opens_one(index_copy):
    async def flow():
        app = make_app(index_copy)
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(FeatureTable)
            await wait_for(pilot, lambda: table.current_row is not None)
            await pilot.press("s")  # sort by label, then density
            await pilot.press("s")
            await wait_for(pilot, lambda: table.current_row and table.current_row.count > 0)
            feature = table.current_row.feature
            await pilot.press("enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == feature)
            assert view.current_target.kind == "context"
            context = view.current_target.context
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, ContextScreen))
            screen = app.screen
            await wait_for(pilot, lambda: screen.active)
            # the marked token is where this feature fired: it is among the active features
            assert feature in [entry.feature for entry in screen.active]
            value = next(e.value for e in screen.active if e.feature == feature)
            assert value == pytest.approx(context.value, rel=1e-3)
            await pilot.press("l")
            await pilot.press("j")
            await wait_for(pilot, lambda: len(screen.active) > 1)
            target = screen.active[1].feature
            await pilot.press("enter")
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == target)
            assert not isinstance(app.screen, ContextScreen)

    asyncio.run(flow())


def test_probe_runs_model_and_opens_top_feature(index_copy, collected, embedded_model):
    from saetui.analysis.probe import ProbeInputs
    from saetui.sae import load_sae

    sae = load_sae(collected[1])
    loads = []

    def loader():
        loads.append(1)
        return ProbeInputs(embedded_model, sae, HOOK)

    async def flow():
        app = make_app(index_copy, model_loader=loader)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            pane = app.query_one(ProbePane)
            await wait_for(pilot, lambda: app.focused and app.focused.id == "probe-input")
            await pilot.press(*"def main():", "enter")
            await wait_for(pilot, lambda: pane.result is not None, timeout=60)
            assert pane.result.tokens and pane.result.ranked
            top = pane.result.ranked[0].feature
            await pilot.press("t")  # to the ranked list
            await pilot.press("enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == top)
            # with the model loaded, the feature view shows logit effects
            assert view.detail.promoted and view.detail.suppressed
            await pilot.press("4", "i")  # i edits the text, selected: typing replaces it
            await wait_for(pilot, lambda: app.focused and app.focused.id == "probe-input")
            await pilot.press(*"x = 1", "enter")
            await wait_for(pilot, lambda: pane.result.text == "x = 1", timeout=60)
            assert len(loads) == 1  # the model loads once

    asyncio.run(flow())


def test_probe_reports_a_model_that_cannot_load(index_copy):
    def loader():
        raise SaetuiInputError("Model nowhere could not be loaded; give a local directory.")

    async def flow():
        app = make_app(index_copy, model_loader=loader)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("4")
            await wait_for(pilot, lambda: app.focused and app.focused.id == "probe-input")
            await pilot.press(*"hello", "enter")
            status = app.query_one("#probe-status")
            await wait_for(pilot, lambda: "probe failed" in str(status.render()))
            assert "could not be loaded" in str(status.render())

    asyncio.run(flow())


def test_label_and_bookmark_persist_across_restart(index_copy):
    async def edit():
        app = make_app(index_copy)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("slash", *"#5", "enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == 5)
            await pilot.press("e")
            await pilot.press(*"python keywords", "enter")
            await wait_for(pilot, lambda: view.detail.row.label == "python keywords")
            await pilot.press("m")
            await wait_for(pilot, lambda: view.detail.row.bookmarked)
            await pilot.press("q")

    async def reopen():
        app = make_app(index_copy)
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(FeatureTable)
            await wait_for(pilot, lambda: table.row_at(5) is not None)
            assert table.row_at(5).label == "python keywords"
            assert table.row_at(5).bookmarked
            await pilot.press("slash", *"keywords", "enter")
            await wait_for(pilot, lambda: table.total == 1 and table.current_row)
            assert table.current_row.feature == 5
            await pilot.press("escape")
            table.apply_query(table.query_state.__class__(filter="bookmarked"))
            await wait_for(pilot, lambda: table.total == 1 and table.current_row)
            assert table.current_row.feature == 5

    asyncio.run(edit())
    asyncio.run(reopen())


def test_bad_states_are_messages_not_crashes(index_copy, tmp_path):
    with pytest.raises(SaetuiInputError, match="does not exist"):
        run_app(tmp_path / "missing")

    async def out_of_range():
        app = make_app(index_copy)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("slash", *"#999999", "enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: "out of range" in view.line_text(0))
            await pilot.press("b")  # still responsive
            await pilot.press("question_mark")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "HelpScreen")
            await pilot.press("escape")
            await pilot.resize_terminal(60, 18)
            await pilot.pause(0.2)
            await pilot.resize_terminal(120, 40)

    asyncio.run(out_of_range())

    not_an_index = tmp_path / "not-an-index"
    not_an_index.mkdir()
    (not_an_index / "saetui-index.json").write_text("{broken")

    async def damaged():
        app = make_app(not_an_index)
        async with app.run_test(size=SIZE) as pilot:
            status = app.query_one("#status-line")
            await wait_for(pilot, lambda: "damaged" in str(status.render()))

    asyncio.run(damaged())


def test_live_refresh_keeps_cursor_while_a_writer_commits(tmp_path):
    """A writer commits windows while the app shows the table and a feature: the token count
    grows, rows update, the cursor, focus and highlighted row stay where they were."""
    from saetui.index.synthetic import SyntheticCorpus
    from saetui.index.writer import IndexWriter

    corpus = SyntheticCorpus(d_sae=256, ctx_len=32)
    path = tmp_path / "index"
    writer = IndexWriter.create_or_resume(
        path,
        {"model": "synthetic"},
        corpus.d_sae,
        corpus.ctx_len,
        corpus.vocab(),
        commit_interval=0.05,
        checkpoint_interval=0.0,
    )
    try:
        writer.add_windows(**corpus.windows(0, 20))
        writer.checkpoint()
        writer.flush()

        async def flow():
            app = make_app(path)
            async with app.run_test(size=SIZE) as pilot:
                table = app.query_one(FeatureTable)
                await wait_for(pilot, lambda: table.current_row is not None)
                before = app.run_state.tokens
                for _ in range(7):
                    await pilot.press("j")
                table.focus()
                assert table.cursor == 7
                count_before = table.current_row.count

                def write_more() -> None:
                    writer.add_windows(**corpus.windows(20, 40))
                    writer.checkpoint()
                    writer.flush()

                thread = threading.Thread(target=write_more)
                thread.start()
                while thread.is_alive():
                    await pilot.pause(0.05)
                thread.join()
                await wait_for(pilot, lambda: app.run_state.tokens > before)
                await wait_for(pilot, lambda: table.current_row.count > count_before)
                assert table.cursor == 7
                assert app.focused is table
                # now the feature view: highlighted row survives the next refresh
                await pilot.press("enter")
                view = app.query_one(FeatureView)
                await wait_for(pilot, lambda: view.detail is not None)
                await pilot.press("j", "j")
                highlighted = view.highlighted
                tokens = app.run_state.tokens
                thread = threading.Thread(
                    target=lambda: (
                        writer.add_windows(**corpus.windows(60, 10)),
                        writer.checkpoint(),
                        writer.flush(),
                    )
                )
                thread.start()
                while thread.is_alive():
                    await pilot.pause(0.05)
                await wait_for(pilot, lambda: app.run_state.tokens > tokens)
                await pilot.pause(0.5)
                assert view.highlighted == highlighted
                assert app.focused is view

        asyncio.run(flow())
    finally:
        writer.close()


# ---------------------------------------------------------------------- researcher's walk


def test_units_references_and_cards_read_the_same_everywhere():
    from saetui.tui.render import feature_ref, format_density
    from saetui.tui.widgets.run_pane import _card

    # one unit, percent, at every scale
    assert [format_density(d) for d in (0.015, 0.0099, 0.01, 0.41, 1.2e-5, 0.0)] == [
        "1.5%", "0.99%", "1.0%", "41%", "0.0012%", "dead",
    ]  # fmt: skip
    # a feature reference: id, score, label, else its top tokens
    assert feature_ref(7, "python keywords", "' def'", 0.5).plain.split() == [
        "#7", "0.500", "python", "keywords",
    ]  # fmt: skip
    unlabelled = feature_ref(7, "", "' def' ' class'", 0.5)
    assert "' def' ' class'" in unlabelled.plain and unlabelled.spans[-1].style.dim
    # a metric card keeps title and value on their own lines
    assert _card("CE recovered", "0.9921").plain == "CE recovered\n0.9921"


def test_feature_references_back_to_the_same_row_and_steps_in_table_order(index_copy):
    async def flow():
        app = make_app(index_copy)
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.query_one(FeatureTable)
            await wait_for(pilot, lambda: all_rows_shown(app, table))
            await pilot.press("s", "s")  # density, descending
            await wait_for(pilot, lambda: table.query_state.sort == "density")
            await wait_for(pilot, lambda: table.current_row and table.current_row.count > 0)
            first = table.current_row.feature
            await pilot.press("enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == first)
            # neighbour rows name features by label or top tokens, never a bare id
            rows = [
                view.line_text(i)
                for i, t in enumerate(view.targets)
                if t is not None and t.kind == "feature"
            ]
            assert rows and all(len(row.split()) >= 3 for row in rows)
            # walk far down, open a neighbour, come back: same row, same scroll
            related = max(
                i for i, t in enumerate(view.targets) if t is not None and t.kind == "feature"
            )
            view.highlighted = related
            scroll = view.scroll_y
            target = view.targets[related].feature
            await pilot.press("enter")
            await wait_for(pilot, lambda: view.detail.row.feature == target)
            assert view.highlighted != related or view.scroll_y != scroll
            await pilot.press("b")
            await wait_for(
                pilot,
                lambda: (
                    view.detail.row.feature == first
                    and view.highlighted == related
                    and abs(view.scroll_y - scroll) <= 1
                ),
            )
            height = view.scrollable_content_region.height
            assert view.scroll_y <= related < view.scroll_y + height  # and it is in view
            # n/N follow the table's order (density, descending) and stop at its top
            await pilot.press("N")
            await pilot.pause(0.5)
            assert view.detail.row.feature == first  # already the first row
            await pilot.press("n")
            await wait_for(pilot, lambda: view.detail.row.feature != first)
            second = int(app.source.reader.features(sort="density", page_size=2).feature[1])
            assert view.detail.row.feature == second
            # tab walks the panes, whatever has focus
            await pilot.press("tab")
            assert app.query_one("TabbedContent").active == "probe"
            await pilot.press("tab", "tab")
            assert app.query_one("TabbedContent").active == "features"
            assert app.focused is table

    asyncio.run(flow())


def test_search_words_raw_tokens_patterns_and_id_jumps(index_copy, tmp_path):
    from saetui.tui.source import IndexSource
    from saetui.tui.widgets.feature_table import format_header

    source = IndexSource(index_copy)
    try:
        vocab = source.reader.vocab
        word = source.search_ids("the")
        raw = source.search_ids('" the"')
        pattern = source.search_ids("*the*")
        assert word and raw and set(raw) <= set(word) <= set(pattern)
        # a word matches whole tokens: "in" does not find features of " inside"
        hits = source.reader.search_tokens("in", limit=5000)
        assert all(any(t.strip().lower() == "in" for t in h.tokens) for h in hits)
        assert " the" in vocab
    finally:
        source.close()

    async def flow():
        app = make_app(index_copy)
        async with app.run_test(size=(100, 30)) as pilot:
            table = app.query_one(FeatureTable)
            await wait_for(pilot, lambda: all_rows_shown(app, table))
            await pilot.press("slash", *"the", "enter")
            await wait_for(pilot, lambda: table.total == len(word) and table.current_row)
            assert format_header(100, table.query_state).split()[0] == "best↓"
            # a feature id jumps to it and clears the text filter
            await pilot.press("slash", "ctrl+u", *"#3", "enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == 3)
            assert table.query_state.search == ""
            # the table export asks where, and writes the table's rows there
            await pilot.press("2", "slash", "ctrl+u", *"the", "enter")
            await wait_for(pilot, lambda: table.total == len(word))
            app.export_table()
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "PathScreen")
            await pilot.press("ctrl+u", *str(tmp_path / "rows.json"), "enter")
            await wait_for(pilot, lambda: (tmp_path / "rows.json").exists())
        rows = __import__("json").loads((tmp_path / "rows.json").read_text())
        assert [row["feature"] for row in rows] == word

    asyncio.run(flow())


def test_probe_keeps_its_result_in_focus_and_shades_text_by_one_feature(
    index_copy, collected, embedded_model
):
    from saetui.analysis.probe import ProbeInputs
    from saetui.sae import load_sae

    sae = load_sae(collected[1])

    async def flow():
        app = make_app(index_copy, model_loader=lambda: ProbeInputs(embedded_model, sae, HOOK))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("4")
            pane = app.query_one(ProbePane)
            await wait_for(pilot, lambda: app.focused and app.focused.id == "probe-input")
            await pilot.press(*"def main():", "enter")
            await wait_for(pilot, lambda: pane.result is not None, timeout=60)
            await pilot.press("2", "4")  # back on the probe: the text box is not focused
            assert app.focused.id == "probe-tokens"
            await pilot.press("j", "t", "l")
            assert pane.query_one("#probe-input").value == "def main():"
            # s on the ranked list's feature shades the text by that one feature
            feature = pane.result.ranked[0].feature
            ranked = pane.query_one("#probe-ranked")
            ranked.focus()
            ranked.highlighted = 0
            await pilot.press("s")
            await wait_for(pilot, lambda: pane.result.focus == feature, timeout=60)
            strip = pane.query_one("#probe-tokens")
            assert strip.values == pane.result.focus_values
            assert max(strip.values) == pytest.approx(pane.result.ranked[0].max_value, rel=1e-5)
            # P in the feature view opens the probe shading by that feature
            await pilot.press("slash", "ctrl+u", *"#5", "enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == 5)
            await pilot.press("P")
            await wait_for(pilot, lambda: pane.result.focus == 5, timeout=60)
            assert app.query_one("TabbedContent").active == "probe"

    asyncio.run(flow())


def test_open_refuses_non_index_and_opens_onto_a_feature(index_copy, tmp_path):
    import subprocess
    import sys

    (tmp_path / "plain").mkdir()
    for args, words in (
        ([str(tmp_path / "plain")], "is not a saetui index"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(index_copy), "--feature", "99999"], "out of range"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "saetui", "open", *args], capture_output=True, text=True
        )
        assert (
            result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
        )

    async def flow():
        app = SaetuiApp(index_copy, watch_terminal=False, feature=7)
        async with app.run_test(size=(80, 24)) as pilot:
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == 7)
            await pilot.press("y")
            await wait_for(pilot, lambda: "--feature 7" in app.clipboard)
            assert "--feature 7" in app.clipboard and str(index_copy.resolve()) in app.clipboard

    asyncio.run(flow())


def test_ablation_from_the_feature_view_shows_each_contexts_loss_change(
    index_copy, collected, embedded_model
):
    from saetui.analysis.causal import ablate
    from saetui.analysis.probe import ProbeInputs
    from saetui.sae import load_sae

    sae = load_sae(collected[1])

    async def flow():
        app = make_app(index_copy, model_loader=lambda: ProbeInputs(embedded_model, sae, HOOK))
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.query_one(FeatureTable)
            await wait_for(pilot, lambda: all_rows_shown(app, table))
            await pilot.press("s", "s")  # density: a feature with contexts
            await wait_for(pilot, lambda: table.current_row and table.current_row.count > 0)
            feature = table.current_row.feature
            await pilot.press("enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == feature)
            await pilot.press("a")
            await wait_for(pilot, lambda: len(view.ablations) == 10, timeout=120)
            row = next(i for i, t in enumerate(view.targets) if t and t.kind == "context")
            assert "Δ" in view.line_text(row)
            # the value shown is the ablation of that context, recomputed here directly
            context = view.targets[row].context
            example = app.source.reader.top_examples(feature, 1)[0]
            assert (context.window, context.window_position) == (example.window, example.position)
            ids = example.token_ids[: example.position + 2].tolist()
            direct = ablate(embedded_model, sae, HOOK, ids, feature)
            delta = view.ablations[(example.window, example.position)]
            assert delta == pytest.approx(direct.delta_loss[example.position], abs=1e-4)
            assert app.source.cached_ablation(feature, (example.window, example.position))
            # and what it did at each firing token: the logits it moved, by name
            effect_rows = [
                view.line_text(i)
                for i in range(view.option_count)
                if view.line_text(i).lstrip().startswith("Δ") and "→" in view.line_text(i)
            ]
            assert len(effect_rows) == 10

    asyncio.run(flow())


def test_probe_steers_a_generation_beside_the_unsteered_one(index_copy, collected, embedded_model):
    from saetui.analysis.probe import ProbeInputs
    from saetui.sae import load_sae

    sae = load_sae(collected[1])

    async def flow():
        app = make_app(index_copy, model_loader=lambda: ProbeInputs(embedded_model, sae, HOOK))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("4")
            pane = app.query_one(ProbePane)
            await wait_for(pilot, lambda: app.focused and app.focused.id == "probe-input")
            await pilot.press(*"def main():", "enter")
            await wait_for(pilot, lambda: pane.result is not None, timeout=60)
            await pilot.press("g")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "PathScreen")
            feature = pane.result.ranked[0].feature
            await pilot.press("ctrl+u", *f"#{feature} x40 tokens=6", "enter")
            await wait_for(pilot, lambda: pane.steering is not None, timeout=120)
            assert len(pane.steering.steered) == len(pane.steering.unsteered) == 6
            assert pane.steering.features == {feature: 40.0}
            shown = str(pane.query_one("#probe-steer").render())
            assert "steered" in shown and "unsteered" in shown

    asyncio.run(flow())


def test_imported_scores_sort_the_table_and_head_the_feature_view(index_copy):
    from saetui.export.scores import store_feature_scores
    from saetui.index import open_index

    with open_index(index_copy) as index:
        store_feature_scores(index, {4: {"detection": 0.9, "fuzz": 0.7}, 9: {"detection": 0.95}})

    async def flow():
        app = make_app(index_copy)
        async with app.run_test(size=(100, 30)) as pilot:
            table = app.query_one(FeatureTable)
            await wait_for(pilot, lambda: all_rows_shown(app, table))
            table.apply_query(table.query_state.__class__(sort="score", descending=True))
            await wait_for(pilot, lambda: table.current_row and table.current_row.feature == 9)
            assert table.row_at(1).feature == 4 and table.row_at(1).score == pytest.approx(0.8)
            await pilot.press("enter")
            view = app.query_one(FeatureView)
            await wait_for(pilot, lambda: view.detail and view.detail.row.feature == 9)
            assert "explanation score 0.95" in str(app.query_one("#feature-header").render())

    asyncio.run(flow())
