"""Benchmark of the TUI on the index benchmark's synthetic index (no model).

Builds (or reuses, with --path) the index with benchmarks/bench_index.py's builder, then
drives the real app headless (Textual's Pilot) and reports:

- import: seconds to import the app module (part of a cold launch);
- first paint: app start until the feature table shows its first page of rows;
- feature switch: open a feature until its view is filled (p50 / p99 over random ids);
- table scroll: PageDown until the rows under the cursor are loaded (p50 / p99).

    .venv/bin/python benchmarks/bench_tui.py                        # 10M tokens, d_sae 65536
    .venv/bin/python benchmarks/bench_tui.py --tokens 1000000 --path /tmp/tui-bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGETS_MS = {"first_paint": 1500.0, "feature_switch_p99": 100.0}


def build_index(root: Path, tokens: int, d_sae: int) -> Path:
    path = root / "index"
    if (path / "saetui-index.json").exists():
        return path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_index  # the index issue's builder

    bench_index.main(
        [
            "--tokens",
            str(tokens),
            "--d-sae",
            str(d_sae),
            "--path",
            str(root),
            "--keep",
            "--queries",
            "5",
        ]
    )
    return path


def percentiles(samples: list[float]) -> dict[str, float]:
    array = np.asarray(samples) * 1000
    return {"p50_ms": float(np.percentile(array, 50)), "p99_ms": float(np.percentile(array, 99))}


async def drive(path: Path, switches: int, scrolls: int) -> dict[str, object]:
    from saetui.tui.app import SaetuiApp

    started = time.perf_counter()
    app = SaetuiApp(path, watch_terminal=False)
    figures: dict[str, object] = {}
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one("FeatureTable")
        while table.current_row is None:
            if table.error:  # e.g. an index written by an older format: fail, never hang
                raise SystemExit(f"the table cannot load: {table.error}")
            await asyncio.sleep(0.002)
        figures["first_paint_ms"] = (time.perf_counter() - started) * 1000
        while app.run_state is None:
            await asyncio.sleep(0.01)
        d_sae = app.run_state.d_sae
        view = app.query_one("FeatureView")
        rng = np.random.default_rng(0)
        samples = []
        for feature in rng.integers(0, d_sae, switches).tolist():
            t0 = time.perf_counter()
            app.open_feature(int(feature))
            while view.detail is None or view.detail.row.feature != feature:
                await asyncio.sleep(0.001)
            # count in painting the rows on screen (what the next refresh draws)
            view.render_lines(view.region.reset_offset)
            samples.append(time.perf_counter() - t0)
        figures["feature_switch"] = percentiles(samples)
        await pilot.press("2")
        table.focus()
        scroll = []
        await pilot.pause()
        for _ in range(scrolls):
            t0 = time.perf_counter()
            table.action_page_down()
            while table.current_row is None:
                await asyncio.sleep(0.001)
            table.render_lines(table.region.reset_offset)  # paint the rows once
            scroll.append(time.perf_counter() - t0)
        figures["table_pagedown"] = percentiles(scroll)
        t0 = time.perf_counter()
        table.action_cursor_bottom()
        while table.current_row is None:
            await asyncio.sleep(0.001)
        figures["table_jump_to_end_ms"] = (time.perf_counter() - t0) * 1000
    return figures


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--path", type=Path, default=Path("/tmp/saetui-tui-bench"))
    parser.add_argument("--switches", type=int, default=40)
    parser.add_argument("--scrolls", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.path.mkdir(parents=True, exist_ok=True)
    index = build_index(args.path, args.tokens, args.d_sae)
    code = "import time; t=time.perf_counter(); import saetui.tui.app; print(time.perf_counter()-t)"
    import_s = float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )
    figures = asyncio.run(drive(index, args.switches, args.scrolls))
    figures["import_ms"] = import_s * 1000
    figures["index"] = str(index)
    print(f"index               {index}")
    print(f"import app          {figures['import_ms']:.0f} ms")
    print(
        f"first paint         {figures['first_paint_ms']:.0f} ms (after import; target "
        f"{TARGETS_MS['first_paint']:.0f} ms for import + paint)"
    )
    switch = figures["feature_switch"]
    print(
        f"feature switch      p50 {switch['p50_ms']:.1f} ms  p99 {switch['p99_ms']:.1f} ms "
        f"(target p99 {TARGETS_MS['feature_switch_p99']:.0f} ms)"
    )
    scroll = figures["table_pagedown"]
    print(f"table PageDown      p50 {scroll['p50_ms']:.1f} ms  p99 {scroll['p99_ms']:.1f} ms")
    print(f"table jump to end   {figures['table_jump_to_end_ms']:.1f} ms")
    if args.json:
        print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
