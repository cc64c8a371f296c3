"""The static HTML export: pages per feature and an index page, checked in a real headless
Chromium (rendered shaded spans, working links and sorting), plus atomic replacement."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from saetui.cli import main
from saetui.errors import SaetuiInputError
from saetui.export.html import CONTEXT_AFTER, CONTEXT_BEFORE, export_html, show_token
from saetui.export.staging import MARKER, parse_feature_spec
from saetui.index import open_index

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def pages(tiny_index, tmp_path_factory):
    """Every feature that fired, exported through the CLI, one of them labelled (in a copy
    of the shared index, so other tests see it unlabelled)."""
    _, _, original = tiny_index
    index_path = tmp_path_factory.mktemp("html-index") / "index"
    shutil.copytree(original, index_path, ignore=shutil.ignore_patterns("user"))
    with open_index(index_path) as index:
        page = index.features(sort="count", descending=True, page_size=index.meta.d_sae)
        busiest = int(page.feature[0])
        index.set_label(busiest, "a <b>bold</b> label", "notes & more")
        alive = page.feature[page.count > 0].tolist()
    out = tmp_path_factory.mktemp("html") / "pages"
    assert main(["export", str(index_path), "--format", "html", "--out", str(out)]) == 0
    return out, index_path, busiest, sorted(alive)


def test_one_page_per_fired_feature_and_an_index_without_external_resources(pages):
    out, _, busiest, alive = pages
    written = sorted(int(p.stem) for p in (out / "features").glob("*.html"))
    assert written == alive
    assert json.loads((out / MARKER).read_text())["format"] == "html"
    index_html = (out / "index.html").read_text()
    body = index_html.split("<tbody>")[1].split("</tbody>")[0]
    assert re.findall(r'<tr><td data-v="(\d+)">', body) == [str(f) for f in alive]
    for path in [out / "index.html", *(out / "features").glob("*.html")]:
        text = path.read_text()
        # self-contained: no remote scripts, styles, images or fonts
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path
        assert "@import" not in text and "url(" not in text
    page = (out / "features" / f"{busiest}.html").read_text()
    assert "a &lt;b&gt;bold&lt;/b&gt; label" in page and "notes &amp; more" in page


def test_feature_page_holds_the_index_values(pages):
    out, index_path, busiest, alive = pages
    page = (out / "features" / f"{busiest}.html").read_text()
    with open_index(index_path) as index:
        examples = index.top_examples(busiest, 20)
        neighbours = index.neighbours(busiest)
    # one context per top example, each with exactly one outlined firing token
    contexts = re.findall(r'<div class="ctx">(.*?)</div>', page.split("Interval samples")[0])
    assert len(contexts) == len(examples)
    for context, example in zip(contexts, examples, strict=True):
        fired = re.findall(r'<span class="(?:h\d )?f" title="([^"]+)">', context)
        assert len(fired) == 1
        assert float(fired[0]) == pytest.approx(example.value, rel=2e-3)
    # neighbours link to pages that exist, and only to those
    for target in re.findall(r'<a href="(\d+)\.html">', page):
        assert int(target) in alive
    cosine = neighbours["decoder_cosine"].ids[:10].tolist()
    linked = [f for f in cosine if f in alive]
    for feature in linked:
        assert f'<a href="{feature}.html">#{feature}</a>' in page


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (make install installs it from Debian's packages)",
)
def test_pages_render_shaded_spans_and_sort_in_headless_chromium(pages, tmp_path):
    out, index_path, busiest, alive = pages
    page = (out / "features" / f"{busiest}.html").resolve()
    listing = (out / "index.html").resolve()
    # A harness page loads both exported pages in frames and reports what was drawn.
    harness = tmp_path / "harness.html"
    harness.write_text(
        f"""<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="a" src="{page.as_uri()}" width="1100" height="900"></iframe>
<iframe id="b" src="{listing.as_uri()}" width="1100" height="900"></iframe>
<script>
var loaded = 0;
function report() {{
  var d = document.getElementById('a').contentDocument;
  var spans = [].slice.call(d.querySelectorAll('.ctx span[class]'));
  var drawn = spans.filter(function (s) {{
    var r = s.getBoundingClientRect(); return r.width > 0 && r.height > 0; }});
  var shaded = drawn.filter(function (s) {{
    return /\\bh[1-9]\\b/.test(s.className) &&
      getComputedStyle(s).backgroundColor !== 'rgba(0, 0, 0, 0)'; }});
  var first = d.querySelector('.ctx');
  var firing = [].slice.call(d.querySelectorAll('.ctx .f')).map(function (s) {{
    return getComputedStyle(s).outlineStyle; }});
  var bars = d.querySelectorAll('svg rect.bar').length;
  var l = document.getElementById('b').contentDocument;
  l.querySelectorAll('th')[2].click();  // density, descending
  var order = [].slice.call(l.querySelectorAll('tbody tr')).map(function (r) {{
    return parseInt(r.cells[0].dataset.v); }});
  document.getElementById('result').textContent = JSON.stringify({{
    title: d.title, spans: spans.length, drawn: drawn.length, shaded: shaded.length,
    context_text: first.textContent, context_height: first.getBoundingClientRect().height,
    firing: firing, bars: bars, order: order}});
}}
['a', 'b'].forEach(function (id) {{
  document.getElementById(id).onload = function () {{ if (++loaded === 2) report(); }}; }});
</script></body></html>"""
    )
    run = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=10000",
            "--dump-dom",
            harness.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'<pre id="result">(.*?)</pre>', run.stdout, re.S)
    assert match and match.group(1) != "pending", run.stderr[-2000:]
    result = json.loads(html.unescape(match.group(1)))
    with open_index(index_path) as index:
        examples = index.top_examples(busiest, 20)
        n_examples = len(examples)
        page_rows = index.features(sort="density", descending=True, page_size=index.meta.d_sae)
    assert result["title"].startswith(f"Feature {busiest}")
    assert result["spans"] > 0 and result["drawn"] == result["spans"]
    assert result["shaded"] >= n_examples  # at least every firing token is shaded
    # the first context shows its value, then its tokens (shaded or bare) in order
    example = examples[0]
    lo = max(0, example.position - CONTEXT_BEFORE)
    hi = min(len(example.tokens), example.position + CONTEXT_AFTER + 1)
    shown = "".join(show_token(t) for t in example.tokens[lo:hi])
    assert html.unescape(shown) in result["context_text"] and result["context_height"] > 0
    assert result["firing"].count("solid") >= n_examples
    assert result["bars"] >= 1
    expected = [f for f in page_rows.feature.tolist() if f in set(alive)]
    assert result["order"] == expected


def test_features_spec_selects_pages_and_links_only_exported(tiny_index, tmp_path):
    _, _, index_path = tiny_index
    out = tmp_path / "two"
    report = export_html(index_path, out, features="0-2,5", say=lambda _: None)
    assert sorted(int(p.stem) for p in (out / "features").glob("*.html")) == [0, 1, 2, 5]
    assert report.pages == 4 and report.bytes > 0
    for path in (out / "features").glob("*.html"):
        for target in re.findall(r'<a href="(\d+)\.html">', path.read_text()):
            assert int(target) in (0, 1, 2, 5)


def test_export_is_atomic_and_refuses_foreign_directories(tiny_index, tmp_path):
    _, _, index_path = tiny_index
    out = tmp_path / "site"
    export_html(index_path, out, features="1-3", say=lambda _: None)
    before = sorted(p.name for p in (out / "features").iterdir())
    with pytest.raises(SaetuiInputError, match="outside this index"):
        export_html(index_path, out, features="1,100000", say=lambda _: None)
    assert sorted(p.name for p in (out / "features").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no staging left behind
    export_html(index_path, out, features="4", say=lambda _: None)  # replaces the old export
    assert [p.name for p in (out / "features").iterdir()] == ["4.html"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SaetuiInputError, match="not a saetui html export"):
        export_html(index_path, foreign, features="1", say=lambda _: None)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_feature_spec_parsing():
    assert parse_feature_spec("5, 1-3,3", 10).tolist() == [1, 2, 3, 5]
    assert parse_feature_spec(None, 10) is None
    for bad in ("x", "3-1", "9-10", ",", "-1"):
        with pytest.raises(SaetuiInputError, match="--features"):
            parse_feature_spec(bad, 10)
    assert np.array_equal(parse_feature_spec("0-9", 10), np.arange(10))
