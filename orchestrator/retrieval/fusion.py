"""Fusing ranked lists (vector similarity, BM25) into one ranking.

Reciprocal rank fusion scores a chunk by the sum over lists of 1 / (k + rank): it needs
no calibration between cosine similarities and BM25 scores, which live on unrelated
scales, and k = 60 is the constant of Cormack et al. (2009). A list may be weighted
(OpenAI's `hybrid_search` weights): its terms are multiplied by its weight, and a list
weighted 0 adds nothing, not even its items. The sum is divided by its largest possible
value (first in every list that counts), so a score is in (0, 1] and `score_threshold`
means the same whatever the number of lists and their weights.
"""

from __future__ import annotations

RRF_K = 60


def reciprocal_rank_fusion(
    rankings: list[list[tuple[int, float]]],
    weights: list[float] | None = None,
    k: int = RRF_K,
) -> list[tuple[int, float]]:
    """(id, score) best first, from lists of (id, score) each sorted best first, each list
    weighted by `weights` (all 1 without)."""
    weighted = [
        (ranking, weight)
        for ranking, weight in zip(rankings, weights or [1.0] * len(rankings), strict=True)
        if ranking and weight > 0
    ]
    fused: dict[int, float] = {}
    for ranking, weight in weighted:
        for rank, (item, _) in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    if not weighted:
        return []
    best = sum(weight for _, weight in weighted) / (k + 1)
    return sorted(
        ((item, score / best) for item, score in fused.items()),
        key=lambda pair: (-pair[1], pair[0]),
    )
