"""file_citation annotations: markers first, else the files the answer's words come from."""

from __future__ import annotations

from orchestrator.citations import file_citations
from orchestrator.tools.file_search import Source

SOURCES = [
    Source(1, "file_ice", "ice.txt", "Glaciers advance thirty metres a year."),
    Source(2, "file_ice", "ice.txt", "Moraines are left where glaciers melt."),
    Source(3, "file_bread", "bread.txt", "Feed the sourdough starter once a week."),
]


def _cited(text: str, question: str | None = "How fast do glaciers move?") -> list[tuple]:
    return [
        (a["file_id"], a["filename"], a["index"]) for a in file_citations(text, SOURCES, question)
    ]


def test_markers_cite_their_source_at_their_index():
    text = "Thirty metres a year [1], fed weekly 【3†bread.txt】 and [2]."
    assert _cited(text) == [
        ("file_ice", "ice.txt", text.index("[1]")),
        ("file_bread", "bread.txt", text.index("【3")),
        ("file_ice", "ice.txt", text.index("[2]")),
    ]


def test_markers_of_sources_never_shown_are_ignored():
    assert _cited("See [7] and [0].") == []  # then no words of a source either


def test_without_markers_the_files_holding_the_answers_words_are_cited():
    text = "About thirty metres each year."
    assert _cited(text) == [("file_ice", "ice.txt", len(text))]
    both = "Thirty metres a year; feed the starter weekly, once a week."
    assert {f for f, _, _ in _cited(both)} == {"file_ice", "file_bread"}


def test_words_echoed_from_the_question_are_no_evidence():
    assert _cited("Glaciers move.") == []  # both words are the question's
    assert _cited("I do not know.") == []
    assert file_citations("Thirty metres.", [], None) == []


def test_a_cjk_answer_cites_the_file_holding_its_words():
    """Chinese writes no spaces: the answer's words are its two-character terms, as the
    full-text index sees them, so the file it was written from is cited."""
    sources = [
        Source(1, "file_bj", "beijing.txt", "北京是中华人民共和国的首都，也是全国的政治中心。"),
        Source(2, "file_panda", "panda.txt", "大熊猫主要生活在四川的山区，以竹子为食。"),
    ]
    for answer, question, cited in [
        ("北京是中国的首都。", "中国的首都是哪里？", "file_bj"),
        ("大熊猫吃竹子。", "熊猫吃什么？", "file_panda"),
    ]:
        annotations = file_citations(answer, sources, question)
        assert [(a["file_id"], a["index"]) for a in annotations] == [(cited, len(answer))]
    assert file_citations("首都。", sources, "中国的首都是哪里？") == []  # echoed only
