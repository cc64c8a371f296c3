"""Real ``torchrun`` jobs (gloo on this CPU machine): two ranks collect the same index as one
process, a rank killed mid-run or failing leaves every shard resumable, and shards written
on two "nodes" (two local directories) merge into the single-process index."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from saetui.collect.pipeline import run_collection
from saetui.index import open_index
from tests.conftest import REPO_ROOT, tiny_collect_config, tiny_documents
from tests.index_equality import assert_same_index

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_args(model: Path, sae: Path, corpus: Path, out: Path) -> list[str]:
    """The command-line twin of tests.conftest.tiny_collect_config."""
    return [
        "collect",
        "--model", str(model),
        "--sae", str(sae),
        "--data", str(corpus),
        "--ctx-len", "24",
        "--batch-size", "4",
        "--device", "cpu",
        "--dtype", "float32",
        "--metrics-tokens", "200",
        "--headless",
        "--out", str(out),
    ]  # fmt: skip


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = 240, **popen) -> tuple:
    """Run ``torchrun --nproc-per-node nproc -m saetui ARGS``; (exit code, output)."""
    command = [TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    script = popen.pop("script", None)
    command += [script] if script else ["-m", "saetui"]
    done = subprocess.run(
        command + args,
        env={**job_env(), **popen.pop("env", {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=popen.pop("cwd", None),
    )
    return done.returncode, done.stdout + done.stderr


def test_two_ranks_equal_one_process(tmp_path, tiny_index, tiny_gpt2_dir, tiny_sae_dir,
                                     tiny_corpus_file):  # fmt: skip
    _, _, single = tiny_index
    out = tmp_path / "ix"
    code, output = torchrun(tiny_args(tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, out))
    assert code == 0, output
    # one rank reports for the job: one summary line, the tokens of both ranks
    assert output.count("browse it with") == 1
    with open_index(out) as index, open_index(single) as reference:
        assert index.meta.n_shards == 2 and index.distributed
        assert all(p["windows"] > 0 for p in index.progress().shards)
        assert f"holds {reference.progress().tokens:,} tokens" in output
    assert_same_index(out, single)
    # a finished job run again does nothing on either rank
    code, output = torchrun(tiny_args(tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, out))
    assert code == 0 and "already finished" in output, output


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory, tiny_gpt2_dir, tiny_sae_dir):
    """A corpus long enough (~120k tokens) to stop a job mid-run, and its single-process
    index."""
    path = tmp_path_factory.mktemp("long") / "corpus.json"
    path.write_text(json.dumps(tiny_documents(4000, seed=3)))
    reference = path.parent / "reference"
    config = tiny_collect_config(reference, tiny_gpt2_dir, tiny_sae_dir, path)
    assert run_collection(config).status == "finished"
    return path, reference


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "saetui" in " ".join(child.cmdline()):
                return child
        except psutil.Error:  # noqa: PERF203 - a child may exit while it is looked at
            continue
    return None


def committed_windows(path: Path) -> int:
    try:
        with open_index(path) as index:
            return index.progress().windows
    except Exception:  # not created yet
        return 0


def signal_rank_1(args: list[str], out, windows: int, signum: int) -> tuple[int, str]:
    """A 2-rank torchrun job of ``args``; once ``windows`` windows are committed, rank 1
    gets ``signum``. Returns the launcher's exit code and output."""
    launcher = subprocess.Popen(
        [
            TORCHRUN,
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "saetui",
            *args,
        ],
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while committed_windows(out) < windows and time.monotonic() < deadline:
            assert launcher.poll() is None, launcher.stdout.read()
            time.sleep(0.2)
        victim = rank_process(psutil.Process(launcher.pid), 1)
        assert victim is not None
        victim.send_signal(signum)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return launcher.returncode, output


def test_a_killed_rank_leaves_shards_that_resume_to_the_same_index(
    tmp_path, long_corpus, tiny_gpt2_dir, tiny_sae_dir
):
    corpus, reference = long_corpus
    out = tmp_path / "ix"
    args = tiny_args(tiny_gpt2_dir, tiny_sae_dir, corpus, out)
    code, output = signal_rank_1(args, out, 300, signal.SIGKILL)
    assert code != 0
    with open_index(out) as index:
        progress = index.progress()
        total = open_index(reference).progress().windows
        assert 0 < progress.windows < total and not progress.finished, output
        assert len(progress.shards) == 2
    # another number of processes cannot resume it: one sentence, exit 2
    single = subprocess.run(
        [sys.executable, "-m", "saetui", *args],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 2
    assert "collected by 2 processes" in single.stderr and "Traceback" not in single.stderr
    code, output = torchrun(args)
    assert code == 0, output
    assert_same_index(out, reference)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_batch(
    tmp_path, long_corpus, tiny_gpt2_dir, tiny_sae_dir
):
    corpus, reference = long_corpus
    out = tmp_path / "ix"
    args = tiny_args(tiny_gpt2_dir, tiny_sae_dir, corpus, out)
    _, output = signal_rank_1(args, out, 200, signal.SIGTERM)
    assert "stopped while collecting" in output and "resumable" in output, output
    with open_index(out) as index:
        shards = index.progress().shards
        assert not any(s["finished"] for s in shards)
        # the same number of batches on both ranks: at most a batch (4 windows) apart,
        # plus the block boundary of the deal
        assert abs(shards[0]["windows"] - shards[1]["windows"]) <= 4 + 8
    code, output = torchrun(args)
    assert code == 0, output
    assert_same_index(out, reference)


def test_a_failing_rank_stops_every_rank_with_one_sentence(
    tmp_path, long_corpus, tiny_gpt2_dir, tiny_sae_dir
):
    corpus, reference = long_corpus
    out = tmp_path / "ix"
    args = tiny_args(tiny_gpt2_dir, tiny_sae_dir, corpus, out)
    code, output = torchrun(
        args,
        script=str(REPO_ROOT / "tests" / "torchrun_failing_rank.py"),
        env={"SAETUI_TEST_FAIL_RANK": "1", "SAETUI_TEST_FAIL_AFTER": "20"},
    )
    assert code != 0
    lines = [line for line in output.splitlines() if line.startswith("saetui: error:")]
    assert lines == [
        (
            "saetui: error: rank 1 failed: RuntimeError('injected failure'); every shard is "
            "closed and resumable: run the same command again to continue."
        )
    ], output
    with open_index(out) as index:
        shards = index.progress().shards
        # both shards stopped at a commit; rank 0 did not run on alone
        assert [s["windows"] > 0 for s in shards] == [True, True]
        assert abs(shards[0]["windows"] - shards[1]["windows"]) <= 2 * 4 + 8
        assert not any(s["finished"] for s in shards)
    code, output = torchrun(args)
    assert code == 0, output
    assert_same_index(out, reference)


def test_two_nodes_write_local_shards_that_merge_into_one_index(
    tmp_path, tiny_index, tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file
):
    """Two torchrun launchers (--nnodes 2, static rendezvous on this machine) stand for two
    machines: each writes its shard to its own directory; --gather copies them into the
    output, and `saetui merge` does the same from the node directories afterwards."""
    _, _, single = tiny_index
    gathered = tmp_path / "gathered"
    port = str(free_port())
    launchers = []
    for node in (0, 1):
        args = tiny_args(tiny_gpt2_dir, tiny_sae_dir, tiny_corpus_file, gathered)
        args += ["--shard-dir", str(tmp_path / f"node{node}"), "--gather"]
        command = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)]
        command += ["--master-addr", "127.0.0.1", "--master-port", port, "-m", "saetui", *args]
        launchers.append(
            subprocess.Popen(
                command,
                env=job_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [launcher.communicate(timeout=240)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
    assert "is complete: 2 shard(s)" in outputs[0]
    # each node directory holds only its own rank's shard
    for node in (0, 1):
        names = sorted(p.name for p in (tmp_path / f"node{node}").iterdir())
        assert [n for n in names if n.startswith("shard-")] == [f"shard-0000{node}"]
    assert_same_index(gathered, single)
    merged = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "saetui", "merge", str(tmp_path / "node0"),
         str(tmp_path / "node1"), "--out", str(merged)],
        env=job_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "copied shard 1" in done.stdout and "is complete" in done.stdout
    assert_same_index(merged, single)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_embedded_sample_on_two_ranks_equals_one_process(tmp_path):
    """The embedded SmolLM2 sample: 2 ranks against 1 process, a few thousand tokens."""
    args = ["demo", "--headless", "--max-tokens", "3000", "--metrics-tokens", "1000"]
    single = subprocess.run(
        [sys.executable, "-m", "saetui", *args, "--out", str(tmp_path / "one")],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert single.returncode == 0, single.stderr
    code, output = torchrun([*args, "--out", str(tmp_path / "two")], timeout=400)
    assert code == 0, output
    assert_same_index(tmp_path / "two", tmp_path / "one")
