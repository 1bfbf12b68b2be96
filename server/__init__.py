"""tokenmill's OpenAI-compatible HTTP server (a Starlette app run by uvicorn).

`build_app(engine, config, product)` is the whole public surface; `engine.serve` wires
it to a real `AsyncLLM` and the orchestrator's `Product`. Routes parse, call the
orchestrator or the engine's public API (`engine.client`), and format.

The public names are imported lazily (as `engine`'s are), so that importing one light
module, as a preparation process started outside `engine.serve` does
(`server.prep_process`), does not import the whole app: torch, the orchestrator.
"""

from engine.lazy_exports import lazy_getattr

_EXPORTS = {
    "ServerConfig": "server.state",
    "build_app": "server.app",
    "in_flight": "server.app",
    "start_draining": "server.app",
    "start_preparation": "server.app",
    "stop_preparation": "server.app",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
