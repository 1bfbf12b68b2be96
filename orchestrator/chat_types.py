"""The chat request, parsed: what chat completions and the Responses API both turn into a
prompt. `server.protocol` builds these from HTTP bodies; the orchestrator's context
assembly builds a `ChatRequest` from stored items, so both render through one path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Tool:
    name: str
    spec: dict  # the request's {"type": "function", "function": {...}} object, for templates


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


@dataclass
class Message:
    role: str
    content: str | None
    name: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None


@dataclass
class ResponseFormat:
    """A `response_format` other than text: any JSON object, or one matching `schema`."""

    type: str  # "json_object" | "json_schema"
    schema: dict | None = None  # json_schema only
    name: str | None = None
    strict: bool = False


@dataclass
class Guided:
    """The structure asked for by vLLM's own fields: `structured_outputs` or one of its
    older `guided_*` fields (`param`, the field sent, for errors), as the engine's
    structured-output `kind` (json, regex, choice, grammar, json_object) and its value (a
    json schema as a dict)."""

    param: str
    kind: str
    value: Any


@dataclass
class ChatRequest:
    model: str | None
    messages: list[Message]
    sampling: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's: every chunk has the usage so far
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None  # vLLM's; None: not reported
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "none"  # "none" | "auto" | "required" | "function"
    forced_tool: str | None = None  # the function named by tool_choice, if any
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    guided: Guided | None = None
    # vLLM's rendering options (engine.tokenizer.chat_template_options).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None  # vLLM's: the response id's suffix
    return_token_ids: bool = False  # vLLM's: prompt and output token ids in the response
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N"
    # vLLM's beam search: `n` beams, the best returned (server.generation.beam_search_params)
    use_beam_search: bool = False
    length_penalty: float = 1.0  # vLLM's, beam search's: scores divide by length ** this


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    sampling: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # vLLM's: every chunk has the usage so far
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # vLLM's; None: not reported
    echo: bool = False
    response_format: ResponseFormat | None = None
    guided: Guided | None = None
    add_special_tokens: bool = True  # vLLM's: text prompts get the model's BOS, if any
    request_id: str | None = None  # vLLM's: the response id's suffix
    return_token_ids: bool = False  # vLLM's: prompt and output token ids in the response
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N"
    # vLLM's beam search: `n` beams, the best returned (server.generation.beam_search_params)
    use_beam_search: bool = False
    length_penalty: float = 1.0  # vLLM's, beam search's: scores divide by length ** this
