"""What every handler needs: the engine, the settings, metrics and admission control."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache

from server.engine_client import EngineClient
from server.errors import APIError
from server.metrics import ServerMetrics


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    # Requests in flight beyond the engine's batch wait in its queue; past
    # max_running_requests + max_waiting_requests the server answers 429.
    max_running_requests: int = 64
    max_waiting_requests: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    # Chat completions that name no max_tokens stop here; None: at the context window.
    max_tokens_default: int | None = None
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_running_requests < 1 or self.max_waiting_requests < 0:
            raise ValueError("max_running_requests must be >= 1, max_waiting_requests >= 0")


class Admission:
    """A bounded count of requests in flight, and the draining switch for shutdown.

    Counting here, at the door, rather than reading the engine's queue length keeps
    the bound exact under a burst: requests admitted in the same instant have not
    reached the engine yet, so its queue would not show them.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.capacity = config.max_running_requests + config.max_waiting_requests
        self.retry_after_s = config.retry_after_s
        self.active = 0
        self.draining = False

    def acquire(self) -> Ticket:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if self.active >= self.capacity:
            raise APIError(
                429,
                f"the server is at capacity ({self.capacity} requests in flight); retry later",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.active += 1
        return Ticket(self)


class Ticket:
    """One admitted request; `release` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.active -= 1
            self._admission = None


class ServerState:
    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(engine.stats)
        self.admission = Admission(config)
        self.created = int(time.time())
        # Logprobs name every top token; decoding each id once keeps that cheap.
        self.token_text = lru_cache(maxsize=65536)(self._decode_one)

    def _decode_one(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def resolve_model(self, requested: str | None) -> str:
        """The model name to report back; unknown names are a 404 like OpenAI's."""
        names = self.config.served_model_names
        if requested is None:
            return names[0]
        if requested not in names:
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves "
                + ", ".join(repr(n) for n in names),
                param="model",
                code="model_not_found",
            )
        return requested
