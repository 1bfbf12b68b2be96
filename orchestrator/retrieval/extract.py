"""A file's bytes -> its text, for the types file_search indexes: plain text (and source
code), Markdown, HTML and PDF.

The type is chosen by the file name's extension (what OpenAI goes by), falling back on
the declared content type. Anything else is refused with `UnsupportedFile`, and a file
that claims a supported type but cannot be read raises `ExtractionError`; both messages
are written for the file's `last_error`, so they say what to do.
"""

from __future__ import annotations

import codecs
import io
import re
from html.parser import HTMLParser
from pathlib import PurePosixPath


class ExtractionError(ValueError):
    """A supported file whose text could not be read."""


class UnsupportedFile(ExtractionError):
    """A file of a type this server does not index."""


TEXT_EXTENSIONS = frozenset(
    {
        ".txt",
        ".text",
        ".log",
        ".csv",
        ".tsv",
        ".json",
        ".jsonl",
        ".yaml",
        ".yml",
        ".toml",
        ".xml",
        ".rst",
        ".tex",
        ".py",
        ".js",
        ".ts",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".java",
        ".go",
        ".rs",
        ".rb",
        ".php",
        ".sh",
        ".css",
        ".sql",
    }
)
MARKDOWN_EXTENSIONS = frozenset({".md", ".markdown"})
HTML_EXTENSIONS = frozenset({".html", ".htm", ".xhtml"})
PDF_EXTENSIONS = frozenset({".pdf"})
_BY_CONTENT_TYPE = {
    "text/plain": "text",
    "text/markdown": "markdown",
    "text/html": "html",
    "application/pdf": "pdf",
}


def file_kind(filename: str, content_type: str | None = None) -> str:
    """ "text", "markdown", "html" or "pdf"; raises `UnsupportedFile` for anything else."""
    suffix = PurePosixPath(filename.lower()).suffix
    for kind, extensions in (
        ("text", TEXT_EXTENSIONS),
        ("markdown", MARKDOWN_EXTENSIONS),
        ("html", HTML_EXTENSIONS),
        ("pdf", PDF_EXTENSIONS),
    ):
        if suffix in extensions:
            return kind
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared in _BY_CONTENT_TYPE:
        return _BY_CONTENT_TYPE[declared]
    raise UnsupportedFile(
        f"unsupported file type {suffix or '(no extension)'!r} for {filename!r}: file_search "
        "indexes text, Markdown (.md), HTML (.html) and PDF (.pdf) files"
    )


def extract_text(data: bytes, filename: str, content_type: str | None = None) -> str:
    """The text of a file, ready for chunking."""
    kind = file_kind(filename, content_type)
    if kind == "pdf":
        return _pdf_text(data)
    text = _decode(data, filename)
    return html_text(text) if kind == "html" else text


# Byte-order marks of the encodings file_search reads besides UTF-8 (OpenAI's: UTF-8,
# UTF-16, ASCII). UTF-32's come first: its little-endian mark begins with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _decode(data: bytes, filename: str) -> str:
    """UTF-8 (with or without a byte-order mark), or UTF-16/32 marked as such: what
    Windows editors write as "Unicode"."""
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8-sig")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ExtractionError(
            f"{filename!r} is not UTF-8 or UTF-16 text (invalid {encoding} at byte "
            f"{exc.start}); convert it to UTF-8 and upload it again"
        ) from None


class _HTMLText(HTMLParser):
    """Collects an HTML document's visible text: script, style and similar contents are
    dropped, and block elements end lines so paragraphs do not run together."""

    HIDDEN = frozenset({"script", "style", "noscript", "template", "svg", "iframe", "object"})
    BLOCKS = frozenset(
        {
            "address",
            "article",
            "aside",
            "blockquote",
            "br",
            "dd",
            "div",
            "dl",
            "dt",
            "figcaption",
            "figure",
            "footer",
            "form",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "header",
            "hr",
            "li",
            "main",
            "nav",
            "ol",
            "p",
            "pre",
            "section",
            "table",
            "td",
            "th",
            "title",
            "tr",
            "ul",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self.hidden_depth += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden_depth = max(0, self.hidden_depth - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden_depth:
            self.parts.append(data)


def html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = (
        re.sub(r"[ \t\r\f\v\xa0]+", " ", line).strip() for line in "".join(parser.parts).split("\n")
    )
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractionError("the PDF is encrypted with a password; upload it unlocked")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ExtractionError):
            raise
        raise ExtractionError(f"the PDF could not be read ({exc}); is it a valid PDF?") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise ExtractionError(
            "the PDF has no extractable text (scanned pages would need OCR, "
            "which this server does not do)"
        )
    return text
