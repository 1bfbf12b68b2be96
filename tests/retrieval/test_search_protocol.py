"""The vector store search body's parsing and the results page's shape."""

from __future__ import annotations

import pytest
from openai.types import VectorStoreSearchResponse

from orchestrator.retrieval.filters import Comparison
from orchestrator.retrieval.index import Hit
from server.errors import APIError
from server.vector_store_search import parse_search_request, search_results_page


def test_defaults_and_options():
    options = parse_search_request({"query": "whales"})
    assert (
        options.queries,
        options.max_num_results,
        options.score_threshold,
        options.mode,
        options.filters,
    ) == (["whales"], 10, 0.0, "hybrid", None)
    options = parse_search_request(
        {
            "query": ["blue", "whales"],
            "max_num_results": 3,
            "filters": {"key": "topic", "type": "eq", "value": "ocean"},
            "ranking_options": {"ranker": "none", "score_threshold": 0.4},
        }
    )
    assert options.queries == ["blue", "whales"]  # each searched, not one joined string
    assert options.filters == Comparison("topic", "eq", "ocean")
    assert (options.max_num_results, options.score_threshold, options.mode) == (3, 0.4, "vector")
    assert parse_search_request({"query": "a"}).weights == (1.0, 1.0)
    weighted = parse_search_request(
        {
            "query": "a",
            "ranking_options": {"hybrid_search": {"embedding_weight": 0.7, "text_weight": 0.3}},
        }
    )
    assert (weighted.mode, weighted.weights) == ("hybrid", (0.7, 0.3))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "query"),
        ({"query": "  "}, "query"),
        ({"query": ["a", 1]}, "query"),
        ({"query": []}, "query"),
        ({"query": ["a", " "]}, "query"),
        ({"query": ["a"] * 11}, "query"),
        ({"query": ["a" * 3000, "b" * 3000]}, "query"),
        ({"query": "a", "max_num_results": 0}, "max_num_results"),
        ({"query": "a", "max_num_results": 51}, "max_num_results"),
        ({"query": "a", "max_num_results": True}, "max_num_results"),
        ({"query": "a", "filters": {"type": "eq", "key": "k"}}, "filters"),
        (
            {"query": "a", "ranking_options": {"score_threshold": 1.5}},
            "ranking_options.score_threshold",
        ),
        ({"query": "a", "ranking_options": {"ranker": "bm25"}}, "ranking_options.ranker"),
        ({"query": "a", "ranking_options": {"hybrid_search": 1}}, "ranking_options.hybrid_search"),
        (
            {"query": "a", "ranking_options": {"hybrid_search": {"embedding_weight": 1}}},
            "ranking_options.hybrid_search.text_weight",
        ),
        (
            {
                "query": "a",
                "ranking_options": {"hybrid_search": {"embedding_weight": -1, "text_weight": 1}},
            },
            "ranking_options.hybrid_search.embedding_weight",
        ),
        (
            {
                "query": "a",
                "ranking_options": {"hybrid_search": {"embedding_weight": 0, "text_weight": 0}},
            },
            "ranking_options.hybrid_search",
        ),
        (
            {
                "query": "a",
                "ranking_options": {
                    "hybrid_search": {"embedding_weight": 1, "text_weight": 1, "bm25": 1}
                },
            },
            "ranking_options.hybrid_search.bm25",
        ),
        ({"query": "a", "rewrite_query": "yes"}, "rewrite_query"),
        ({"query": "a", "bogus": 1}, "bogus"),  # refused, as OpenAI does, not ignored
    ],
)
def test_bad_bodies_name_the_field(body, param):
    with pytest.raises(APIError) as caught:
        parse_search_request(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_page_parses_as_openai_results():
    hits = [Hit("vs_1", "file-a", "a.pdf", 0, "Whales eat krill.", {"topic": "ocean"}, 0.9)]
    page = search_results_page(["blue", "whales"], hits)
    assert page["object"] == "vector_store.search_results.page"
    assert page["search_query"] == ["blue", "whales"]  # OpenAI's: an array of strings
    (result,) = [VectorStoreSearchResponse.model_validate(d) for d in page["data"]]
    assert (result.file_id, result.filename, result.score) == ("file-a", "a.pdf", 0.9)
    assert result.content[0].text == "Whales eat krill."
    assert result.attributes == {"topic": "ocean"}
