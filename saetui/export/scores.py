"""Scores of feature explanations (delphi's detection and fuzzing, or any other scorer),
kept in the index's user store beside the labels; the table, the feature view and the
exports read them from here."""

from __future__ import annotations

from typing import Any

from saetui.errors import SaetuiInputError

SCORES_KEY = {"kind": "explanation_scores"}  # one record: {feature: {scorer: value}}


def feature_scores(index: Any) -> dict[int, dict[str, float]]:
    """Every stored score, by feature then scorer (e.g. ``{12: {"detection": 0.81}}``)."""
    stored = index.user.cached(SCORES_KEY) or {}
    return {int(f): {k: float(v) for k, v in s.items()} for f, s in stored.items()}


def scorer_names(scores: dict[int, dict[str, float]]) -> list[str]:
    """The scorers that scored at least one feature, sorted."""
    return sorted({name for per in scores.values() for name in per})


def store_feature_scores(index: Any, scores: dict[int, dict[str, float]]) -> int:
    """Merge ``scores`` into the stored ones (a newer value replaces an older one); returns
    how many features got a score. Refuses a read-only index with one sentence."""
    d_sae = index.meta.d_sae
    merged = {str(f): dict(s) for f, s in feature_scores(index).items()}
    for feature, per in scores.items():
        if not 0 <= int(feature) < d_sae:
            raise SaetuiInputError(
                f"a score names feature {feature}, outside this index's 0-{d_sae - 1}; check "
                "that the scores belong to this SAE."
            )
        merged.setdefault(str(int(feature)), {}).update({k: float(v) for k, v in per.items()})
    index.user.put_cached(SCORES_KEY, merged)
    if scores and index.user.cached(SCORES_KEY) != merged:
        raise SaetuiInputError(
            f"the index {index.path} is read-only here: scores cannot be saved; copy the index "
            "to a writable place."
        )
    return len(scores)
