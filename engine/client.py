"""The slice of `engine.AsyncLLM` that serving uses, written down as Protocols.

The server and the orchestrator depend on this shape only, never on engine internals,
and tests can serve a small fake engine through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from engine import BeamSearchParams, RequestOutput, SamplingParams


class TokenizerLike(Protocol):
    chat_template: str | None
    all_special_tokens: Sequence[str]

    def encode(
        self, text: str, add_special_tokens: bool = False, max_tokens: int | None = None
    ) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        *,
        max_tokens: int | None = None,
        **template_kwargs: Any,
    ) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        *,
        tokenize: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]: ...

    def encode_chat_text(self, text: str, *, max_tokens: int | None = None) -> list[int]: ...


class EngineStatsLike(Protocol):
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    finished_total: dict[str, int]  # sequences ended, by finish reason
    compile_state: str
    cpu: dict[str, object]  # the CPU path (engine/cpu_path.py); empty off CPU


class EngineClient(Protocol):
    tokenizer: TokenizerLike
    max_model_len: int
    vocab_size: int
    model_name: str
    failure: BaseException | None  # set once the engine has died; nothing can be served

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        on_abort: Callable[[int, int], None] | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    def beam_search(
        self,
        prompt: str | list[int],
        params: BeamSearchParams,
        request_id: str,
        on_abort: Callable[[int, int], None] | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStatsLike: ...
