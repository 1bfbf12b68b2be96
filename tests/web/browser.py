"""Headless Chromium for the page's tests: Debian's `chromium` driven by Playwright (PyPI),
which never downloads a browser of its own here. Without either, the tests are skipped,
unless TOKENMILL_REQUIRE_BROWSER=1 (set by .ci/run) makes that a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> Path:
    """Debian's Chromium, or a skip (a failure under CI) when it or Playwright is missing.
    Called at import, so that a module without a browser does not start its server."""
    found = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright is not installed (pip install playwright)")
    if found is None:
        _missing("Chromium is not installed (apt-get install chromium)")
    return Path(found)


def _missing(message: str) -> None:
    if os.environ.get("TOKENMILL_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)
