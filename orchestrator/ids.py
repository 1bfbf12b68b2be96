"""Object ids shaped like OpenAI's (`resp_…`, `conv_…`, `msg_…`, `fc_…`): a type prefix and
128 random bits, never sequential, so an id reveals neither order nor volume; and `Id`,
the store's column type for them."""

from __future__ import annotations

import uuid

from sqlalchemy import String, TypeDecorator


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Id(TypeDecorator):
    """An object id in the store, as `VARCHAR(64)`.

    No stored id holds a NUL: the server makes every one (`new_id`, or a fixed name such as
    `user_local`). A NUL can still come in an id a client asks for (a path, a list cursor, a
    body field such as `previous_response_id`), and PostgreSQL refuses any text parameter
    that holds one. Such a value is bound with U+FFFD in place of each NUL, which no id
    holds either: the lookup finds nothing, and the client gets the 404 of any unknown id,
    on either database."""

    impl = String(64)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> str | None:
        return value.replace("\x00", "\ufffd") if value is not None else None
