"""tokenmill's OpenAI-compatible HTTP server (a Starlette app run by uvicorn).

`build_app(engine, config)` is the whole public surface; `engine.serve` wires it to a
real `AsyncLLM`. The server uses only the engine's public API (see `engine_client`).
"""

from server.app import build_app, in_flight, start_draining
from server.state import ServerConfig

__all__ = ["ServerConfig", "build_app", "in_flight", "start_draining"]
