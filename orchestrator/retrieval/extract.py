"""A file's bytes -> its text, for the types file_search indexes: plain text (and source
code), Markdown, HTML and PDF.

The type is chosen by the file name's extension (what OpenAI goes by), falling back on
the declared content type. Anything else is refused with `UnsupportedFile`, and a file
that claims a supported type but cannot be read raises `ExtractionError`; both messages
are written for the file's `last_error`, so they say what to do.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import re
import sys
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
        f"unsupported file type {suffix or '(no extension)'!r} for {filename!r}: this server "
        "reads text, Markdown (.md), HTML (.html) and PDF (.pdf) files"
    )


# A PDF or an HTML file is read in a process of its own, within these bounds: a small
# file can hold work without end (2,000 pages sharing one content stream of 20,000
# operators took pypdf half an hour; html.parser takes time quadratic in the length of
# some malformed markup: 40 KB of `<a <` took 12 s, so 2 MB would take hours), which a
# thread could neither stop nor give back at shutdown.
READER_SECONDS = 120
READER_MEMORY_BYTES = 4 << 30
# The most text a PDF's reader gives back: a file search indexes at most ~5 million tokens
# of a file, about 20 million characters (ingest.py refuses more before tokenizing it), and
# no prompt holds more. A small PDF can expand far past it (a 10 KB one held 10 MB of text
# a page, read at ~2 MB/s), so the reader stops there rather than spend its READER_SECONDS
# and the server's memory on more.
MAX_TEXT_CHARACTERS = 20_000_000
_READ_AS = {"pdf": "PDF", "html": "HTML"}  # the kinds the reader process reads


async def extract_text(data: bytes, filename: str, content_type: str | None = None) -> str:
    """The text of a file, ready for chunking, read off the event loop: a PDF's and an
    HTML file's in a subprocess that a cancellation or READER_SECONDS kills (an HTML
    file's bytes decoded first, on a thread, as plain text is)."""
    kind = file_kind(filename, content_type)
    if kind == "pdf":
        return await _isolated_text(kind, data)
    text = await asyncio.to_thread(_decode, data, filename)
    return await _isolated_text(kind, text.encode()) if kind == "html" else text


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
    Windows editors write as "Unicode". Text holding NUL is refused: UTF-16 without its
    mark (every other byte of Latin text is NUL) or a binary file decodes as valid UTF-8,
    and would be indexed as that mojibake (PostgreSQL cannot store NUL at all)."""
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8-sig")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ExtractionError(
            f"{filename!r} is not UTF-8 or UTF-16 text (invalid {encoding} at byte "
            f"{exc.start}); convert it to UTF-8 and upload it again"
        ) from None
    if "\x00" in text:
        raise ExtractionError(
            f"{filename!r} holds NUL characters, so it is not UTF-8 text (UTF-16 without "
            "a byte-order mark, or not text at all); convert it to UTF-8 and upload it again"
        )
    return text


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


async def _isolated_text(kind: str, data: bytes) -> str:
    """`_reader_text` in this file run as a script (isolated: no package, so no engine, is
    imported) for `kind` ("pdf", or "html" of UTF-8 bytes): the bytes on its stdin, the
    text on its stdout, or an ExtractionError's message there (exit status 2). Its stderr
    is not read: pypdf logs what it repairs on the way there ("EOF marker not found"),
    which is no part of the file's last_error."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        __file__,
        kind,
        str(MAX_TEXT_CHARACTERS),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(data), READER_SECONDS)
    except TimeoutError:
        raise ExtractionError(
            f"reading the {_READ_AS[kind]}'s text took longer than {READER_SECONDS} s; split "
            "it into smaller files"
        ) from None
    finally:
        if process.returncode is None:  # timed out, or the ingestion was cancelled
            process.kill()
            await process.wait()
    if process.returncode == 0:
        return out.decode()
    if process.returncode == 2:
        raise ExtractionError(out.decode(errors="replace").strip())
    raise ExtractionError(
        f"the {_READ_AS[kind]} file could not be read: its reader ran out of memory or "
        f"failed (exit status {process.returncode})"
    )


def _reader_text(kind: str, data: bytes, most: int) -> str:
    """What the reader process makes of its input (`_isolated_text`): a PDF's text of at
    most `most` characters (an HTML file's is no longer than the file)."""
    return _pdf_text(data, most) if kind == "pdf" else html_text(data.decode())


def _pdf_text(data: bytes, most: int) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractionError("the PDF is encrypted with a password; upload it unlocked")
        pages, length = [], 0
        for page in reader.pages:
            pages.append((page.extract_text() or "").strip())
            length += len(pages[-1])
            if length > most:
                raise ExtractionError(
                    f"the PDF has more than {most:,} characters of text, more than a file "
                    "may have indexed; split it into smaller files"
                )
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ExtractionError):
            raise
        cause = " ".join(str(exc).split())  # pypdf's messages may end in a newline
        raise ExtractionError(f"the PDF could not be read ({cause}); is it a valid PDF?") from None
    text = "\n\n".join(page for page in pages if page)
    if not text:
        raise ExtractionError(
            "the PDF has no extractable text (scanned pages would need OCR, "
            "which this server does not do)"
        )
    return text


def _main() -> None:
    """The reader's process (see `_isolated_text`), at low priority and within
    READER_MEMORY_BYTES of address space; its arguments are the kind of file it reads and
    the most characters of text it may give back."""
    import os
    import resource

    os.nice(10)
    resource.setrlimit(resource.RLIMIT_AS, (READER_MEMORY_BYTES, READER_MEMORY_BYTES))
    data = sys.stdin.buffer.read()
    try:
        text = _reader_text(sys.argv[1], data, int(sys.argv[2]))
    except ExtractionError as exc:
        sys.stdout.write(str(exc))
        sys.exit(2)
    sys.stdout.buffer.write(text.encode(errors="replace"))  # a lone surrogate: "?"


if __name__ == "__main__":
    _main()
