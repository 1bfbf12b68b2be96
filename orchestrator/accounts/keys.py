"""API keys: high-entropy secrets shown once, stored only as SHA-256 digests.

A key is `sk-tm-` followed by 43 URL-safe characters (32 random bytes). 256 bits of
entropy make a plain SHA-256 safe to store (no salt or slow hash needed: nothing can be
guessed), and let a request's key be found by its digest with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "sk-tm-"


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def hint(secret: str) -> str:
    """What lists show of a key: its prefix and last four characters."""
    return f"{secret[: len(PREFIX) + 2]}...{secret[-4:]}"


def new_key_id() -> str:
    return f"key_{secrets.token_hex(12)}"
