"""`POST /v1/vector_stores/{id}/search`: the request body's parsing and the results page.

The route itself is wired with the vector store routes; this module is its boundary:
`parse_search_request` turns the body into the index's `SearchRequest` fields (a 400
naming the field for anything wrong) and `search_results_page` formats the hits as
OpenAI's `vector_store.search_results.page`. A `query` may be several queries: each is
searched and the hits merged (`VectorStoreService.search_stores`), and the page's
`search_query` lists them, as OpenAI's does (an array of strings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orchestrator.retrieval.filters import Filter, parse_filter
from orchestrator.retrieval.index import Hit, SearchMode, ranker_mode
from server.errors import invalid, known_fields

MAX_RESULTS = 50
MAX_QUERY_CHARS = 4096  # all of a request's queries together
MAX_QUERIES = 10  # each is embedded and searched


@dataclass(frozen=True)
class SearchOptions:
    queries: list[str]
    filters: Filter | None
    max_num_results: int
    score_threshold: float
    mode: SearchMode
    weights: tuple[float, float]  # hybrid's (vector, text) weights


def _queries(value: Any) -> list[str]:
    """`query`: a string, or an array of 1 to MAX_QUERIES strings; none of them blank."""
    queries = [value] if isinstance(value, str) else value
    if (
        not isinstance(queries, list)
        or not 1 <= len(queries) <= MAX_QUERIES
        or not all(isinstance(q, str) and q.strip() for q in queries)
    ):
        raise invalid(
            f"query must be a non-empty string or an array of 1 to {MAX_QUERIES} non-empty strings",
            param="query",
        )
    if sum(len(q) for q in queries) > MAX_QUERY_CHARS:
        raise invalid(f"query must be at most {MAX_QUERY_CHARS} characters", param="query")
    return queries


def parse_max_results(value: Any, param: str = "max_num_results") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RESULTS:
        raise invalid(f"{param} must be an integer from 1 to {MAX_RESULTS}", param=param)
    return value


def parse_filters(value: Any, param: str = "filters") -> Filter | None:
    if value is None:
        return None
    try:
        return parse_filter(value, param)
    except ValueError as exc:
        raise invalid(str(exc), param=param) from None


@dataclass(frozen=True)
class Ranking:
    """`ranking_options`, checked: `weights` are `hybrid_search`'s (embedding, text)
    weights, None where not given (hybrid fusion then weighs both lists equally)."""

    score_threshold: float
    ranker: str
    weights: tuple[float, float] | None

    @property
    def mode(self) -> SearchMode:
        return ranker_mode(self.ranker)


def _hybrid_weights(value: Any, param: str) -> tuple[float, float] | None:
    """`hybrid_search`: `{"embedding_weight", "text_weight"}`, each a number >= 0, not
    both 0 (a list weighted 0 is left out of the fusion)."""
    if value is None:
        return None
    known_fields(value, {"embedding_weight", "text_weight"}, param)
    weights = []
    for key in ("embedding_weight", "text_weight"):
        weight = value.get(key)
        if (
            not isinstance(weight, int | float)
            or isinstance(weight, bool)
            or not 0 <= weight < math.inf
        ):
            raise invalid(f"{param}.{key} must be a finite number >= 0", param=f"{param}.{key}")
        weights.append(float(weight))
    if not any(weights):
        raise invalid(f"{param} must weigh one of its rankings above 0", param=param)
    return weights[0], weights[1]


def parse_ranking(value: Any, param: str = "ranking_options") -> Ranking:
    ranking = value or {}
    known_fields(ranking, {"ranker", "score_threshold", "hybrid_search"}, param)
    threshold = ranking.get("score_threshold")
    threshold = 0.0 if threshold is None else threshold
    if (
        not isinstance(threshold, int | float)
        or isinstance(threshold, bool)
        or not 0.0 <= threshold <= 1.0
    ):
        raise invalid(
            f"{param}.score_threshold must be a number from 0 to 1",
            param=f"{param}.score_threshold",
        )
    ranker = ranking.get("ranker") or "auto"
    if ranker not in ("auto", "default-2024-11-15", "none"):
        raise invalid(
            f"{param}.ranker must be 'auto', 'default-2024-11-15' or 'none'",
            param=f"{param}.ranker",
        )
    weights = _hybrid_weights(ranking.get("hybrid_search"), f"{param}.hybrid_search")
    return Ranking(float(threshold), ranker, weights)


SEARCH_FIELDS = frozenset(
    {"query", "filters", "max_num_results", "ranking_options", "rewrite_query"}
)


def parse_search_request(body: Any) -> SearchOptions:
    known_fields(body, SEARCH_FIELDS)
    queries = _queries(body.get("query"))
    limit = parse_max_results(body.get("max_num_results", 10))
    filters = parse_filters(body.get("filters"))
    ranking = parse_ranking(body.get("ranking_options"))
    if not isinstance(body.get("rewrite_query", False), bool):
        raise invalid("rewrite_query must be a boolean", param="rewrite_query")
    return SearchOptions(
        queries,
        filters,
        limit,
        ranking.score_threshold,
        ranking.mode,
        ranking.weights or (1.0, 1.0),
    )


def search_results_page(queries: list[str], hits: list[Hit]) -> dict:
    return {
        "object": "vector_store.search_results.page",
        "search_query": queries,
        "data": [
            {
                "file_id": h.file_id,
                "filename": h.filename,
                "score": h.score,
                "attributes": h.attributes,
                "content": [{"type": "text", "text": h.text}],
            }
            for h in hits
        ],
        "has_more": False,
        "next_page": None,
    }
