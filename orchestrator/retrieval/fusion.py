"""Fusing ranked lists (vector similarity, BM25) into one ranking.

Reciprocal rank fusion scores a chunk by the sum over lists of 1 / (k + rank): it needs
no calibration between cosine similarities and BM25 scores, which live on unrelated
scales, and k = 60 is the constant of Cormack et al. (2009). The sum is divided by
its largest possible value (first in every list that returned anything), so a score is
in (0, 1] and `score_threshold` means the same whatever the number of lists.
"""

from __future__ import annotations

RRF_K = 60


def reciprocal_rank_fusion(
    rankings: list[list[tuple[int, float]]], k: int = RRF_K
) -> list[tuple[int, float]]:
    """(id, score) best first, from lists of (id, score) each sorted best first."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item, _) in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    lists = sum(1 for ranking in rankings if ranking)
    if not lists:
        return []
    best = lists / (k + 1)
    return sorted(
        ((item, score / best) for item, score in fused.items()),
        key=lambda pair: (-pair[1], pair[0]),
    )
