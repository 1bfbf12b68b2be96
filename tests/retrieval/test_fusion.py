"""Reciprocal rank fusion."""

from __future__ import annotations

import pytest

from orchestrator.retrieval.fusion import RRF_K, reciprocal_rank_fusion


def test_agreement_wins_and_scores_are_normalised():
    vector = [(1, 0.9), (2, 0.8), (3, 0.7)]
    text = [(2, 1.0), (4, 0.6), (1, 0.5)]
    fused = reciprocal_rank_fusion([vector, text])
    assert [item for item, _ in fused] == [2, 1, 4, 3]
    scores = dict(fused)
    best = 2 / (RRF_K + 1)
    assert scores[2] == pytest.approx((1 / (RRF_K + 2) + 1 / (RRF_K + 1)) / best)
    assert scores[4] == pytest.approx(1 / (RRF_K + 2) / best)
    assert all(0 < s <= 1 for s in scores.values())


def test_first_in_every_list_scores_one_and_empty_lists_do_not_count():
    assert reciprocal_rank_fusion([[(7, 0.1)], [(7, 3.0)]]) == [(7, 1.0)]
    assert reciprocal_rank_fusion([[(7, 0.1), (8, 0.0)], []])[0] == (7, 1.0)
    assert reciprocal_rank_fusion([[], []]) == []


def test_weights_scale_each_list_and_a_zero_weight_list_adds_nothing():
    vector = [(1, 0.9), (2, 0.8)]
    text = [(2, 1.0), (3, 0.6)]
    assert reciprocal_rank_fusion([vector, text], [1.0, 1.0]) == reciprocal_rank_fusion(
        [vector, text]
    )
    # The vector list alone, its items' scores as if it were the only list.
    assert reciprocal_rank_fusion([vector, text], [2.0, 0.0]) == reciprocal_rank_fusion([vector])
    fused = dict(reciprocal_rank_fusion([vector, text], [0.25, 0.75]))
    best = (0.25 + 0.75) / (RRF_K + 1)
    assert fused[2] == pytest.approx((0.25 / (RRF_K + 2) + 0.75 / (RRF_K + 1)) / best)
    assert fused[1] == pytest.approx(0.25 / (RRF_K + 1) / best)
    assert max(fused, key=fused.get) == 2
