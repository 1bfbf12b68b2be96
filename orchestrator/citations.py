"""`file_citation` annotations for an answer written from file_search sources.

The model is shown numbered sources (`[1] report.pdf (file-…)`) and asked to cite them
as `[n]`. Two ways an answer's text gets its citations, in this order:

1. **Markers.** Every `[n]` or `【n】` (also `【n†…】`, OpenAI's form) whose number is a
   source shown in this response becomes a citation of that source's file, at the
   marker's index in the text. The marker stays in the text (it was streamed already).
2. **Lexical support**, only when the answer has no valid marker (a small model rarely
   writes them): a shown file is cited when the answer's content words that are not in
   the question (words the answer brought, not echoed) appear in that file's shown
   chunks: at least two of them, or the only one (words as full-text search sees them:
   CJK as two-character terms). The citation's index is the end of the text. An answer
   that uses no word of any source cites nothing.

Either way only files whose chunks the model was shown can be cited, each at most once
per index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from orchestrator.retrieval.index import STOPWORDS, is_cjk, keyword_words
from orchestrator.tools.file_search import Source

_MARKER = re.compile(r"【(\d{1,3})(?:†[^】]{0,200})?】|\[(\d{1,3})\]")


def _content_words(text: str) -> set[str]:
    """The words of `text` that can show where an answer came from: the words full-text
    search matches (`keyword_words`: CJK as two-character terms), less stopwords and
    words of one or two letters, which say too little (a CJK term is one or two
    characters by construction, so those stay)."""
    return {
        w
        for w in keyword_words(text)
        if w not in STOPWORDS and (len(w) > 2 or w.isdigit() or is_cjk(w))
    }


def _citation(source: Source, index: int) -> dict:
    return {
        "type": "file_citation",
        "file_id": source.file_id,
        "filename": source.filename,
        "index": index,
    }


def _marker_citations(text: str, by_number: dict[int, Source]) -> list[dict]:
    citations, seen = [], set()
    for match in _MARKER.finditer(text):
        source = by_number.get(int(match.group(1) or match.group(2)))
        if source is not None and (source.file_id, match.start()) not in seen:
            seen.add((source.file_id, match.start()))
            citations.append(_citation(source, match.start()))
    return citations


def _supported_files(text: str, question: str | None, sources: Sequence[Source]) -> list[Source]:
    """The first shown source of each file whose chunks hold the answer's own words."""
    novel = _content_words(text) - _content_words(question or "")
    needed = min(2, len(novel))
    if not needed:
        return []
    words_by_file: dict[str, set[str]] = {}
    first: dict[str, Source] = {}
    for source in sources:
        words_by_file.setdefault(source.file_id, set()).update(_content_words(source.text))
        first.setdefault(source.file_id, source)
    return [first[f] for f, words in words_by_file.items() if len(novel & words) >= needed]


def file_citations(text: str, sources: Sequence[Source], question: str | None) -> list[dict]:
    """The annotations of an answer `text` written after `sources` were shown."""
    if not sources or not text.strip():
        return []
    citations = _marker_citations(text, {s.number: s for s in sources})
    if citations:
        return citations
    return [_citation(s, len(text)) for s in _supported_files(text, question, sources)]
