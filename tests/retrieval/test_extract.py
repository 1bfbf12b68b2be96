"""Text extraction for each supported file type, and clear refusals for the rest."""

from __future__ import annotations

import io

import pytest
from pypdf import PdfReader, PdfWriter

from orchestrator.retrieval.extract import (
    ExtractionError,
    UnsupportedFile,
    extract_text,
    file_kind,
)
from tests.retrieval.documents import pdf_bytes


def test_plain_text_and_markdown_keep_their_text():
    assert extract_text("caf\u00e9 au lait\n".encode(), "notes.txt") == "caf\u00e9 au lait\n"
    assert extract_text(b"\xef\xbb\xbfbom", "a.TXT") == "bom"
    # UTF-16 and UTF-32 with their byte-order marks, as Windows editors save "Unicode"
    for encoding in ("utf-16", "utf-16-be", "utf-32"):
        data = "caf\u00e9".encode(encoding)
        if encoding == "utf-16-be":
            data = b"\xfe\xff" + data
        assert extract_text(data, "notes.txt") == "caf\u00e9"
    markdown = "# Title\n\nSome *emphasis* and `code`.\n"
    assert extract_text(markdown.encode(), "README.md") == markdown


def test_html_drops_scripts_styles_and_markup():
    html = """<!doctype html><html><head><title>Guide</title>
    <style>body { color: red }</style><script>var secret = "do not index";</script></head>
    <body><h1>Install</h1><p>Run <b>make</b>&nbsp;now &amp; wait.</p>
    <ul><li>one</li><li>two</li></ul><noscript>enable js</noscript></body></html>"""
    text = extract_text(html.encode(), "guide.html")
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
    text = extract_text(
        pdf_bytes(["First page about whales", "Second page about krill"]), "report.pdf"
    )
    assert "First page about whales" in text
    assert "Second page about krill" in text
    assert text.index("whales") < text.index("krill")


def test_type_falls_back_on_content_type():
    assert file_kind("upload", "text/html; charset=utf-8") == "html"
    assert extract_text(b"<p>hi</p>", "upload", "text/html") == "hi"


@pytest.mark.parametrize("name", ["slides.pptx", "photo.png", "archive", "doc.docx"])
def test_other_types_are_refused_by_name(name):
    with pytest.raises(UnsupportedFile, match="unsupported file type") as caught:
        extract_text(b"\x89PNG....", name)
    assert "PDF" in str(caught.value)  # says what is supported


def test_unreadable_files_say_why():
    with pytest.raises(ExtractionError, match="not UTF-8"):
        extract_text(b"\x80bad", "notes.txt")
    with pytest.raises(ExtractionError, match="invalid utf-16"):
        extract_text(b"\xff\xfe\x00ba", "notes.txt")  # an odd byte after the mark
    with pytest.raises(ExtractionError, match="PDF could not be read"):
        extract_text(b"%PDF-1.4 garbage", "broken.pdf")
    with pytest.raises(ExtractionError, match="no extractable text"):
        extract_text(pdf_bytes([""]), "scan.pdf")


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
    text = extract_text(_encrypted("", algorithm), "locked.pdf")
    assert "Minutes of the locked meeting" in text
    with pytest.raises(ExtractionError, match="encrypted with a password"):
        extract_text(_encrypted("secret", algorithm), "locked.pdf")
