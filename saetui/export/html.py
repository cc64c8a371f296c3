"""Static HTML pages of features, sae_vis-style, to share with people who have no terminal:
``index.html`` (every exported feature, sortable) and ``features/<id>.html`` per feature
(label, statistics, activation histogram, logit effects, neighbours with links, shaded top
and interval contexts). Self-contained: inline CSS and a few lines of inline JS, no server,
no CDN, no fonts; contexts are cut around the firing token and shades are CSS classes, so
a page stays a few tens of kB.

Pages are written one feature at a time (memory does not grow with d_sae beyond one row
of the index page per feature) into a staging directory renamed into place at the end.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saetui.export.scores import feature_scores, scorer_names
from saetui.export.staging import Throttled, parse_feature_spec, staged_directory

CONTEXT_BEFORE = 16  # tokens shown before the firing token (sae_vis shows a similar span)
CONTEXT_AFTER = 6
SHADES = 9  # background levels .h1 .. .h9
LARGE_EXPORT = 5000  # pages above which a default export suggests --features
NEIGHBOUR_METRICS = {
    "decoder_cosine": "Decoder cosine",
    "jaccard": "Co-occurrence (Jaccard)",
    "npmi": "Co-occurrence (NPMI)",
    "p_g_given_f": "P(other fires | this fires)",
}
_GLYPHS = str.maketrans({"\n": "⏎", "\t": "→", "\r": "␍"})

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em auto;max-width:1100px;padding:0 1em;
color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.1em;margin:1.2em 0 .4em;border-bottom:1px
solid #ddd}
a{color:#0550ae;text-decoration:none}a:hover{text-decoration:underline}
.muted{color:#777}.label{font-size:1.15em}.grid{display:flex;flex-wrap:wrap;gap:2em}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top}
th{cursor:pointer;border-bottom:1px solid #ccc;user-select:none}tr:nth-child(even){
background:#f6f6f6}.num{text-align:right;font-variant-numeric:tabular-nums}
.ctx{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;margin:2px 0;padding:1px 4px;
border-left:3px solid #eee}.ctx .v{display:inline-block;width:4.5em;color:#555}
.ctx span{border-radius:2px}.f{outline:2px solid #c2410c}.el{color:#aaa}
.h1{background:#fff3e6}.h2{background:#ffe4c6}.h3{background:#ffd3a3}.h4{background:#ffc07f}
.h5{background:#ffab5a}.h6{background:#fb9336}.h7{background:#f07c1c;color:#fff}
.h8{background:#dd6410;color:#fff}.h9{background:#c2410c;color:#fff}
.pos{color:#0a7d32}.neg{color:#b42318}svg .bar{fill:#f07c1c}svg text{font-size:10px;
fill:#555}
"""

# Sorts the index table by a clicked column; nothing else needs script.
SORT_JS = """
document.querySelectorAll('th[data-k]').forEach(function(th,i){th.onclick=function(){
var tb=th.closest('table').tBodies[0],rows=[].slice.call(tb.rows),d=th.dataset.d!=='1';
th.dataset.d=d?'1':'0';rows.sort(function(a,b){var x=a.cells[i].dataset.v||a.cells[i]
.textContent,y=b.cells[i].dataset.v||b.cells[i].textContent,nx=parseFloat(x),ny=parseFloat(y);
var c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;return d?-c:c});
rows.forEach(function(r){tb.appendChild(r)})}});
"""


@dataclass(frozen=True)
class HtmlExport:
    out: Path
    pages: int
    bytes: int
    seconds: float


def feature_page_name(feature: int) -> str:
    return f"{feature}.html"


def export_html(
    index_path: Path,
    out: Path,
    *,
    features: str | None = None,
    n_examples: int = 20,
    say: Callable[[str], None] = print,
) -> HtmlExport:
    """Write the pages of the features named by ``features`` (a spec like ``"3,10-20"``;
    default: every feature that fired) into the directory ``out``."""
    from saetui.index import open_index

    started = time.perf_counter()
    with open_index(index_path) as index, staged_directory(Path(out), "html") as staging:
        d_sae = index.meta.d_sae
        chosen = parse_feature_spec(features, d_sae)
        page = index.features(sort="id", descending=False, page_size=d_sae)
        if chosen is None:
            chosen = page.feature[page.count > 0]
            if len(chosen) > LARGE_EXPORT:
                say(
                    f"html: {len(chosen):,} features fired, one page each (~20 kB); pick some "
                    "with --features to keep the export small enough to share"
                )
        exported = set(chosen.tolist())
        labels = index.labels()
        scores = feature_scores(index)
        scorers = scorer_names(scores)
        (staging / "features").mkdir()
        progress = Throttled(say)
        total_bytes = 0
        head, tail = index_page_parts(index, scorers, len(chosen))
        # the index page is streamed row by row beside the feature pages
        with (staging / "index.html").open("w", encoding="utf-8") as index_file:
            index_file.write(head)
            for done, feature in enumerate(chosen.tolist(), 1):
                text = feature_page(index, feature, exported, labels, scores, n_examples)
                path = staging / "features" / feature_page_name(feature)
                path.write_text(text, encoding="utf-8")
                total_bytes += len(text.encode("utf-8"))
                index_file.write(
                    _index_row(index, feature, page, labels, scores.get(feature, {}), scorers)
                )
                progress(f"html: {done:,}/{len(chosen):,} feature pages", final=done == len(chosen))
            index_file.write(tail)
        total_bytes += (staging / "index.html").stat().st_size
    return HtmlExport(Path(out), len(chosen), total_bytes, time.perf_counter() - started)


# ---------------------------------------------------------------------- pieces


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def show_token(token: str) -> str:
    """A token as visible text: newlines and tabs become glyphs, an empty one a marker."""
    return _esc(token.translate(_GLYPHS) or "∅")


def fmt_value(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2e}"


def fmt_density(density: float) -> str:
    if density <= 0:
        return "dead"
    percent = density * 100
    return f"{percent:.3g}%" if percent >= 0.001 else f"{percent:.1e}%"


def shade(value: float, max_value: float) -> int:
    """Shade level 0 (none) .. SHADES of an activation; sqrt so weak ones still show."""
    if value <= 0 or max_value <= 0:
        return 0
    return max(1, min(SHADES, round(math.sqrt(min(1.0, value / max_value)) * SHADES)))


def context_html(example: Any, max_value: float) -> str:
    """One shaded context: the firing token outlined, every token with its value as a
    tooltip, cut to CONTEXT_BEFORE / CONTEXT_AFTER tokens around it inside its window."""
    pos = int(example.position)
    lo, hi = max(0, pos - CONTEXT_BEFORE), min(len(example.tokens), pos + CONTEXT_AFTER + 1)
    parts = [f'<div class="ctx"><span class="v">{fmt_value(float(example.value))}</span>']
    if lo > 0:
        parts.append('<span class="el">…</span>')
    for i in range(lo, hi):
        value = float(example.activations[i])
        level = shade(value, max_value)
        if not level and i != pos:  # most tokens: bare text keeps pages small
            parts.append(show_token(example.tokens[i]))
            continue
        classes = " ".join(([f"h{level}"] if level else []) + (["f"] if i == pos else []))
        title = f' title="{fmt_value(value)}"' if value > 0 else ""
        parts.append(f'<span class="{classes}"{title}>{show_token(example.tokens[i])}</span>')
    if hi < len(example.tokens):
        parts.append('<span class="el">…</span>')
    parts.append("</div>")
    return "".join(parts)


def histogram_svg(counts: np.ndarray, edges: np.ndarray, width: int = 360, height: int = 90) -> str:
    """Bars of the log-spaced activation histogram over its non-empty range."""
    nonzero = np.flatnonzero(counts)
    if not len(nonzero):
        return '<p class="muted">no activations</p>'
    first, last = int(nonzero[0]), int(nonzero[-1])
    shown = counts[first : last + 1]
    top = float(shown.max())
    bar = width / len(shown)
    rects = []
    for i, count in enumerate(shown.tolist()):
        h = 0 if not count else max(1.0, (height - 14) * count / top)
        rects.append(
            f'<rect class="bar" x="{i * bar:.1f}" y="{height - 14 - h:.1f}" '
            f'width="{max(bar - 1, 1):.1f}" height="{h:.1f}"><title>'
            f"{fmt_value(float(edges[first + i]))}–{fmt_value(float(edges[first + i + 1]))}: "
            f"{count:,}</title></rect>"
        )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">'
        + "".join(rects)
        + f'<text x="0" y="{height - 2}">{fmt_value(float(edges[first]))}</text>'
        + f'<text x="{width}" y="{height - 2}" text-anchor="end">'
        + f"{fmt_value(float(edges[last + 1]))}</text></svg>"
    )


def _feature_link(feature: int, exported: set[int], score: float | None = None) -> str:
    name = f"#{feature}"
    cell = (
        f'<a href="{feature_page_name(feature)}">{name}</a>'
        if feature in exported
        else f'<span class="muted" title="not in this export">{name}</span>'
    )
    return cell if score is None else f"{cell} <span class=muted>{score:.3f}</span>"


def _page(title: str, body: str, script: str = "") -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>{body}"
        + (f"<script>{script}</script>" if script else "")
        + "</body></html>\n"
    )


def _run_line(index: Any) -> str:
    config = index.meta.run_config
    return _esc(
        f"{config.get('model')} · {config.get('hook')} · d_sae {index.meta.d_sae:,} · "
        f"{index.progress().counted_tokens:,} tokens of {Path(str(config.get('corpus'))).name}"
    )


def feature_page(
    index: Any,
    feature: int,
    exported: set[int],
    labels: dict[int, Any],
    scores: dict[int, dict[str, float]],
    n_examples: int,
) -> str:
    """The HTML of one feature's page."""
    stats = index.stats(feature)
    examples = index.top_examples(feature, n_examples)
    samples = index.interval_samples(feature)
    neighbours = index.neighbours(feature)
    label = labels.get(feature)
    max_value = float(stats.max) or 1.0
    body = ['<p><a href="../index.html">← all features</a></p>', f"<h1>Feature {feature}</h1>"]
    if label is not None:
        body.append(f'<p class="label">{_esc(label.label)}</p>')
        if label.notes:
            body.append(f'<p class="muted">{_esc(label.notes)}</p>')
    else:
        body.append('<p class="muted">no label</p>')
    facts = [
        f"fires on {fmt_density(stats.density)} of tokens ({stats.count:,})",
        f"mean {fmt_value(stats.mean)}",
        f"max {fmt_value(stats.max)}",
    ]
    facts += [
        f"{name} score {value:.3f}" for name, value in sorted(scores.get(feature, {}).items())
    ]
    body.append(f"<p>{' · '.join(_esc(f) for f in facts)}</p>")
    body.append(f'<p class="muted">{_run_line(index)}</p>')
    body.append('<div class="grid"><div><h2>Activation histogram</h2>')
    body.append(histogram_svg(np.asarray(stats.histogram), np.asarray(stats.bin_edges)))
    body.append("</div>")
    promoted, suppressed = neighbours.get("logit_promoted"), neighbours.get("logit_suppressed")
    if promoted is not None or suppressed is not None:
        body.append("<div><h2>Logit effects</h2><table><tr><th>promoted</th><th></th>")
        body.append("<th>suppressed</th><th></th></tr>")
        up = _token_rows(index, promoted)
        down = _token_rows(index, suppressed)
        for i in range(max(len(up), len(down))):
            a = up[i] if i < len(up) else ("", "")
            b = down[i] if i < len(down) else ("", "")
            body.append(
                f'<tr><td>{a[0]}</td><td class="num pos">{a[1]}</td>'
                f'<td>{b[0]}</td><td class="num neg">{b[1]}</td></tr>'
            )
        body.append("</table></div>")
    top_tokens = index.top_tokens(feature)[:10]
    if top_tokens:
        body.append("<div><h2>Top tokens</h2><table>")
        for token, count in top_tokens:
            body.append(
                f'<tr><td><code>{show_token(token)}</code></td><td class="num">{count}</td>'
            )
        body.append("</table></div>")
    body.append("</div>")
    shown = [m for m in NEIGHBOUR_METRICS if m in neighbours and len(neighbours[m].ids)]
    if shown:
        body.append('<h2>Neighbours</h2><div class="grid">')
        for metric in shown:
            n = neighbours[metric]
            items = "".join(
                f"<li>{_feature_link(int(f), exported, float(s))} {_label_of(labels, int(f))}</li>"
                for f, s in zip(n.ids[:10].tolist(), n.scores[:10].tolist(), strict=True)
            )
            body.append(f"<div><b>{NEIGHBOUR_METRICS[metric]}</b><ol>{items}</ol></div>")
        body.append("</div>")
    body.append(f"<h2>Top activations ({len(examples)})</h2>")
    body += [context_html(e, max_value) for e in examples] or ['<p class="muted">none</p>']
    if samples:
        body.append("<h2>Interval samples</h2>")
        total = max(int(stats.count), 1)
        edges = np.asarray(stats.bin_edges)
        hist = np.asarray(stats.histogram)
        for interval in samples:
            inside = int(hist[(edges[:-1] >= interval.low) & (edges[1:] <= interval.high)].sum())
            body.append(
                f"<h3>{fmt_value(interval.low)} – {fmt_value(interval.high)} "
                f'<span class="muted">contains {100 * inside / total:.3g}%</span></h3>'
            )
            body += [context_html(e, max_value) for e in interval.examples]
    return _page(f"Feature {feature}" + (f" — {label.label}" if label else ""), "".join(body))


def _label_of(labels: dict[int, Any], feature: int) -> str:
    label = labels.get(feature)
    return "" if label is None else f'<span class="muted">{_esc(label.label)}</span>'


def _token_rows(index: Any, neighbours: Any) -> list[tuple[str, str]]:
    if neighbours is None:
        return []
    strings = index.token_strings(neighbours.ids[:10])
    return [
        (f"<code>{show_token(t)}</code>", f"{s:+.3f}")
        for t, s in zip(strings, neighbours.scores[:10].tolist(), strict=True)
    ]


def _index_row(
    index: Any,
    feature: int,
    page: Any,
    labels: dict[int, Any],
    scores: dict[str, float],
    scorers: list[str],
) -> str:
    label = labels.get(feature)
    tokens = ", ".join(show_token(t.strip() or t) for t, _ in index.top_tokens(feature)[:3])
    density, maximum = float(page.density[feature]), float(page.max[feature])
    cells = [
        (
            f'<td data-v="{feature}"><a href="features/{feature_page_name(feature)}">'
            f"#{feature}</a></td>"
        ),
        f"<td>{_esc(label.label) if label else ''}</td>",
        f'<td class="num" data-v="{density!r}">{fmt_density(density)}</td>',
        f'<td class="num" data-v="{maximum!r}">{fmt_value(maximum)}</td>',
    ]
    for name in scorers:
        value = scores.get(name)
        cells.append(
            f'<td class="num" data-v="{value!r}">{value:.3f}</td>'
            if value is not None
            else '<td class="num" data-v="-1"></td>'
        )
    cells.append(f'<td class="muted">{tokens}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def index_page_parts(index: Any, scorers: list[str], n_features: int) -> tuple[str, str]:
    """The HTML before and after the rows of the page that lists every exported feature."""
    heads = ["feature", "label", "density", "max"] + [f"{s} score" for s in scorers]
    heads.append("top tokens")
    head = "".join(f'<th data-k="{i}">{_esc(h)}</th>' for i, h in enumerate(heads))
    body = (
        f"<h1>SAE features</h1><p class=muted>{_run_line(index)}</p>"
        f"<p>{n_features:,} features; click a column to sort.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>\x00</tbody></table>"
    )
    before, after = _page("SAE features", body, SORT_JS).split("\x00")
    return before, after
