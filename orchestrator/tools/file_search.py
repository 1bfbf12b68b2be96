"""`file_search`: search the user's vector stores and show the model what was found.

Unlike the other built-ins, this tool is made per request: OpenAI's declaration
(`{"type": "file_search", "vector_store_ids": [...], "max_num_results", "filters",
"ranking_options"}`) fixes where it searches, and it acts for the request's owner, so
another user's store is never read. The model calls it as a function `file_search` with
`{"queries": [...]}` (the call's grammar keeps even a small model's call valid); the
agent loop turns the call into a `file_search_call` item.

What is searched: the model's queries and the user's latest message, each embedded and
searched (hybrid by default), the hits merged by their best score. A small model's query
is often a clipped or drifted copy of the question; the question itself is always a
sound query for the turn that asked it, and searching both costs one more embedding.

What the model reads: each retrieved chunk, in rank order while a character budget
lasts, numbered `[n]` and labelled with its file's name and id, the chunk's text framed
by `spotlight` as untrusted data (capped, delimited by a nonce). The sources shown are
kept (`FileSearch.sources`) so the answer's citations can point at them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from orchestrator.errors import InvalidRequestError, NotFoundError
from orchestrator.retrieval.filters import Filter
from orchestrator.retrieval.index import Hit, SearchMode, ranker_mode
from orchestrator.tools.base import ToolError, ToolOutput
from orchestrator.untrusted import plain_label, spotlight
from orchestrator.vector_stores import Search

FILE_SEARCH = "file_search"
DEFAULT_MAX_RESULTS = 10
MAX_QUERIES = 4  # the model's, per call
MAX_QUERY_CHARS = 300
CHUNK_LIMIT = 3_000  # characters of one chunk in the prompt
MIN_SHOWN_CHARS = 200  # a budget left smaller than this shows no further chunk


@dataclass
class FileSearchTool:
    """A request's `file_search` declaration, validated (server/responses_protocol.py)."""

    vector_store_ids: list[str]
    max_num_results: int = DEFAULT_MAX_RESULTS
    filters: Filter | None = None
    raw_filters: dict | None = None  # as given, echoed in the response's `tools`
    score_threshold: float = 0.0
    ranker: str = "auto"  # "none": vector similarity alone; otherwise hybrid
    # `ranking_options.hybrid_search`'s (embedding, text) weights; None: as given, none.
    hybrid_weights: tuple[float, float] | None = None
    name: str = FILE_SEARCH

    @property
    def mode(self) -> SearchMode:
        return ranker_mode(self.ranker)

    def as_dict(self) -> dict:
        ranking: dict = {"ranker": self.ranker, "score_threshold": self.score_threshold}
        if self.hybrid_weights is not None:
            embedding_weight, text_weight = self.hybrid_weights
            ranking["hybrid_search"] = {
                "embedding_weight": embedding_weight,
                "text_weight": text_weight,
            }
        return {
            "type": "file_search",
            "vector_store_ids": self.vector_store_ids,
            "filters": self.raw_filters,
            "max_num_results": self.max_num_results,
            "ranking_options": ranking,
        }


class FileSearchBackend(Protocol):
    """What the tool needs from the vector stores (`VectorStoreService`)."""

    async def use(self, owner: str, vector_store_id: str) -> None: ...

    async def search_stores(
        self, owner: str, vector_store_ids: Sequence[str], searches: Sequence[Search]
    ) -> list[Hit]: ...


@dataclass(frozen=True)
class Source:
    """A chunk shown to the model, under its number `[n]`."""

    number: int
    file_id: str
    filename: str
    text: str


@dataclass
class FileSearchOutput(ToolOutput):
    queries: list[str] = field(default_factory=list)  # what was searched, in order
    # OpenAI's file_search_call `results`: None unless the request includes them.
    results: list[dict] | None = None


def result_dict(hit: Hit) -> dict:
    return {
        "file_id": hit.file_id,
        "filename": hit.filename,
        "score": hit.score,
        "text": hit.text,
        "attributes": hit.attributes,
    }


def _model_queries(arguments: dict) -> list[str]:
    queries = arguments.get("queries", [])
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise ToolError("the argument 'queries' must be an array of strings")
    if len(queries) > MAX_QUERIES:
        raise ToolError(f"at most {MAX_QUERIES} queries per call")
    return [q.strip()[:MAX_QUERY_CHARS] for q in queries if q.strip()]


def _distinct(queries: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    kept = []
    for query in queries:
        key = " ".join(query.lower().split())
        if key not in seen:
            seen.add(key)
            kept.append(query)
    return kept


def render_sources(
    hits: Sequence[Hit],
    first_number: int,
    budget: int,
    special_tokens: Iterable[str] = (),
    question: str | None = None,
) -> tuple[str, list[Source]]:
    """The text the model reads for `hits`, and the sources it shows (numbered from
    `first_number`): chunks in rank order while `budget` characters last, then the
    question again (a small model answers what it read last) and how to cite."""
    special = tuple(special_tokens)
    parts, sources = [], []
    left = budget
    for hit in hits:
        if left < MIN_SHOWN_CHARS:
            break
        number = first_number + len(sources)
        name = plain_label(hit.filename)  # a file's name is untrusted too
        framed = spotlight(
            hit.text, f"file {name}", limit=min(CHUNK_LIMIT, left), special_tokens=special
        )
        parts.append(f"[{number}] {name}, score {hit.score:.2f}:\n{framed}")
        sources.append(Source(number, hit.file_id, hit.filename, hit.text))
        left -= min(len(hit.text), CHUNK_LIMIT)
    if not parts:
        return "No matching text was found in the files.", []
    omitted = len(hits) - len(sources)
    note = f"\n({omitted} more results were not shown.)" if omitted else ""
    ask = (
        f"Question: {question}\nAnswer the question in one short sentence from the "
        "sources above, then write the number of the source you used in brackets, like "
        f"[{first_number}]."
        if question
        else "Answer from these sources when they are relevant, and cite each source you use "
        f"by its number in brackets, like [{first_number}]."
    )
    return "\n\n".join(parts) + note + "\n\n" + ask, sources


class FileSearch:
    """The `file_search` tool of one request, acting for `owner`."""

    name = FILE_SEARCH
    description = (
        "Search the user's uploaded files for passages relevant to the question. "
        "Returns numbered excerpts; cite them as [n]."
    )
    parameters: ClassVar[dict] = {
        "type": "object",
        "properties": {
            "queries": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_QUERIES,
                "items": {"type": "string", "maxLength": MAX_QUERY_CHARS},
                "description": "What to search for, as short questions or keywords.",
            }
        },
        "required": ["queries"],
        "additionalProperties": False,
    }

    def __init__(
        self,
        backend: FileSearchBackend,
        owner: str,
        config: FileSearchTool,
        question: str | None = None,
        include_results: bool = False,
        text_budget: int = 8_000,
        special_tokens: Iterable[str] = (),
    ) -> None:
        self.backend = backend
        self.owner = owner
        self.config = config
        self.question = question.strip()[: MAX_QUERY_CHARS * 4] if question else None
        self.include_results = include_results
        self.text_budget = text_budget
        self.special_tokens = tuple(special_tokens)
        self.sources: list[Source] = []  # every source shown in this response, numbered

    async def execute(self, arguments: dict, call_id: str) -> FileSearchOutput:
        queries = _distinct(
            [*_model_queries(arguments), *([self.question] if self.question else [])]
        )
        if not queries:
            raise ToolError("give at least one non-empty query in 'queries'")
        c = self.config
        searches = [
            Search(
                q,
                c.filters,
                c.max_num_results,
                c.score_threshold,
                c.mode,
                c.hybrid_weights or (1.0, 1.0),
            )
            for q in queries
        ]
        try:
            hits = await self.backend.search_stores(self.owner, c.vector_store_ids, searches)
        except (NotFoundError, InvalidRequestError) as exc:  # deleted or expired mid-turn
            raise ToolError(exc.message) from None
        text, shown = render_sources(
            hits, len(self.sources) + 1, self.text_budget, self.special_tokens, self.question
        )
        self.sources += shown
        results = [result_dict(h) for h in hits] if self.include_results else None
        return FileSearchOutput(text, [], queries, results)
