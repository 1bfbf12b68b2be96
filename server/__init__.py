"""tokenmill's OpenAI-compatible HTTP server (a Starlette app run by uvicorn).

`build_app(engine, config, product)` is the whole public surface; `engine.serve` wires
it to a real `AsyncLLM` and the orchestrator's `Product`. The server uses only the
engine's public API (see `engine_client`).

The public names are imported lazily, so that the orchestrator can use the pure chat
format modules (`server.chat_prompt`, `server.tool_parser`) without importing the app,
which itself imports the orchestrator.
"""

from importlib import import_module

_EXPORTS = {
    "build_app": "server.app",
    "start_draining": "server.app",
    "in_flight": "server.app",
    "ServerConfig": "server.state",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
