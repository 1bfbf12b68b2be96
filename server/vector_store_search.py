"""`POST /v1/vector_stores/{id}/search`: the request body's parsing and the results page.

The route itself is wired with the vector store routes; this module is its boundary:
`parse_search_request` turns the body into the index's `SearchRequest` fields (a 400
naming the field for anything wrong) and `search_results_page` formats the hits as
OpenAI's `vector_store.search_results.page`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.retrieval.filters import Filter, parse_filter
from orchestrator.retrieval.index import Hit, SearchMode
from server.errors import invalid

MAX_RESULTS = 50
MAX_QUERY_CHARS = 4096


@dataclass(frozen=True)
class SearchOptions:
    query: str
    filters: Filter | None
    max_num_results: int
    score_threshold: float
    mode: SearchMode


def _query(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(q, str) for q in value):
        value = " ".join(value)
    if not isinstance(value, str) or not value.strip():
        raise invalid("query must be a non-empty string or array of strings", param="query")
    if len(value) > MAX_QUERY_CHARS:
        raise invalid(f"query must be at most {MAX_QUERY_CHARS} characters", param="query")
    return value


def parse_search_request(body: Any) -> SearchOptions:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    query = _query(body.get("query"))
    limit = body.get("max_num_results", 10)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_RESULTS:
        raise invalid(f"max_num_results must be an integer from 1 to {MAX_RESULTS}",
                      param="max_num_results")
    filters = None
    if body.get("filters") is not None:
        try:
            filters = parse_filter(body["filters"])
        except ValueError as exc:
            raise invalid(str(exc), param="filters") from None
    ranking = body.get("ranking_options") or {}
    if not isinstance(ranking, dict):
        raise invalid("ranking_options must be an object", param="ranking_options")
    threshold = ranking.get("score_threshold", 0.0)
    if (not isinstance(threshold, int | float) or isinstance(threshold, bool)
            or not 0.0 <= threshold <= 1.0):
        raise invalid("ranking_options.score_threshold must be a number from 0 to 1",
                      param="ranking_options.score_threshold")
    ranker = ranking.get("ranker", "auto")
    if ranker not in ("auto", "default-2024-11-15", "none"):
        raise invalid("ranking_options.ranker must be 'auto', 'default-2024-11-15' or 'none'",
                      param="ranking_options.ranker")
    if not isinstance(body.get("rewrite_query", False), bool):
        raise invalid("rewrite_query must be a boolean", param="rewrite_query")
    # "none" asks for no re-ranking: the plain vector ranking; otherwise hybrid.
    mode: SearchMode = "vector" if ranker == "none" else "hybrid"
    return SearchOptions(query, filters, limit, float(threshold), mode)


def search_results_page(query: str, hits: list[Hit]) -> dict:
    return {
        "object": "vector_store.search_results.page",
        "search_query": query,
        "data": [
            {"file_id": h.file_id, "filename": h.filename, "score": h.score,
             "attributes": h.attributes, "content": [{"type": "text", "text": h.text}]}
            for h in hits
        ],
        "has_more": False,
        "next_page": None,
    }
