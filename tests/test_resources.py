"""Resource limits met for real: a full disk (a small tmpfs, root only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_documents

from saetui.index import open_index


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_sentence_and_the_index_resumes_elsewhere(
    tmp_path, tiny_gpt2_dir, tiny_sae_dir
):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(tiny_documents(3000, seed=9)))
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("this container cannot mount a tmpfs")
    try:
        command = [
            sys.executable, "-m", "saetui", "collect", "--headless", "--model",
            str(tiny_gpt2_dir), "--sae", str(tiny_sae_dir), "--data", str(corpus), "--ctx-len",
            "24", "--batch-size", "8", "--device", "cpu", "--metrics-tokens", "100", "--out",
        ]  # fmt: skip
        full = subprocess.run([*command, str(disk / "index")], capture_output=True, text=True)
        assert full.returncode == 2, full.stderr
        assert "is full" in full.stderr and "Traceback" not in full.stderr
        with open_index(disk / "index") as index:
            kept = index.progress().tokens
        assert kept > 0
        shutil.copytree(disk / "index", tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(disk)])
    resumed = subprocess.run([*command, str(tmp_path / "moved")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    with open_index(tmp_path / "moved") as index:
        assert index.progress().finished and index.progress().tokens > kept


def test_readers_and_writers_work_under_an_address_space_limit(tmp_path):
    """ulimit -v: a 1 TiB map could not be opened; readers map only the file, and the
    writer sizes its map from what the limit leaves."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "from saetui.index.synthetic import SyntheticCorpus, write_synthetic\n"
        "from saetui.index import open_index\n"
        "write_synthetic(sys.argv[1], SyntheticCorpus(d_sae=128, ctx_len=16), 40)\n"
        "with open_index(sys.argv[1]) as r:\n"
        "    print(r.progress().windows, len(r.top_examples(0, 3)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "index")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "40"
