"""Request bodies of the OpenAI API, checked and normalised into dataclasses.

Only the fields the server itself interprets are checked here (messages, tools,
streaming, logprobs, prompt shape), plus the sizes that bound a request's cost (stop
lists). Sampling fields are collected as-is into `sampling` and checked by the
engine's `SamplingParams`, which refuses any wrong type or range with an error naming
the parameter, so range rules live in one place. Checks that need the model (token ids
below the vocabulary size) are `server.generation`'s. Unknown fields are ignored, as
vLLM does, so clients that send newer OpenAI fields keep working; but vLLM's own fields
are known (`server.vllm_fields`): those this server honours are, those that change
nothing here are type-checked, and those vLLM honours that this server cannot (best_of,
a chat echo, priorities, disaggregated serving...) are a 400 naming the field, never an
answer other than the one asked for.

Every check raises a 400 naming the field; no value of any type may get past this
module as anything but a 400 or a well-formed request.
"""

from __future__ import annotations

import re
from typing import Any

from engine.tokenizer import ChatTemplateOptionError, chat_template_options
from orchestrator.chat_types import (
    ChatRequest,
    CompletionRequest,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
)
from server.errors import invalid, typed_field
from server.vllm_fields import (
    beam_search_fields,
    cache_salt,
    check_chat_fields,
    check_common_fields,
    check_completion_fields,
    request_id,
    requested_structure,
    template_documents,
    token_ids_options,
)

ROLES = ("system", "developer", "user", "assistant", "tool")
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_N = 128  # OpenAI's own upper bound for `n`
MAX_TOP_LOGPROBS = 20
# Stop strings are searched for after every token (the held-back tail costs up to the
# square of a stop string's length), so their number and length are bounded.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_BAD_WORDS = 256  # each is matched against the output at every step, like a stop string

# Passed straight to SamplingParams under the same name (vLLM's extensions included).
_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "allowed_token_ids",
    "bad_words",
    "truncate_prompt_tokens",
)


# -- field helpers --------------------------------------------------------------------------


def valid_name(name: str) -> bool:
    """OpenAI's rule for function and schema names: 1 to 64 letters, digits, '_' or '-'.
    The names also go into the tool-call grammar, so nothing else may reach it."""
    return _NAME.fullmatch(name) is not None


def _sampling_fields(body: dict) -> dict[str, Any]:
    typed_field(body, "bad_words", "an array")  # vLLM's server declares a list, not a word
    sampling = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    salt = cache_salt(body)
    if salt is not None:
        sampling["cache_salt"] = salt
    n = sampling.get("n")
    if isinstance(n, int) and n > MAX_N:
        raise invalid(f"n must be at most {MAX_N}, got {n}", param="n")
    _check_sizes(sampling)
    return sampling


def _check_sizes(sampling: dict[str, Any]) -> None:
    """Bound what the engine searches for after every token (types are SamplingParams')."""
    stop = sampling.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(f"stop strings may be at most {MAX_STOP_CHARS} characters long", "stop")
    words = sampling.get("bad_words")
    if isinstance(words, list) and len(words) > MAX_BAD_WORDS:
        raise invalid(f"bad_words may hold at most {MAX_BAD_WORDS} words", "bad_words")
    if isinstance(words, list) and any(
        isinstance(w, str) and len(w) > MAX_STOP_CHARS for w in words
    ):
        raise invalid(f"bad words may be at most {MAX_STOP_CHARS} characters long", "bad_words")
    ids = sampling.get("stop_token_ids")
    if isinstance(ids, list) and len(ids) > MAX_STOP_TOKEN_IDS:
        raise invalid(
            f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}",
            "stop_token_ids",
        )


def _max_tokens(body: dict, *names: str) -> int | None:
    """The first of `names` that is set; must be a positive integer."""
    for name in names:
        value = typed_field(body, name, "an integer")
        if value is not None:
            if value < 1:
                raise invalid(f"{name} must be at least 1, got {value}", param=name)
            return value
    return None


def _stream_options(body: dict, stream: bool) -> dict[str, bool]:
    """The request's fields for OpenAI's `include_usage` (a last chunk with the usage) and
    vLLM's `continuous_usage_stats` (with it, every chunk's usage so far)."""
    options = typed_field(body, "stream_options", "an object")
    if options is None:
        return {}
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    usage = typed_field(
        options, "include_usage", "a boolean", False, "stream_options.include_usage"
    )
    continuous = typed_field(
        options,
        "continuous_usage_stats",
        "a boolean",
        False,
        "stream_options.continuous_usage_stats",
    )
    return {"include_usage": usage, "continuous_usage": usage and continuous}


# -- chat ----------------------------------------------------------------------------------


def _text_content(content: Any, param: str, assistant: bool = False) -> str:
    """A message's content as text: a string, or an array of text parts joined by newlines.
    An assistant's may hold refusal parts too (OpenAI's history of a refused request),
    whose `refusal` is what the assistant said."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise invalid(f"{param} must be a string or a non-empty array of content parts", param)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if assistant and kind == "refusal" else "text"
        if kind != key:
            raise invalid(f"{param}[{i}]: only text content parts are supported", param)
        text = typed_field(part, key, "a string", param=f"{param}[{i}].{key}")
        if text is None:
            raise invalid(f"{param}[{i}].{key} is required", f"{param}[{i}].{key}")
        texts.append(text)
    return "\n".join(texts)


def _tool_call(raw: Any, param: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise invalid(f"{param} must be an object", param)
    function = typed_field(raw, "function", "an object", param=f"{param}.function")
    if function is None:
        raise invalid(f"{param}.function is required", f"{param}.function")
    name = typed_field(function, "name", "a string", param=f"{param}.function.name")
    if not name:
        raise invalid(f"{param}.function.name is required", f"{param}.function.name")
    arguments = typed_field(function, "arguments", "a string", "{}", f"{param}.function.arguments")
    return ToolCall(
        id=typed_field(raw, "id", "a string", "", f"{param}.id"), name=name, arguments=arguments
    )


def _message(raw: Any, i: int) -> Message:
    param = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise invalid(f"{param} must be an object", param)
    role = raw.get("role")
    if role not in ROLES:
        raise invalid(
            f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role"
        )
    content = raw.get("content")
    assistant = role == "assistant"
    if content is None and assistant:  # a refusal stands in for the content
        content = typed_field(raw, "refusal", "a string", param=f"{param}.refusal")
    text = None if content is None else _text_content(content, f"{param}.content", assistant)
    calls_raw = typed_field(raw, "tool_calls", "an array", [], f"{param}.tool_calls")
    if calls_raw and role != "assistant":
        raise invalid(
            f"{param}: only assistant messages may have tool_calls", f"{param}.tool_calls"
        )
    calls = [_tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls_raw)]
    if text is None and not (role == "assistant" and calls):
        article = "an" if role == "assistant" else "a"
        raise invalid(
            f"{param}.content is required for {article} {role} message", f"{param}.content"
        )
    tool_call_id = typed_field(raw, "tool_call_id", "a string", param=f"{param}.tool_call_id")
    if role == "tool" and tool_call_id is None:
        raise invalid(
            f"{param}.tool_call_id is required for a tool message", f"{param}.tool_call_id"
        )
    name = typed_field(raw, "name", "a string", param=f"{param}.name")
    return Message(role, text, name=name, tool_calls=calls, tool_call_id=tool_call_id)


def _check_tool_results(messages: list[Message]) -> None:
    """OpenAI's rules: tool messages answer the tool_calls of the assistant message just
    before them (other tool messages aside), each naming one of its calls, once; and
    every call is answered before the conversation goes on. Calls without ids (some
    clients drop them) can be answered by any tool message, and are not counted."""
    calls: set[str] | None = None  # the ids of the calls being answered, if any
    answered: set[str] = set()
    for i, message in enumerate(messages):
        if message.role != "tool":
            _require_answers(calls, answered, i)
            calls = None
            if message.role == "assistant" and message.tool_calls:
                calls = {c.id for c in message.tool_calls}
            answered = set()
        elif calls is None:
            raise invalid(
                f"messages[{i}]: a tool message must follow an assistant message with "
                "tool_calls (or another tool message answering them)",
                "messages",
            )
        elif "" not in calls:
            if message.tool_call_id not in calls:
                raise invalid(
                    f"messages[{i}].tool_call_id {message.tool_call_id!r} is not among the "
                    "tool_calls of the assistant message before it",
                    "messages",
                )
            if message.tool_call_id in answered:
                raise invalid(
                    f"messages[{i}].tool_call_id {message.tool_call_id!r} answers a call "
                    "answered before it",
                    "messages",
                )
            answered.add(message.tool_call_id)
    _require_answers(calls, answered, len(messages))


def _require_answers(calls: set[str] | None, answered: set[str], at: int) -> None:
    """The calls being answered are all answered by messages[at] (where a message of
    another role, or the end, comes)."""
    if calls and "" not in calls and calls - answered:
        missing = ", ".join(sorted(calls - answered))
        raise invalid(
            "an assistant message with tool_calls must be followed by tool messages "
            f"answering each of its calls; not answered before messages[{at}]: {missing}",
            "messages",
        )


def _tool(raw: Any, i: int) -> Tool:
    param = f"tools[{i}]"
    if not isinstance(raw, dict) or raw.get("type") != "function":
        raise invalid(f'{param} must be an object with "type": "function"', param)
    function = typed_field(raw, "function", "an object", param=f"{param}.function")
    if function is None:
        raise invalid(f"{param}.function is required", f"{param}.function")
    name = typed_field(function, "name", "a string", "", f"{param}.function.name")
    if not valid_name(name):
        raise invalid(
            f"{param}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
            f"{param}.function.name",
        )
    typed_field(function, "description", "a string", param=f"{param}.function.description")
    typed_field(function, "parameters", "an object", param=f"{param}.function.parameters")
    typed_field(function, "strict", "a boolean", param=f"{param}.function.strict")
    return Tool(name=name, spec={"type": "function", "function": function})


def _tools(body: dict) -> list[Tool]:
    """The request's function tools. As in OpenAI's API, an empty array is a 400 rather
    than "no tools": leave the field out for that."""
    raw = typed_field(body, "tools", "an array")
    if raw is None:
        return []
    if not raw:
        raise invalid(
            "Invalid 'tools': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "tools",
            code="empty_array",
        )
    tools = [_tool(t, i) for i, t in enumerate(raw)]
    if len({t.name for t in tools}) != len(tools):
        raise invalid("tools must have distinct function names", "tools")
    return tools


def _tool_choice(body: dict, tools: list[Tool]) -> tuple[str, str | None]:
    """(mode, forced function name). OpenAI's default is "auto" with tools, else "none";
    a tool_choice without tools, even "none", is a 400 there, and here."""
    choice = body.get("tool_choice")
    if choice is None:
        return ("auto" if tools else "none"), None
    if not tools:
        raise invalid(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
            "'tools' are specified.",
            "tool_choice",
        )
    if choice in ("none", "auto", "required"):
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(name, str)
        and name
    ):
        raise invalid(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in {t.name for t in tools}:
        raise invalid(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    return "function", name


def _check_common(body: dict) -> None:
    """Fields both endpoints accept but do not use: check their types. vLLM's fields that
    would change the answer and have no counterpart here are refused."""
    typed_field(body, "user", "a string")
    check_common_fields(body)
    best_of = typed_field(body, "best_of", "an integer")
    if best_of is not None and best_of != (1 if body.get("n") is None else body["n"]):
        raise invalid("best_of is not supported (it must equal n)", "best_of")


def top_count(body: dict, name: str) -> int | None:
    """A count of likeliest tokens to report (`logprobs`, `top_logprobs`, ...): an integer
    in [0, MAX_TOP_LOGPROBS], or None when not sent."""
    count = typed_field(body, name, "an integer")
    if count is not None and not 0 <= count <= MAX_TOP_LOGPROBS:
        raise invalid(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {count}", name)
    return count


def _prompt_logprobs(body: dict, stream: bool) -> int | None:
    """vLLM's `prompt_logprobs`: how many likeliest tokens to report beside each prompt
    token's own logprob. As in vLLM, a stream cannot carry them (a count above 0 with
    `stream` is a 400, and 0 is accepted and reports nothing): None then."""
    count = top_count(body, "prompt_logprobs")
    if count is not None and stream:
        if count > 0:
            raise invalid(
                "prompt_logprobs are not available when stream is true", "prompt_logprobs"
            )
        return None
    return count


def _rendering(body: dict, messages: list[Message]) -> dict[str, Any]:
    """vLLM's chat-template options, checked: `add_generation_prompt` (default true),
    `continue_final_message` (default false: true goes on with the last message, an
    assistant's, instead of opening a turn, so the two cannot both be true) and
    `chat_template_kwargs` (template variables, which override the other two and are
    checked as they are; `documents` becomes one unless they set it). The engine's
    `chat_template_options` owns those rules; its error's `param` is the field the
    client sent the bad value in."""
    add = typed_field(body, "add_generation_prompt", "a boolean", True)
    extend = typed_field(body, "continue_final_message", "a boolean", False)
    kwargs = typed_field(body, "chat_template_kwargs", "an object", {})
    documents = template_documents(body)
    if documents is not None and "documents" not in kwargs:
        kwargs = {**kwargs, "documents": documents}
    try:
        options = chat_template_options(add, extend, None, kwargs)
    except ChatTemplateOptionError as exc:
        raise invalid(str(exc), exc.param) from None
    final = messages[-1]
    if options["continue_final_message"] and (
        final.role != "assistant" or not (final.content or "").strip()
    ):
        raise invalid(
            "continue_final_message needs the last message to be an assistant message "
            "with text, for the model to continue (to start the turn afresh, send "
            "add_generation_prompt instead)",
            "chat_template_kwargs"
            if "continue_final_message" in kwargs
            else "continue_final_message",
        )
    return {
        "add_generation_prompt": add,
        "continue_final_message": extend,
        "chat_template_kwargs": kwargs,
    }


def _response_format(body: dict) -> ResponseFormat | None:
    """OpenAI's `response_format`; None for text. The schema itself is checked when the
    engine's grammar is built (an unsupported feature is a 400 there)."""
    fmt = typed_field(body, "response_format", "an object")
    kind = None if fmt is None else fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise invalid(
            f'response_format.type must be "text", "json_object" or "json_schema", got {kind!r}',
            "response_format.type",
        )
    spec = typed_field(fmt, "json_schema", "an object", param="response_format.json_schema")
    if spec is None:
        raise invalid("response_format.json_schema is required", "response_format.json_schema")
    name = typed_field(spec, "name", "a string", param="response_format.json_schema.name")
    if name is None or not valid_name(name):
        raise invalid(
            "response_format.json_schema.name must be 1 to 64 letters, digits, '_' "
            f"or '-', got {name!r}",
            "response_format.json_schema.name",
        )
    typed_field(spec, "description", "a string", param="response_format.json_schema.description")
    schema = typed_field(spec, "schema", "an object", {}, "response_format.json_schema.schema")
    strict = typed_field(spec, "strict", "a boolean", False, "response_format.json_schema.strict")
    return ResponseFormat("json_schema", schema=schema, name=name, strict=strict)


def _logit_bias(body: dict, sampling: dict[str, Any]) -> None:
    """OpenAI's `logit_bias` ({"token id": bias}) into `sampling["logit_bias"]`, with int
    keys; the engine checks the values' range and the ids against its vocabulary."""
    bias = typed_field(body, "logit_bias", "an object")
    if not bias:
        return
    parsed = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise invalid(
                f"logit_bias keys must be token ids (digit strings), got {key!r}", "logit_bias"
            )
        parsed[int(key)] = value
    sampling["logit_bias"] = parsed


def parse_chat_request(
    body: Any, max_messages: int | None = None, request_id_header: str | None = None
) -> ChatRequest:
    """`max_messages` (the context window: every message costs at least one token) is
    checked before any message is: validating 200,000 of them would hold the GIL for a
    second, stalling every stream, only to refuse the request afterwards.
    `request_id_header`: the request's `X-Request-Id` header, if sent."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    messages_raw = typed_field(body, "messages", "an array")
    if not messages_raw:
        raise invalid("messages must be a non-empty array", "messages")
    if max_messages is not None and len(messages_raw) > max_messages:
        raise invalid(
            f"messages has {len(messages_raw)} messages; the context window holds "
            f"{max_messages} tokens",
            "messages",
            code="context_length_exceeded",
        )
    _check_common(body)
    check_chat_fields(body)
    if typed_field(body, "echo", "a boolean"):
        raise invalid("echo is not supported on chat completions", "echo")
    for legacy in ("functions", "function_call"):  # ignored, a forced call would be lost
        if body.get(legacy) is not None:
            raise invalid(
                f"{legacy} (the deprecated form of tools and tool_choice) is not supported: "
                "send tools and tool_choice",
                legacy,
            )
    messages = [_message(m, i) for i, m in enumerate(messages_raw)]
    _check_tool_results(messages)
    tools = _tools(body)
    mode, forced = _tool_choice(body, tools)
    stream = typed_field(body, "stream", "a boolean", False)
    logprobs = typed_field(body, "logprobs", "a boolean", False)
    top = top_count(body, "top_logprobs")
    if top is not None and not logprobs:
        raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    prompt_logprobs = _prompt_logprobs(body, stream)
    sampling = _sampling_fields(body)
    sampling["max_tokens"] = _max_tokens(body, "max_completion_tokens", "max_tokens")
    if logprobs:
        sampling["logprobs"] = top or 0
    if prompt_logprobs is not None:
        sampling["prompt_logprobs"] = prompt_logprobs
    _logit_bias(body, sampling)
    response_format = _response_format(body)
    guided = requested_structure(body, response_format)
    if guided is not None and mode != "none":
        raise invalid(f"{guided.param} cannot be combined with tools", guided.param)
    beam = beam_search_fields(
        body,
        {
            "tools": bool(tools),
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs is not None,
            "response_format": response_format is not None,
            **({guided.param: True} if guided is not None else {}),
        },
    )
    return ChatRequest(
        model=typed_field(body, "model", "a string"),
        messages=messages,
        sampling=sampling,
        stream=stream,
        **_stream_options(body, stream),
        logprobs=logprobs,
        top_logprobs=top or 0,
        prompt_logprobs=prompt_logprobs,
        tools=tools,
        tool_choice=mode,
        forced_tool=forced,
        parallel_tool_calls=typed_field(body, "parallel_tool_calls", "a boolean", True),
        response_format=response_format,
        guided=guided,
        request_id=request_id(body, request_id_header),
        **token_ids_options(body),
        **_rendering(body, messages),
        **beam,
    )


# -- completions ---------------------------------------------------------------------------


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _prompts(body: dict) -> list[str | list[int]]:
    """OpenAI accepts a string, a token list, or a batch (array) of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return [prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or _is_token_ids(p) for p in prompt)
    ):
        return list(prompt)
    raise invalid(
        "prompt must be a string, an array of token ids, or a non-empty array of either",
        "prompt",
    )


def parse_completion_request(body: Any, request_id_header: str | None = None) -> CompletionRequest:
    """`request_id_header`: the request's `X-Request-Id` header, if sent."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    prompts = _prompts(body)
    _check_common(body)
    check_completion_fields(body)
    if body.get("suffix"):
        raise invalid("suffix is not supported", "suffix")
    stream = typed_field(body, "stream", "a boolean", False)
    logprobs = top_count(body, "logprobs")
    prompt_logprobs = _prompt_logprobs(body, stream)
    echo = typed_field(body, "echo", "a boolean", False)
    sampling = _sampling_fields(body)
    # The legacy endpoint's default is 16 tokens, not "fill the context". max_tokens=0 with
    # echo scores a prompt without generating (what evaluation harnesses send).
    score_only = echo and body.get("max_tokens") == 0 and type(body["max_tokens"]) is int
    sampling["max_tokens"] = 0 if score_only else _max_tokens(body, "max_tokens") or 16
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    # The echoed prompt's tokens are scored too, with as many alternatives as either asks.
    asked = [c for c in (logprobs if echo else None, prompt_logprobs) if c is not None]
    if asked:
        sampling["prompt_logprobs"] = max(asked)
    _logit_bias(body, sampling)
    response_format = _response_format(body)
    guided = requested_structure(body, response_format)
    beam = beam_search_fields(
        body,
        {
            "logprobs": logprobs is not None,
            "prompt_logprobs": prompt_logprobs is not None,
            "response_format": response_format is not None,
            **({guided.param: True} if guided is not None else {}),
        },
    )
    return CompletionRequest(
        model=typed_field(body, "model", "a string"),
        prompts=prompts,
        sampling=sampling,
        stream=stream,
        **_stream_options(body, stream),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        echo=echo,
        response_format=response_format,
        guided=guided,
        add_special_tokens=typed_field(body, "add_special_tokens", "a boolean", True),
        request_id=request_id(body, request_id_header),
        **token_ids_options(body),
        **beam,
    )
