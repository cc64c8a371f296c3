"""Every metric users see says whose definition it follows: the headless summary and the
TUI's metric cards over a real collected index."""

from __future__ import annotations

import asyncio
import shutil

from saetui.collect.headless import format_metrics
from saetui.index import open_index
from saetui.tui.app import SaetuiApp


def _metrics(tiny_index):
    with open_index(tiny_index[2]) as index:
        return index.metrics()


def test_headless_summary_labels_each_family(tiny_index):
    metrics = _metrics(tiny_index)
    lines = format_metrics(metrics)
    text = "\n".join(lines)
    saetui_at = text.index("saetui (its own definitions")
    saelens_at = text.index("SAELens / SAEBench (computed as their evals.py computes them)")
    assert saetui_at < saelens_at
    ours = f"{metrics['explained_variance']:.4f}"
    theirs = f"{metrics['saelens']['explained_variance']:.4f}"
    ev_lines = [line for line in lines if "explained" in line and "legacy" not in line]
    assert ours in ev_lines[0] and text.index(ev_lines[0]) < saelens_at
    assert theirs in ev_lines[1] and text.index(ev_lines[1]) > saelens_at
    sample = metrics["ce_sample"]
    assert f"{sample['windows']:,} of {sample['of_windows']:,} windows" in text
    assert "model in float32, SAE encoding in float32" in text


def test_run_pane_cards_name_the_family_of_each_value(tiny_index, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(tiny_index[2], index)
    metrics = _metrics(tiny_index)
    app = SaetuiApp(index, watch_terminal=False)
    cards: dict[str, str] = {}

    async def run() -> None:
        async with app.run_test(size=(100, 32)) as pilot:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while loop.time() < deadline:
                await pilot.pause(0.1)
                texts = [str(card.render()) for card in app.query(".card")]
                # a card is its title, a line break, then its value
                cards.update(dict(t.split("\n", 1) for t in texts if "\n" in t))
                if cards.get("EV SAELens", "–") != "–":
                    break
            await pilot.press("q")

    asyncio.run(run())
    assert cards["EV saetui"] == f"{metrics['explained_variance']:.3g}"
    assert cards["EV SAELens"] == f"{metrics['saelens']['explained_variance']:.3g}"
    assert cards["CE SAELens"] == f"{metrics['saelens']['ce_loss_score']:.3g}"
    assert cards["KL saetui"] == f"{metrics['kl_clean_sae']:.3g}"
