"""`python -m tests.server.faulty_serve [engine.serve options]`: the real server, whose engine
loop dies on cue (a request with the stop string `KILL`), for the test that checks what a
dead engine does to /health and to the process."""

from __future__ import annotations

import sys

from engine import async_llm
from engine.serve import main

KILL = "__kill_the_engine_loop__"
_drain_inbox = async_llm.AsyncLLM._drain_inbox


def _drain_inbox_or_die(self: async_llm.AsyncLLM) -> None:
    _drain_inbox(self)
    if any(KILL in r.params.stop for r in self.engine.requests.values()):
        raise RuntimeError("the engine loop was killed on purpose")


async_llm.AsyncLLM._drain_inbox = _drain_inbox_or_die

if __name__ == "__main__":
    sys.exit(main())
