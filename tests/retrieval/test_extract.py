"""Text extraction for each supported file type, and clear refusals for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import zlib
from pathlib import Path

import pytest
from pypdf import PdfReader, PdfWriter

from orchestrator.retrieval import extract as extract_module
from orchestrator.retrieval.extract import (
    ExtractionError,
    UnsupportedFile,
    extract_text,
    file_kind,
)
from tests.retrieval.documents import pdf_bytes


def extract(data: bytes, filename: str, content_type: str | None = None) -> str:
    return asyncio.run(extract_text(data, filename, content_type))


def test_plain_text_and_markdown_keep_their_text():
    assert extract("caf\u00e9 au lait\n".encode(), "notes.txt") == "caf\u00e9 au lait\n"
    assert extract(b"\xef\xbb\xbfbom", "a.TXT") == "bom"
    # UTF-16 and UTF-32 with their byte-order marks, as Windows editors save "Unicode"
    for encoding in ("utf-16", "utf-16-be", "utf-32"):
        data = "caf\u00e9".encode(encoding)
        if encoding == "utf-16-be":
            data = b"\xfe\xff" + data
        assert extract(data, "notes.txt") == "caf\u00e9"
    markdown = "# Title\n\nSome *emphasis* and `code`.\n"
    assert extract(markdown.encode(), "README.md") == markdown


def test_html_drops_scripts_styles_and_markup():
    html = """<!doctype html><html><head><title>Guide</title>
    <style>body { color: red }</style><script>var secret = "do not index";</script></head>
    <body><h1>Install</h1><p>Run <b>make</b>&nbsp;now &amp; wait.</p>
    <ul><li>one</li><li>two</li></ul><noscript>enable js</noscript></body></html>"""
    text = extract(html.encode(), "guide.html")
    assert "secret" not in text and "color" not in text and "enable js" not in text
    assert "<" not in text
    assert text.splitlines() == [
        "Guide",
        "",
        "Install",
        "",
        "Run make now & wait.",
        "",
        "one",
        "",
        "two",
    ]


def test_pdf_text_from_every_page():
    text = extract(pdf_bytes(["First page about whales", "Second page about krill"]), "report.pdf")
    assert "First page about whales" in text
    assert "Second page about krill" in text
    assert text.index("whales") < text.index("krill")


def test_type_falls_back_on_content_type():
    assert file_kind("upload", "text/html; charset=utf-8") == "html"
    assert extract(b"<p>hi</p>", "upload", "text/html") == "hi"


@pytest.mark.parametrize("name", ["slides.pptx", "photo.png", "archive", "doc.docx"])
def test_other_types_are_refused_by_name(name):
    with pytest.raises(UnsupportedFile, match="unsupported file type") as caught:
        extract(b"\x89PNG....", name)
    assert "PDF" in str(caught.value)  # says what is supported


def test_unreadable_files_say_why():
    with pytest.raises(ExtractionError, match="not UTF-8"):
        extract(b"\x80bad", "notes.txt")
    with pytest.raises(ExtractionError, match="invalid utf-16"):
        extract(b"\xff\xfe\x00ba", "notes.txt")  # an odd byte after the mark
    # valid UTF-8 only as mojibake: UTF-16 without its mark, NUL after every Latin letter
    with pytest.raises(ExtractionError, match="NUL characters"):
        extract("Volcanoes erupt".encode("utf-16-le"), "notes.txt")
    with pytest.raises(ExtractionError, match="NUL characters"):
        extract(b"<p>a\x00b</p>", "page.html")
    # The message is the reader's verdict alone: pypdf's log lines on the way ("EOF
    # marker not found") are not the file's last_error.
    with pytest.raises(ExtractionError) as caught:
        extract(b"%PDF-1.4 garbage", "broken.pdf")
    assert str(caught.value).startswith("the PDF could not be read (")
    assert "\n" not in str(caught.value)
    with pytest.raises(ExtractionError, match="no extractable text"):
        extract(pdf_bytes([""]), "scan.pdf")


def _encrypted(user_password: str, algorithm: str) -> bytes:
    reader = PdfReader(io.BytesIO(pdf_bytes(["Minutes of the locked meeting"])))
    writer = PdfWriter(clone_from=reader)
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-128", "AES-256"])
def test_encrypted_pdfs_open_without_a_password_or_say_they_need_one(algorithm):
    """Owner-password-only PDFs (common: they forbid printing) are read, whatever their
    cipher; a user password is a clear refusal, not a server error."""
    text = extract(_encrypted("", algorithm), "locked.pdf")
    assert "Minutes of the locked meeting" in text
    with pytest.raises(ExtractionError, match="encrypted with a password"):
        extract(_encrypted("secret", algorithm), "locked.pdf")


def _one_stream_many_pages(pages: int, operators: int) -> bytes:
    """A small PDF of much work: every page draws the same compressed content stream of
    `operators` text operators, which a reader parses again for each page."""
    stream = zlib.compress(b"BT /F1 12 Tf 10 10 Td (ab) Tj ET\n" * operators, 9)
    page = b"<< /Type /Page /Parent 2 0 R /Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
    kids = b" ".join(b"%d 0 R" % (5 + i) for i in range(pages))
    bodies = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
        *[page] * pages,
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(bodies, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(bodies) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    trailer = b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
    out += trailer % (len(bodies) + 1, xref)
    return bytes(out)


def _readers() -> list[int]:
    """This process's reader subprocesses (of PDF and HTML files) still alive."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            lines = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
            cmdline = (status.parent / "cmdline").read_bytes()
            if int(lines["PPid"]) == os.getpid() and b"retrieval/extract.py" in cmdline:
                found.append(int(lines["Pid"]))
    return found


def test_a_pdf_that_takes_too_long_is_refused_and_its_reader_killed(monkeypatch):
    """Such a file is `invalid` after READER_SECONDS, and a cancelled ingestion (the file or
    its store deleted, the server stopping) kills its reader at once."""
    bomb = _one_stream_many_pages(400, 20_000)
    monkeypatch.setattr(extract_module, "READER_SECONDS", 1)
    with pytest.raises(ExtractionError, match="longer than 1 s"):
        extract(bomb, "bomb.pdf")
    assert _readers() == []
    monkeypatch.setattr(extract_module, "READER_SECONDS", 600)

    async def cancel_midway() -> None:
        reading = asyncio.create_task(extract_text(bomb, "bomb.pdf"))
        await asyncio.sleep(1)
        assert _readers()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading

    asyncio.run(cancel_midway())
    assert _readers() == []


def test_html_whose_parsing_takes_too_long_is_refused_and_its_reader_killed(monkeypatch):
    """html.parser takes time quadratic in the length of some malformed markup (40 KB of
    `<a <` took 12 s, a 2 MB upload would take hours on a core the server could not get
    back): HTML is read in a reader process with the PDF's bounds. Its text is the same."""
    monkeypatch.setattr(extract_module, "READER_SECONDS", 1)
    with pytest.raises(ExtractionError, match="HTML's text took longer than 1 s"):
        extract(b"<a <" * 10_000, "page.html")
    assert _readers() == []
    assert extract(b"<p>caf\xc3\xa9 <b>au</b> lait</p>", "page.html") == "caf\u00e9 au lait"


def test_a_pdf_reader_stops_once_its_text_passes_what_a_file_may_have(monkeypatch):
    """A small PDF can expand into far more text than a file may have indexed (a 10 KB one
    held 10 MB of text per page): the reader stops there, after a few pages rather than
    at its time limit, and the server never holds more of it. Read whole, this file runs
    past the reader's 120 s; with its limit at 20 s, a reader that read on would be
    refused for its time, not for its text."""
    monkeypatch.setattr(extract_module, "MAX_TEXT_CHARACTERS", 30_000)
    monkeypatch.setattr(extract_module, "READER_SECONDS", 20)
    with pytest.raises(ExtractionError, match="more than 30,000 characters of text"):
        extract(_one_stream_many_pages(400, 5_000), "bomb.pdf")  # 10,000 a page
    assert _readers() == []
