"""The compare screen over two synthetic indexes of the same windows (tests/test_compare.py's
width-doubled pair: B's features 2i and 2i+1 split A's feature i)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from saetui.tui.app import SaetuiApp
from saetui.tui.screens.compare import CompareScreen, SideFeatureScreen
from saetui.tui.widgets.side_preview import SidePreview
from tests.test_compare import D_IN, D_SMALL, _sae_dir, _split_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(index A, index B), each naming its SAE directory in its run config."""
    root = tmp_path_factory.mktemp("compare-tui")
    gen = torch.Generator().manual_seed(3)  # the decoders _split_pair draws
    w_a = torch.randn(D_SMALL, D_IN, generator=gen)
    w_b = w_a.repeat_interleave(2, dim=0) + 0.4 * torch.randn(2 * D_SMALL, D_IN, generator=gen)
    dirs = _sae_dir(root / "sae-a", w_a), _sae_dir(root / "sae-b", w_b)
    _, _, (path_a, path_b) = _split_pair(root, sae_dirs=dirs)
    return path_a, path_b


async def wait_for(pilot, condition, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await pilot.pause(0.05)


async def compared(pilot) -> CompareScreen:
    """Wait until the compare screen shows its result and both previews."""
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, CompareScreen))
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen.comparison is not None or screen.error is not None)
    assert screen.error is None
    await wait_for(pilot, lambda: all(p.contexts for p in screen.query(SidePreview)))
    return screen


def preview(screen: CompareScreen, side: str) -> SidePreview:
    return screen.query_one(f"#preview-{side}", SidePreview)


def test_pairs_sort_splits_and_open_either_side(pair):
    path_a, path_b = pair

    async def flow():
        app = SaetuiApp(path_a, watch_terminal=False, compare=path_b)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await compared(pilot)
            assert len(screen.rows) == D_SMALL  # Hungarian: one pair per feature of A
            assert all(p.b // 2 == p.a for p in screen.rows)  # each A feature to a child
            cosines = [p.cosine for p in screen.rows]
            assert cosines == sorted(cosines, reverse=True)
            first = screen.rows[0]
            await wait_for(pilot, lambda: preview(screen, "b").feature == first.b)
            assert preview(screen, "a").feature == first.a
            assert preview(screen, "a").border_title == f"A #{first.a}"
            await pilot.press("s")  # Jaccard, highest first; the pair under the cursor stays
            assert screen.sort == "jaccard" and screen.current_pair == first
            jaccard = [p.jaccard for p in screen.rows]
            assert jaccard == sorted(jaccard, reverse=True)
            await pilot.press("s", "S")  # density change, lowest first
            changes = [p.density_change for p in screen.rows if p.density_change is not None]
            assert screen.sort == "density" and changes == sorted(changes)
            # Enter opens the chosen side (h: A, l: B) in a full feature view; esc comes back
            await pilot.press("l", "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, SideFeatureScreen))
            side_view = app.screen
            await wait_for(pilot, lambda: side_view.query_one("SideFeatureView").detail)
            assert side_view.side == "B" and side_view.feature == screen.current_pair.b
            assert side_view.source.path == path_b
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is screen)
            # the split trees: parent A #p with children B #2p and #2p+1
            await pilot.press("t")
            tree = screen.query_one("Tree")
            assert tree.display and screen.mode == "splits"
            parents = tree.root.children
            assert len(parents) == len(screen.comparison.splits) > D_SMALL // 2
            split = parents[0].data["split"]
            assert {c.feature for c in split.children} == {2 * split.parent, 2 * split.parent + 1}
            assert split.parent_covered == 1.0
            await pilot.press("j")  # the first parent
            await wait_for(pilot, lambda: preview(screen, "a").feature == split.parent)
            await pilot.press("space", "j")  # expand it, then its first child
            child = split.children[0].feature
            await wait_for(pilot, lambda: preview(screen, "b").feature == child)
            await pilot.press("enter")  # side B is still the chosen one
            await wait_for(pilot, lambda: isinstance(app.screen, SideFeatureScreen))
            assert app.screen.feature == child
            await pilot.press("escape", "escape")  # back to the comparison, then the app
            await wait_for(pilot, lambda: not isinstance(app.screen, CompareScreen))
            await pilot.press("C")  # the same screen again, as it was left
            await wait_for(pilot, lambda: app.screen is screen)
            assert screen.mode == "splits"

    asyncio.run(flow())


def test_split_tree_shows_where_the_parent_fires_without_children(tmp_path):
    """From window 30 on, A's feature 16 fires with no child in B: its tree's last row
    shows those tokens on A's side, shaded by the parent."""
    gen = torch.Generator().manual_seed(3)
    w_a = torch.randn(D_SMALL, D_IN, generator=gen)
    w_b = w_a.repeat_interleave(2, dim=0) + 0.4 * torch.randn(2 * D_SMALL, D_IN, generator=gen)
    dirs = _sae_dir(tmp_path / "sa", w_a), _sae_dir(tmp_path / "sb", w_b)
    _, _, (path_a, path_b) = _split_pair(tmp_path, sae_dirs=dirs, absorbed=16)

    async def flow():
        app = SaetuiApp(path_a, watch_terminal=False, compare=path_b)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = await compared(pilot)
            await pilot.press("t")
            tree = screen.query_one("Tree")
            node = next(n for n in tree.root.children if n.data["split"].parent == 16)
            split = node.data["split"]
            assert 0.2 < split.parent_covered < 0.8 and len(split.parent_only) == 5
            node.expand()
            await pilot.pause(0.1)
            tree.move_cursor(node.children[-1])
            shown = preview(screen, "a")
            await wait_for(pilot, lambda: len(shown.contexts) == 5)
            assert shown.border_title == "A · parent only" and shown.feature is None
            assert all(c.window >= 30 and c.value > 0 for c in shown.contexts)
            other = preview(screen, "b")
            await wait_for(pilot, lambda: other.border_title == "B · children only")
            assert other.contexts == []  # no child fires without the parent

    asyncio.run(flow())


def test_indexes_of_other_windows_are_a_message(tmp_path):
    gen = torch.Generator().manual_seed(3)
    w_a = torch.randn(D_SMALL, D_IN, generator=gen)
    dirs = _sae_dir(tmp_path / "sa", w_a), _sae_dir(tmp_path / "sb", w_a.repeat(2, 1))
    _, _, (path_a, path_b) = _split_pair(tmp_path, sae_dirs=dirs, seed_b=1)

    async def flow():
        app = SaetuiApp(path_a, watch_terminal=False, compare=path_b)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen))
            screen = app.screen
            await wait_for(pilot, lambda: screen.error is not None)
            assert "same corpus windows" in screen.error
            await pilot.press("s", "t", "enter")  # nothing to sort, toggle or open: no crash
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, CompareScreen))

    asyncio.run(flow())


def test_without_a_second_index_the_key_explains(pair):
    async def flow():
        app = SaetuiApp(pair[0], watch_terminal=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("C")
            await pilot.pause(0.2)
            assert not isinstance(app.screen, CompareScreen)

    asyncio.run(flow())


def test_snapshot_compare_80x24(snap_compare, pair, monkeypatch):
    """Opened by relative paths, as typed, so the title is stable."""
    monkeypatch.chdir(pair[0].parent)

    async def run_before(pilot) -> None:
        await compared(pilot)
        await pilot.pause(0.3)

    app = SaetuiApp(Path(pair[0].name), watch_terminal=False, compare=Path(pair[1].name))
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
