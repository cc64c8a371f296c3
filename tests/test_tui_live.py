"""The TUI while a real collector fills the index: pause, resume, quit in every phase,
and a seeded stress of start / pause / resume / quit cycles with both cores busy. The
collector is the real child process over a real model; nothing may hang, no thread or
process may outlive the app, and the index must end equal to an uninterrupted run."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import random_relu_sae, tiny_collect_config
from textual.widgets import ProgressBar

from saetui.collect.inputs import RunInputs
from saetui.collect.pipeline import CollectConfig, run_collection
from saetui.index import open_index
from saetui.tui.actions.run import POLL_SECONDS
from saetui.tui.app import SaetuiApp

SIZE = (80, 24)


async def wait_for(pilot, condition, timeout: float = 60.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await pilot.pause(0.05)


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t is not threading.main_thread()}


def _run_app(app: SaetuiApp, flow, timeout: float) -> None:
    """Drive ``app`` with ``flow(pilot)`` under a watchdog, then shut it down as run_app
    does and check that it left no thread and no child process behind."""
    before = _threads()

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            try:
                await asyncio.wait_for(flow(pilot), timeout)
            except asyncio.TimeoutError:
                job = app.job
                raise AssertionError(
                    f"the flow did not end within {timeout} s: progress {app._progress}, "
                    f"collecting {app.collecting}, outcome {app.outcome}, error "
                    f"{app.collection_error}, child {job and job.pid} exit "
                    f"{job and job.exit_code}, log {job and job.log_path}"
                ) from None

    asyncio.run(main())
    app.shutdown()
    job = app.job
    assert job is None or job._proc is None or job.exit_code is not None, "collector outlived app"
    assert job is None or job._proc is None or job._proc.poll() is not None
    assert _threads() <= before, f"threads left behind: {_threads() - before}"


def test_pause_resume_finish_then_quit(tmp_path, tiny_gpt2_dir, tiny_sae_dir):
    from conftest import tiny_documents

    corpus = tmp_path / "corpus.json"
    corpus.write_text(__import__("json").dumps(tiny_documents(3000, seed=4)))
    config = tiny_collect_config(tmp_path / "index", tiny_gpt2_dir, tiny_sae_dir, corpus)
    app = SaetuiApp(tmp_path / "index", collect=config, watch_terminal=False)

    async def flow(pilot) -> None:
        assert app.query_one("TabbedContent").active == "run"
        await wait_for(pilot, lambda: getattr(app._progress, "phase", "") == "collecting")
        await pilot.press("2", "1")  # the UI answers while the child collects
        await pilot.press("p")
        await wait_for(pilot, lambda: not app.collecting, what="pause")
        assert app.paused and app.outcome[1] == "stopped"
        await wait_for(pilot, lambda: app.run_state is not None and app.run_state.tokens > 0)
        assert not app.run_state.finished
        # while paused the bar keeps the share of the run collected (it fell back to 0 %)
        bar = app.query_one(ProgressBar)
        await pilot.pause(3 * POLL_SECONDS)  # the index polls redraw the pane meanwhile
        assert bar.total == app.collection.last_total and bar.progress == app.run_state.tokens
        assert 0 < bar.percentage < 1
        await pilot.press("p")
        await wait_for(
            pilot,
            lambda: app.outcome and app.outcome[1] == "finished",
            120,
            f"finish ({app.outcome}, {app.collection_error}, {app.collecting}, {app.job.log_path})",
        )
        assert app.collection_error is None and not app.paused
        await wait_for(pilot, lambda: app.run_state.finished and not app.collecting)
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None, 30, "exit after q")

    _run_app(app, flow, 180)
    assert app.return_code == 0
    with open_index(tmp_path / "index") as index:
        assert index.progress().finished


@pytest.mark.parametrize("phase", ["loading", "collecting", "metrics"])
def test_quit_stops_the_collector_in_any_phase_with_exit_130(
    phase, tmp_path, tiny_gpt2_dir, tiny_sae_dir
):
    from conftest import tiny_documents

    corpus = tmp_path / "corpus.json"
    corpus.write_text(__import__("json").dumps(tiny_documents(600, seed=5)))
    config = tiny_collect_config(
        tmp_path / "index", tiny_gpt2_dir, tiny_sae_dir, corpus, metrics_tokens=200_000
    )
    app = SaetuiApp(tmp_path / "index", collect=config, watch_terminal=False)

    async def flow(pilot) -> None:
        await wait_for(pilot, lambda: getattr(app._progress, "phase", "") == phase, 120)
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None, 30, "exit after q")

    _run_app(app, flow, 180)
    assert app.return_code == 130
    assert app.outcome is None or app.outcome[2] == phase


# ---------------------------------------------------------------------- stress


@pytest.fixture(scope="module")
def stress_inputs(tmp_path_factory):
    """A random ReLU SAE on the embedded model and the sample corpus, and the index of an
    uninterrupted in-process run to compare against."""
    from saetui.sae import save_sae

    root = tmp_path_factory.mktemp("stress")
    sae_dir = save_sae(random_relu_sae(576, 256, -1.0, 3), root / "sae")
    corpus = Path(__file__).resolve().parent.parent / "sample_data" / "corpus.json"

    def config(out: Path) -> CollectConfig:
        return CollectConfig(
            out=out,
            inputs=RunInputs(
                sae=sae_dir, data=str(corpus), model="smollm2-135m", device="cpu",
                dtype="float32", numerics="raw", ctx_len=64, batch_size=8, max_tokens=12000,
            ),
            metrics_tokens=256,  # the metrics phase is stopped and restarted: keep it short
        )  # fmt: skip

    reference = root / "reference"
    assert run_collection(config(reference)).status == "finished"
    return config, reference


@pytest.mark.timeout(2400)
def test_stress_start_pause_resume_quit_cycles_under_load(tmp_path, stress_inputs, busy_cores):
    """20 seeded cycles, each a fresh app on the same index: wait for a random phase
    (loading, collecting, metrics, neighbours), then pause, resume, switch tabs and quit
    (soft or hard) after random delays, in whatever phase that lands."""
    make_config, reference = stress_inputs
    out = tmp_path / "index"
    rng = random.Random(20261129)
    outcomes = []
    for cycle in range(20):
        app = SaetuiApp(out, collect=make_config(out), watch_terminal=False)
        # the first cycles spread over loading and collecting, so collecting advances a
        # little each time; then three stop in metrics, two in neighbours (the second of
        # those may let it finish), and the last ones reopen whatever is left
        early = ["loading", "collecting", "collecting", "collecting"]
        late = ["metrics"] * 3 + ["neighbours"] * 2 + ["collecting"] * 3
        target = rng.choice(early) if cycle < 12 else late[cycle - 12]
        plan = rng.choice(["quit", "quit-now", "pause-resume-quit", "pause-quit", "tabs-quit"])
        first_delay = rng.uniform(0.0, 4.0 if target == "collecting" else 0.5)
        delays = [first_delay, rng.uniform(0.0, 1.5), rng.uniform(0.0, 1.5)]

        def phase(app=app) -> str:
            return getattr(app._progress, "phase", "")

        async def flow(pilot, target=target, plan=plan, delays=delays, app=app) -> None:
            phases = ["loading", "collecting", "metrics", "neighbours", "done"]
            await wait_for(
                pilot,
                # a restarted metrics phase runs five forward passes per sampled window on
                # two busy cores: minutes, not a hang
                lambda: phase() in phases[phases.index(target) :] or not app.collecting,
                600,
                f"phase {target}",
            )
            await pilot.pause(delays[0])
            if plan == "tabs-quit":
                await pilot.press("2", "j", "j", "enter", "3", "1")
            if plan.startswith("pause"):
                await pilot.press("p")
                await wait_for(pilot, lambda: not app.collecting, 60, "pause")
                await pilot.pause(delays[1])
                if plan == "pause-resume-quit":
                    await pilot.press("p")
                    await pilot.pause(delays[2])
            await pilot.press("q")
            if plan == "quit-now":
                await pilot.press("q")
            await wait_for(pilot, lambda: app.return_code is not None, 60, "exit after q")

        print(f"cycle {cycle}: {target} {plan} {[round(d, 2) for d in delays]}", flush=True)
        _run_app(app, flow, 700)
        landed = app.outcome[2] if app.outcome else phase()
        outcomes.append((cycle, target, plan, app.return_code, landed))
        assert app.return_code in (0, 130), outcomes[-1]
    # then let it finish, and compare with the uninterrupted run
    app = SaetuiApp(out, collect=make_config(out), watch_terminal=False)

    async def finish(pilot) -> None:
        await wait_for(pilot, lambda: app.outcome and app.outcome[1] == "finished", 600)
        await pilot.press("q")

    _run_app(app, finish, 700)
    assert app.return_code == 0, outcomes
    with open_index(out) as resumed, open_index(reference) as whole:
        assert resumed.progress().finished
        assert resumed.progress().tokens == whole.progress().tokens
        a = resumed.features(sort="id", page_size=256)
        b = whole.features(sort="id", page_size=256)
        assert np.array_equal(a.count, b.count) and np.array_equal(a.max, b.max)
        for feature in range(0, 256, 17):
            assert np.array_equal(resumed.stats(feature).histogram, whole.stats(feature).histogram)
            top_a = [e.global_index for e in resumed.top_examples(feature, 10)]
            assert top_a == [e.global_index for e in whole.top_examples(feature, 10)]
            for metric, lists in whole.neighbours(feature).items():
                assert resumed.neighbours(feature)[metric].ids.tolist() == lists.ids.tolist()
        for key, value in whole.metrics().items():
            got = resumed.metrics()[key]
            assert got == pytest.approx(value, rel=1e-5) if isinstance(value, float) else True
    print("stress cycles:", outcomes)


# ---------------------------------------------------------------------- probe process


def test_probe_runs_in_a_child_and_quitting_never_waits_for_its_model(tiny_index, tmp_path):
    """The probe loads the index's own model and SAE in a child process; q while it
    loads kills that child instead of waiting for the load."""
    import shutil

    from saetui.tui.widgets.feature_view import FeatureView
    from saetui.tui.widgets.probe_pane import ProbePane

    index = tmp_path / "index"
    shutil.copytree(tiny_index[2], index)
    app = SaetuiApp(index, watch_terminal=False)

    async def probe_then_open(pilot) -> None:
        await pilot.press("4")
        await wait_for(pilot, lambda: app.focused and app.focused.id == "probe-input")
        await pilot.press(*"w1 w2 w3 w4", "enter")
        pane = app.query_one(ProbePane)
        await wait_for(pilot, lambda: pane.result is not None, 120, "probe result")
        assert pane.result.tokens == [" w1", " w2", " w3", " w4"] or len(pane.result.tokens) == 4
        assert app._probe.ready and app._probe._proc.poll() is None
        top = pane.result.ranked[0].feature
        await pilot.press("t", "enter")
        view = app.query_one(FeatureView)
        await wait_for(pilot, lambda: view.detail and view.detail.row.feature == top)
        await wait_for(pilot, lambda: view.detail.promoted, 30, "logit effects")
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None, 10, "exit")

    _run_app(app, probe_then_open, 180)
    assert app._probe._proc.poll() is not None

    app = SaetuiApp(index, watch_terminal=False)

    async def quit_while_loading(pilot) -> None:
        await pilot.press("4")
        await wait_for(pilot, lambda: app.focused and app.focused.id == "probe-input")
        await pilot.press(*"w5 w6", "enter")
        status = app.query_one("#probe-status")
        await wait_for(pilot, lambda: "loading" in str(status.render()), 60, "model loading")
        await pilot.press("escape", "q")  # escape leaves the text box
        await wait_for(pilot, lambda: app.return_code is not None, 10, "exit")

    _run_app(app, quit_while_loading, 60)
    assert app.return_code == 0
    assert app._probe._proc.poll() is not None  # killed, not waited for
