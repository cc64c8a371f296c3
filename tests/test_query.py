"""Queries over postings against brute force over the forward index: every expression form,
paging, counts, PMI, quantiles, regexes that span tokens, parse errors and the CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from saetui.cli import main
from saetui.errors import SaetuiInputError
from saetui.index import open_index
from saetui.index.layout import ShardLayout
from saetui.index.postings import KIND_FEATURE, SHARD_SHIFT, build_postings
from saetui.index.query import QueryEngine, open_query, parse_query
from saetui.index.synthetic import SyntheticCorpus, write_synthetic
from tests.test_distributed_index import BLOCK, write_rank

CORPUS = SyntheticCorpus(d_sae=48, ctx_len=16, k=6, vocab_size=40, doc_len=40)
N_WINDOWS = 40


class Brute:
    """Every token of the index as Python rows: the reference for each query."""

    def __init__(self, path):
        self.rows = []  # (position, token id, counted, doc, {feature: value})
        self.windows = {}  # (shard, window) -> [(position, token string, counted)]
        with open_index(path) as reader:
            vocab = reader.vocab
            ctx = reader.meta.ctx_len
            for shard in reader.shard_ids:
                for scan in reader.scan_forward(shard):
                    for t in range(len(scan.global_index)):
                        g = int(scan.global_index[t])
                        pos = (shard << SHARD_SHIFT) | g
                        a, b = scan.offsets[t], scan.offsets[t + 1]
                        acts = {
                            int(f): float(v)
                            for f, v in zip(scan.feature_ids[a:b], scan.values16[a:b], strict=True)
                        }
                        row = (
                            pos,
                            int(scan.token_ids[t]),
                            bool(scan.counted[t]),
                            int(scan.doc_ids[t]),
                            acts,
                        )
                        self.rows.append(row)
                        self.windows.setdefault((shard, g // ctx), []).append(
                            (pos, vocab[scan.token_ids[t]], bool(scan.counted[t]))
                        )
        self.vocab = vocab
        self.counted = [r for r in self.rows if r[2]]

    def regex(self, pattern):
        """Counted tokens that some match overlaps, match by match, token by token."""
        out = set()
        for tokens in self.windows.values():
            text = "".join(s for _, s, _ in tokens)
            for m in re.finditer(pattern, text):
                s, e = m.span()
                e = max(e, s + 1)
                start = 0
                for pos, string, counted in tokens:
                    end = start + len(string)
                    if counted and start < e and s < end:
                        out.add(pos)
                    start = end
        return out

    def where(self, test):
        return [r[0] for r in sorted(self.counted) if test(r)]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("query")
    write_synthetic(path, CORPUS, N_WINDOWS)
    build_postings(path, part_nnz=600, top_min=30)
    return path


@pytest.fixture(scope="module")
def brute(index):
    return Brute(index)


@pytest.fixture
def engine(index):
    reader, engine = open_query(index)
    yield engine
    engine.close()
    reader.close()


def frequent_features(brute, n):
    counts = {}
    for r in brute.counted:
        for f in r[4]:
            counts[f] = counts.get(f, 0) + 1
    return sorted(counts, key=lambda f: -counts[f])[:n]


def all_positions(engine, expr, order="position"):
    page = engine.query(expr, limit=10**9, order=order)
    assert page.total == len(page.positions)
    return page


@pytest.mark.parametrize("frequent", [None, 0])
def test_every_form_equals_brute_force(engine, brute, frequent, monkeypatch):
    if frequent is not None:  # every feature counts as frequent: bitmap lookups, fast pages
        from saetui.index import query_ranked as query_module

        monkeypatch.setattr(query_module, "FREQUENT", frequent)
    a, b, c = frequent_features(brute, 3)
    tok = brute.vocab[brute.counted[5][1]]
    doc = brute.counted[30][3]
    cases = {
        f"f:{a}": lambda r: a in r[4],
        f"f:{a} > 2.0": lambda r: r[4].get(a, 0) > 2.0,
        f"f:{a} <= 1": lambda r: 0 < r[4].get(a, 0) <= 1,
        f"f:{a} & f:{b}": lambda r: a in r[4] and b in r[4],
        f"f:{a} & !f:{b}": lambda r: a in r[4] and b not in r[4],
        f"f:{a} & !f:{b} & !f:{c}": lambda r: a in r[4] and b not in r[4] and c not in r[4],
        f"f:{a} | f:{b}": lambda r: a in r[4] or b in r[4],
        f"(f:{a} | f:{b}) & !f:{c}": lambda r: (a in r[4] or b in r[4]) and c not in r[4],
        "tok:" + json.dumps(tok): lambda r: brute.vocab[r[1]] == tok,
        "tok:" + json.dumps(tok) + f" & f:{a}": lambda r: brute.vocab[r[1]] == tok and a in r[4],
        f"doc:{doc}": lambda r: r[3] == doc,
        f"doc:{doc} & !f:{a}": lambda r: r[3] == doc and a not in r[4],
    }
    for expr, test in cases.items():
        want = brute.where(test)
        assert want, expr  # the case is not vacuous
        page = all_positions(engine, expr)
        assert page.positions.tolist() == want, expr
        # the values table holds each positive feature's activation at each match
        for pos, row in zip(page.positions.tolist(), page.values.tolist(), strict=True):
            acts = next(r[4] for r in brute.counted if r[0] == pos)
            assert row == [pytest.approx(acts.get(f, 0.0)) for f in page.features], expr
        assert engine.count(expr) == len(want)


@pytest.mark.parametrize("frequent", [None, 0])
def test_pages_by_value_and_by_position(engine, brute, frequent, monkeypatch):
    if frequent is not None:
        from saetui.index import query_ranked as query_module

        monkeypatch.setattr(query_module, "FREQUENT", frequent)
    a, b = frequent_features(brute, 2)
    for expr, test in (
        (f"f:{a}", lambda r: a in r[4]),
        (f"f:{a} & f:{b}", lambda r: a in r[4] and b in r[4]),
    ):
        by_value = sorted((r for r in brute.counted if test(r)), key=lambda r: (-r[4][a], r[0]))
        want = [r[0] for r in by_value]
        for offset, limit in ((0, 5), (5, 7), (len(want) - 3, 10)):
            page = engine.query(expr, limit=limit, offset=offset, order="value")
            assert page.positions.tolist() == want[offset : offset + limit], (expr, offset)
            assert page.total == len(want)
        page = engine.query(expr, limit=4, offset=2, order="position")
        assert page.positions.tolist() == sorted(want)[2:6]


def test_counts_and_pmi_of_cofiring(engine, brute):
    a, b = frequent_features(brute, 2)
    n = len(brute.counted)
    na = sum(a in r[4] for r in brute.counted)
    nb = sum(b in r[4] for r in brute.counted)
    nab = sum(a in r[4] and b in r[4] for r in brute.counted)
    page = engine.query(f"f:{a} & f:{b}", limit=1)
    assert page.counts == {f"f:{a}": na, f"f:{b}": nb}
    assert page.total == nab
    assert page.pmi == pytest.approx(math.log(nab * n / (na * nb)))
    assert engine.query(f"f:{a}", limit=1).pmi is None


def test_exact_quantiles(engine, brute):
    a = frequent_features(brute, 1)[0]
    values = [r[4][a] for r in brute.counted if a in r[4]]
    qs = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
    assert engine.quantiles(a, qs).tolist() == pytest.approx(np.quantile(values, qs).tolist())
    with pytest.raises(SaetuiInputError, match="must lie in"):
        engine.quantiles(a, [1.5])


def test_regex_matches_across_tokens(engine, brute):
    # two neighbouring tokens whose joined text occurs nowhere inside one token
    tokens = brute.windows[(0, 3)]
    (p1, s1, _), (p2, s2, _) = tokens[5], tokens[6]
    pattern = re.escape(s1[-1] + s2[0])
    assert not any(re.search(pattern, s) for s in brute.vocab)
    page = all_positions(engine, f"re:/{pattern}/")
    assert {p1, p2} <= set(page.positions.tolist())
    for regex in (pattern, r"t1\d", r"t3.t", r"^t2", r"\dt\d"):
        want = sorted(brute.regex(regex))
        assert want, regex
        assert all_positions(engine, f"re:/{regex}/").positions.tolist() == want, regex


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("", "the query is empty"),
        ("f:", "expected a feature id after 'f:'"),
        ("f:1 &", "expected f:, tok:, re:, doc:, '!' or '('"),
        ("f:1 f:2", "expected '&', '|' or the end of the query"),
        ("f:1 > x", "expected a number after '>'"),
        ("tok: the", "expected a quoted token"),
        ('tok:"the', "expected a closed, JSON-quoted string"),
        ("re:/abc", "expected a closing '/'"),
        ("re:/(/", "the regex /(/ is invalid"),
        ("(f:1 & f:2", "expected ')'"),
        ("!f:1", "asks only for what is absent"),
        ("!f:1 & !f:2", "asks only for what is absent"),
        ("f:1 | !f:2", "asks only for what is absent"),
        ("g:3", "expected f:, tok:, re:, doc:"),
    ],
)
def test_parse_errors_are_one_sentence(expr, says):
    with pytest.raises(SaetuiInputError) as caught:
        parse_query(expr)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message and message.endswith(".")
    if expr:
        assert repr(expr) in message or "absent" in message


def test_bad_input_to_the_engine(engine):
    with pytest.raises(SaetuiInputError, match="out of range"):
        engine.query(f"f:{CORPUS.d_sae}")
    with pytest.raises(SaetuiInputError, match="no token of this index's vocabulary"):
        engine.query('tok:"not a token"')
    with pytest.raises(SaetuiInputError, match="order"):
        engine.query("f:1", order="random")


def test_contexts_shade_the_features(engine, brute):
    a, b = frequent_features(brute, 2)
    page = engine.query(f"f:{a} & f:{b}", limit=3)
    for ctx, row in zip(engine.contexts(page), page.values.tolist(), strict=True):
        assert ctx.features == [a, b]
        assert ctx.activations[:, ctx.position].tolist() == pytest.approx(row)
        assert (ctx.shard << SHARD_SHIFT) | ctx.global_index in page.positions.tolist()


def test_queries_on_a_distributed_index(tmp_path):
    path = tmp_path / "ranks"
    for rank in (0, 1):
        write_rank(path, ShardLayout(rank, 2, BLOCK))
    build_postings(path, part_nnz=400)
    brute = Brute(path)
    a, b = frequent_features(brute, 2)
    with open_index(path) as reader, QueryEngine.open(reader) as engine:
        for expr, test in (
            (f"f:{a} & !f:{b}", lambda r: a in r[4] and b not in r[4]),
            ("doc:7", lambda r: r[3] == 7),
        ):
            assert all_positions(engine, expr).positions.tolist() == brute.where(test)
        assert all_positions(engine, "re:/t1\\d/").positions.tolist() == sorted(
            brute.regex(r"t1\d")
        )
        # a document across the two ranks' windows, in document (global index) order
        spans = {}
        for r in brute.counted:
            spans.setdefault(r[3], set()).add(r[0] >> SHARD_SHIFT)
        doc = next(d for d, shards in sorted(spans.items()) if d >= 0 and len(shards) == 2)
        rows = sorted(
            (r for r in brute.counted if r[3] == doc), key=lambda r: r[0] & ((1 << 40) - 1)
        )
        view = engine.document(doc, [a])
        assert view.positions.tolist() == [r[0] for r in rows]
        assert view.activations[0].tolist() == [pytest.approx(r[4].get(a, 0.0)) for r in rows]


def test_cli_query(index, brute, capsys, tmp_path):
    a, b = frequent_features(brute, 2)
    assert main(["query", str(index), f"f:{a} & f:{b}", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    nab = sum(a in r[4] and b in r[4] for r in brute.counted)
    assert out.splitlines()[0].startswith(f"f:{a} & f:{b}: {nab} matches")
    assert len(out.splitlines()) == 3 and "[[" in out and "PMI" in out

    assert main(["query", str(index), f"f:{a}", "--json", "--by", "position", "--limit", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = brute.where(lambda r: a in r[4])[:3]
    assert [m["global_index"] for m in data["matches"]] == [p & ((1 << 40) - 1) for p in want]

    for argv in (
        ["query", str(index), "f:1 &&"],
        ["query", str(index), "f:1", "--limit", "-1"],
        ["query", str(tmp_path / "missing"), "f:1"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("saetui: error: ") and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1

    bare = tmp_path / "bare"
    write_synthetic(bare, CORPUS, 5)
    assert main(["query", str(bare), "f:1"]) == 2
    assert "saetui postings" in capsys.readouterr().err
    assert main(["postings", str(bare)]) == 0
    assert "B/nonzero" in capsys.readouterr().out
    assert main(["query", str(bare), "f:1", "--limit", "1"]) == 0


def test_document_view_across_windows(engine, brute):
    a, b = frequent_features(brute, 2)
    # a document that spans at least two windows
    windows_of = {}
    for r in brute.counted:
        windows_of.setdefault(r[3], set()).add((r[0] & ((1 << 40) - 1)) // 16)
    doc = next(d for d, ws in sorted(windows_of.items()) if d >= 0 and len(ws) >= 3)
    rows = sorted((r for r in brute.counted if r[3] == doc), key=lambda r: r[0])
    view = engine.document(doc, [a, b])
    assert view.positions.tolist() == [r[0] for r in rows]
    assert view.tokens == [brute.vocab[r[1]] for r in rows]
    assert view.activations.tolist() == [
        [pytest.approx(r[4].get(f, 0.0)) for r in rows] for f in (a, b)
    ]
    assert engine.document_of(rows[5][0]) == doc
    assert view.index_of(rows[5][0]) == 5
    with pytest.raises(SaetuiInputError, match="is not in the index"):
        engine.document(10**9)


def test_cli_notes_postings_older_than_the_index(tmp_path, capsys):
    path = tmp_path / "growing"
    write_synthetic(path, CORPUS, 10)
    build_postings(path)
    write_synthetic(path, CORPUS, 20)  # the index grows after the build
    assert main(["query", str(path), "f:1", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # still one JSON document
    assert "cover 10 of the index's 20 windows" in captured.err
    assert main(["postings", str(path)]) == 0
    capsys.readouterr()
    assert main(["query", str(path), "f:1"]) == 0
    assert "note" not in capsys.readouterr().err


def test_cofiring_first_pages_from_bitmaps_equal_brute_force(tmp_path, monkeypatch):
    from saetui.index import query_ranked as query_module

    path = tmp_path / "dense"
    write_synthetic(path, CORPUS, N_WINDOWS)
    build_postings(path, part_nnz=1500, top_min=30)  # big parts: top lists and bitmaps
    monkeypatch.setattr(query_module, "FREQUENT", 0)
    brute = Brute(path)
    f0, f1, f2, f3 = frequent_features(brute, 4)
    reader, engine = open_query(path)
    post = engine.postings
    parts = post.parts()
    # the densest feature keeps a bitmap and several value tiers in some part
    with post._read() as txn:
        heads = [post._record(txn, KIND_FEATURE, f0, p) for p in parts]
    assert any(got[1].bitmap_slots for got in heads if got is not None)
    assert any(len(post.tier_maxes(f0, p)) > 1 for p in parts)
    proven = 0
    try:
        for a, b, c in ((f0, f1, f2), (f1, f0, f3), (f0, f3, f1), (f2, f1, f0)):
            cases = {
                f"f:{a} & f:{b}": lambda r, a=a, b=b: a in r[4] and b in r[4],
                f"f:{a} & !f:{b}": lambda r, a=a, b=b: a in r[4] and b not in r[4],
                f"f:{a} & f:{b} & !f:{c}": lambda r, a=a, b=b, c=c: (
                    a in r[4] and b in r[4] and c not in r[4]
                ),
            }
            for expr, test in cases.items():
                rows = sorted((r for r in brute.counted if test(r)), key=lambda r: (-r[4][a], r[0]))
                for offset, limit in ((0, 20), (10, 20), (0, 64)):
                    want = rows[offset : offset + limit]
                    page = engine.query(expr, limit=limit, offset=offset)
                    assert page.positions.tolist() == [r[0] for r in want], expr
                    assert page.total == len(rows)
                    fast = engine._cofiring_page(parse_query(expr), expr, limit, offset, "value")
                    if fast is None:
                        continue
                    proven += 1
                    assert fast.positions.tolist() == [r[0] for r in want], expr
                    assert fast.total == len(rows)
                    assert fast.values.tolist() == [
                        [pytest.approx(r[4].get(f, 0.0)) for f in fast.features] for r in want
                    ]
                    full = engine._eval(parse_query(expr), {})
                    assert len(full) == len(rows)
                    assert fast.counts == {
                        f"f:{f}": sum(f in r[4] for r in brute.counted) for f in fast.features
                    }
    finally:
        engine.close()
        reader.close()
    assert proven >= 6


NEAR_EVERY = SyntheticCorpus(d_sae=64, ctx_len=16, k=6, vocab_size=40, zipf=2.5, inactive=0.0)


@pytest.mark.parametrize("few", [0, 10**6])
def test_frequent_features_ranked_pages_equal_brute_force(tmp_path, monkeypatch, few):
    """A feature firing on nearly every token, intersected and differenced with others:
    the value-tier walk with values from the postings (few=0) and the forward-index path
    for small sets and page values (few large) give the brute-force pages, and a first
    page decodes fewer tiers than a full read."""
    from saetui.index import query_ranked

    path = tmp_path / "near-every"
    write_synthetic(path, NEAR_EVERY, 60)
    build_postings(path, part_nnz=2500, top_min=30)
    monkeypatch.setattr(query_ranked, "FREQUENT", 0)
    monkeypatch.setattr(query_ranked, "FEW_MATCHES", few)
    if few:  # lookups in the forward index always win: the small-set path and values_of's
        monkeypatch.setattr(query_ranked, "FORWARD_S", 0.0)
    brute = Brute(path)
    order = frequent_features(brute, 12)
    f0, f1, mid = order[0], order[1], order[10]
    assert sum(f0 in r[4] for r in brute.counted) > 0.9 * len(brute.counted)
    reader, engine = open_query(path)
    post = engine.postings
    decoded = []
    real_tier = post.tier
    monkeypatch.setattr(post, "tier", lambda *a: decoded.append(a) or real_tier(*a))
    try:
        all_tiers = sum(len(post.tier_maxes(f0, p)) for p in post.parts())
        assert all_tiers > 2 * len(post.parts())  # the dense feature has several tiers
        cases = {
            f"f:{f0} & f:{f1}": lambda r: f0 in r[4] and f1 in r[4],
            f"f:{f0} & !f:{f1}": lambda r: f0 in r[4] and f1 not in r[4],
            f"f:{f0} & f:{mid}": lambda r: f0 in r[4] and mid in r[4],
            f"f:{f0} & !f:{mid}": lambda r: f0 in r[4] and mid not in r[4],
            f"f:{f0} & !f:{f1} & !f:{mid}": lambda r: (
                f0 in r[4] and f1 not in r[4] and mid not in r[4]
            ),
            f"f:{mid} & !f:{f0}": lambda r: mid in r[4] and f0 not in r[4],
        }
        early = 0
        for expr, test in cases.items():
            a = parse_query(expr).terms[0].feature
            rows = sorted((r for r in brute.counted if test(r)), key=lambda r: (-r[4][a], r[0]))
            for offset, limit in ((0, 20), (15, 30), (0, 1)):
                want = rows[offset : offset + limit]
                decoded.clear()
                page = engine._cofiring_page(parse_query(expr), expr, limit, offset, "value")
                assert page is not None, expr
                assert page.positions.tolist() == [r[0] for r in want], (expr, offset)
                assert page.total == len(rows), expr
                assert page.values.tolist() == [
                    [pytest.approx(r[4].get(f, 0.0)) for f in page.features] for r in want
                ], expr
                if a == f0 and len(rows) > few:
                    early += len(decoded) < all_tiers
            # the public query gives the same first page
            page = engine.query(expr, limit=20)
            assert page.positions.tolist() == [r[0] for r in rows[:20]], expr
        assert early >= 3 or few > 0  # the tier walk stops early
        # a lone f:A by value walks the tiers too, at any depth up to RANKED_MAX
        rows = sorted((r for r in brute.counted if f0 in r[4]), key=lambda r: (-r[4][f0], r[0]))
        for limit in (1, 20, 300):
            decoded.clear()
            page = engine.query(f"f:{f0}", limit=limit)
            assert page.positions.tolist() == [r[0] for r in rows[:limit]]
            assert page.values[:, 0].tolist() == [pytest.approx(r[4][f0]) for r in rows[:limit]]
            assert page.total == len(rows)
            if limit == 1:
                assert len(decoded) < all_tiers
        # full reads merge the tiers back into position order
        pos, vals = post.read(KIND_FEATURE, f0)
        assert pos.tolist() == [r[0] for r in sorted(brute.counted) if f0 in r[4]]
        assert vals.tolist() == [
            pytest.approx(r[4][f0], rel=1e-3) for r in sorted(brute.counted) if f0 in r[4]
        ]
    finally:
        engine.close()
        reader.close()


def test_postings_of_an_older_format_are_refused_then_rebuilt(tmp_path):
    from saetui.errors import SaetuiInputError
    from saetui.index import format as fmt
    from saetui.index.postings import open_postings, read_state
    from saetui.index.postings_layout import DB_META, STATE_KEY, write_txn

    path = tmp_path / "old"
    write_synthetic(path, CORPUS, 10)
    build_postings(path)
    post = open_postings(path)
    state = read_state(post.entry)
    state["version"] = 2
    with write_txn(post.entry) as txn:
        txn.put(STATE_KEY, fmt.dumps(state), db=post.entry.dbs[DB_META])
    post.close()
    with pytest.raises(SaetuiInputError, match=r"format 2.*saetui postings"):
        open_query(path)
    report = build_postings(path)
    assert report.rebuilt
    reader, engine = open_query(path)
    try:
        assert engine.count("f:1") >= 0
    finally:
        engine.close()
        reader.close()
