"""Noticing that a client went away while its request is still being worked on.

After the request body is read, the ASGI `receive` channel only ever reports
`http.disconnect`, so awaiting it alongside the work tells us when to stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run `work`, cancelling it if the client disconnects first (then return None).

    Without this a non-streaming request whose client gave up would keep its batch
    slot and KV blocks until it finished generating for nobody.
    """
    job = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return job.result() if job.done() else None
    finally:
        job.cancel()
        watcher.cancel()
        await asyncio.gather(job, watcher, return_exceptions=True)
