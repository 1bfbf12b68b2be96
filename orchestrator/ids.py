"""Object ids shaped like OpenAI's (`resp_…`, `conv_…`, `msg_…`, `fc_…`): a type prefix and
128 random bits, never sequential, so an id reveals neither order nor volume."""

from __future__ import annotations

import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
