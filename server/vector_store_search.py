"""`POST /v1/vector_stores/{id}/search`: the request body's parsing and the results page.

The route itself is wired with the vector store routes; this module is its boundary:
`parse_search_request` turns the body into the index's `SearchRequest` fields (a 400
naming the field for anything wrong) and `search_results_page` formats the hits as
OpenAI's `vector_store.search_results.page`. A `query` may be several queries: each is
searched and the hits merged (`VectorStoreService.search_stores`), and the page's
`search_query` lists them, as OpenAI's does (an array of strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.retrieval.filters import Filter, parse_filter
from orchestrator.retrieval.index import Hit, SearchMode
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


def parse_ranking(value: Any, param: str = "ranking_options") -> tuple[float, str]:
    """`ranking_options`: its score_threshold and its ranker ("none" asks for no
    re-ranking: the plain vector ranking; "auto" and "default-2024-11-15" are hybrid)."""
    ranking = value or {}
    if not isinstance(ranking, dict):
        raise invalid(f"{param} must be an object", param=param)
    for key in ranking:
        if key not in ("ranker", "score_threshold") and ranking[key] is not None:
            raise invalid(
                f"{param}.{key} is not supported (hybrid search fuses vector and "
                "text rankings with equal weights)",
                param=f"{param}.{key}",
            )
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
    return float(threshold), ranker


SEARCH_FIELDS = frozenset(
    {"query", "filters", "max_num_results", "ranking_options", "rewrite_query"}
)


def parse_search_request(body: Any) -> SearchOptions:
    known_fields(body, SEARCH_FIELDS)
    queries = _queries(body.get("query"))
    limit = parse_max_results(body.get("max_num_results", 10))
    filters = parse_filters(body.get("filters"))
    threshold, ranker = parse_ranking(body.get("ranking_options"))
    if not isinstance(body.get("rewrite_query", False), bool):
        raise invalid("rewrite_query must be a boolean", param="rewrite_query")
    mode: SearchMode = "vector" if ranker == "none" else "hybrid"
    return SearchOptions(queries, filters, limit, threshold, mode)


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
