"""The names clients give their files: checked once, for uploads and inline input files."""

from __future__ import annotations

import re

from server.errors import invalid

MAX_FILENAME_BYTES = 255  # what Linux and macOS file systems take

# Characters refused in a file name: control characters (NUL, which PostgreSQL cannot
# store, CR, LF, ESC...), and the bidirectional overrides and isolates that make a name
# display as another (`invoice\u202etxt.exe` shows as `invoiceexe.txt`).
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


# Path separators: the slash, and the backslash, Windows' (a name, not a path, is kept).
SEPARATORS = "/\\"


def checked_filename(name: str, param: str) -> str:
    """`name`, or a 400 naming `param` when it is no name a file may have: one holding a
    character `_REFUSED` holds or a path separator, one of dots and spaces only (`.` and
    `..` name directories: a client saving the file under its name would write its
    directory or the parent), or one longer than MAX_FILENAME_BYTES. An uploaded file's,
    or an input file's given inline."""
    if not name.replace(".", "").strip():
        raise invalid(
            "the file's name is empty or made of dots and spaces only; a file name must "
            "hold another character",
            param,
        )
    if any(separator in name for separator in SEPARATORS):
        raise invalid(
            "the file's name holds a path separator (/ or \\); give the name alone", param
        )
    bad = _REFUSED.search(name)
    if bad:
        raise invalid(
            f"the file's name holds the character U+{ord(bad.group()):04X}, which a file name "
            "may not hold (control characters, bidirectional overrides)",
            param,
        )
    if len(name.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise invalid(f"the file's name is longer than {MAX_FILENAME_BYTES} bytes", param)
    return name
