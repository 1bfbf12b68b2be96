"""tokenmill's OpenAI-compatible HTTP server (a Starlette app run by uvicorn).

`build_app(engine, config, product)` is the whole public surface; `engine.serve` wires
it to a real `AsyncLLM` and the orchestrator's `Product`. Routes parse, call the
orchestrator or the engine's public API (`engine.client`), and format.
"""

from server.app import build_app, in_flight, start_draining, start_preparation, stop_preparation
from server.state import ServerConfig

__all__ = [
    "ServerConfig",
    "build_app",
    "in_flight",
    "start_draining",
    "start_preparation",
    "stop_preparation",
]
