"""The ecosystem exports stream: their peak memory (Python and numpy allocations, traced)
does not grow with the corpus (six times the tokens, the same peak give or take)."""

from __future__ import annotations

import tracemalloc

import pytest

from saetui.export.delphi import export_delphi
from saetui.export.html import export_html
from saetui.export.neuronpedia import export_neuronpedia
from saetui.index.synthetic import SyntheticCorpus, write_synthetic

SMALL, LARGE = 200, 1200  # windows of 64 tokens


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two synthetic indexes of one SAE, the second with six times the tokens."""
    root = tmp_path_factory.mktemp("streaming")
    paths = {}
    for windows in (SMALL, LARGE):
        paths[windows] = root / f"index-{windows}"
        corpus = SyntheticCorpus(d_sae=512, ctx_len=64, k=16, seed=5)
        write_synthetic(paths[windows], corpus, windows, batch_windows=100)
    return paths


EXPORTS = {
    "delphi": lambda index, out: export_delphi(index, out, say=lambda _: None).bytes,
    "html": lambda index, out: export_html(index, out, features="0-63", say=lambda _: None).bytes,
    "neuronpedia": lambda index, out: (
        export_neuronpedia(index, out, features="0-63", say=lambda _: None).bytes
    ),
}


def traced_peak(run) -> tuple[int, int]:
    import torch  # noqa: F401 - imported before tracing: the delphi export saves with torch

    tracemalloc.start()
    try:
        written = run()
        return tracemalloc.get_traced_memory()[1], written
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_peak_memory_does_not_grow_with_the_corpus(corpora, tmp_path, name):
    export = EXPORTS[name]
    small, _ = traced_peak(lambda: export(corpora[SMALL], tmp_path / "small"))
    large, written = traced_peak(lambda: export(corpora[LARGE], tmp_path / "large"))
    assert written > 0
    assert large < 1.5 * small + 4e6, (small, large)
