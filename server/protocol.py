"""Request bodies of the OpenAI API, checked and normalised into dataclasses.

Only the fields the server itself interprets are checked here (messages, tools,
streaming, logprobs, prompt shape), plus the sizes that bound a request's cost (stop
lists). Sampling fields are collected as-is into `sampling` and checked by the
engine's `SamplingParams`, which refuses any wrong type or range with an error naming
the parameter, so range rules live in one place. Checks that need the model (token ids
below the vocabulary size) are `server.generation`'s. Unknown fields are ignored, as
vLLM does, so clients that send newer OpenAI fields keep working; but vLLM's own fields
are known: its structured-output fields (`structured_outputs`, the older `guided_*`) and
chat-template options are honoured, those that change nothing here are type-checked, and
those vLLM honours that this server cannot (beam search, best_of, a chat echo,
priorities, disaggregated serving...) are a 400 naming the field, never an answer other
than the one asked for.

Every check raises a 400 naming the field; no value of any type may get past this
module as anything but a 400 or a well-formed request.
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.tokenizer import ChatTemplateOptionError, chat_template_options
from orchestrator.chat_types import (
    ChatRequest,
    CompletionRequest,
    Guided,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
)
from server.errors import invalid

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
MAX_CACHE_SALT_CHARS = 1024  # vLLM's bound
MAX_REQUEST_ID_CHARS = 256  # repeated in every chunk of a stream

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

_KINDS: dict[str, tuple[type, ...]] = {
    "a string": (str,),
    "a boolean": (bool,),
    "an integer": (int,),
    "a number": (int, float),
    "an object": (dict,),
    "an array": (list,),
}


def valid_name(name: str) -> bool:
    """OpenAI's rule for function and schema names: 1 to 64 letters, digits, '_' or '-'.
    The names also go into the tool-call grammar, so nothing else may reach it."""
    return _NAME.fullmatch(name) is not None


def typed_field(
    body: dict, name: str, kind: str, default: Any = None, param: str | None = None
) -> Any:
    """body[name] if present and not null, checked against `kind` (bool is not a number); a
    400 naming `param` (default: `name`) otherwise. Every request parser checks fields here."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, _KINDS[kind])
    if kind in ("an integer", "a number") and isinstance(value, bool):
        ok = False
    if not ok:
        raise invalid(f"{param or name} must be {kind}, got {value!r}", param=param or name)
    return value


def _sampling_fields(body: dict) -> dict[str, Any]:
    typed_field(body, "bad_words", "an array")  # vLLM's server declares a list, not a word
    sampling = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    salt = _cache_salt(body)
    if salt is not None:
        sampling["cache_salt"] = salt
    n = sampling.get("n")
    if isinstance(n, int) and n > MAX_N:
        raise invalid(f"n must be at most {MAX_N}, got {n}", param="n")
    _check_sizes(sampling)
    return sampling


def _cache_salt(body: dict) -> str | None:
    """vLLM's `cache_salt`: 1 to MAX_CACHE_SALT_CHARS characters. The engine's request
    shares cached prompt blocks only with requests of the same owner and salt
    (`server.generation` combines it with the owner's)."""
    salt = typed_field(body, "cache_salt", "a string")
    if salt is not None and not 1 <= len(salt) <= MAX_CACHE_SALT_CHARS:
        raise invalid(
            f"cache_salt must be 1 to {MAX_CACHE_SALT_CHARS} characters, got {len(salt)}",
            "cache_salt",
        )
    return salt


def request_id(body: dict, header: str | None = None) -> str | None:
    """vLLM's request id: the response's id after its prefix (`chatcmpl-`, `cmpl-`), as
    vLLM answers. As in vLLM, the `X-Request-Id` header (`header`) wins over the body's
    `request_id`; either is 1 to MAX_REQUEST_ID_CHARS characters. The engine's own id
    stays unique."""
    value = typed_field(body, "request_id", "a string")
    for given, param in ((value, "request_id"), (header, "X-Request-Id")):
        if given is not None and not 1 <= len(given) <= MAX_REQUEST_ID_CHARS:
            raise invalid(
                f"{param} must be 1 to {MAX_REQUEST_ID_CHARS} characters, got {len(given)}",
                param,
            )
    return value if header is None else header


def _token_ids_options(body: dict) -> dict[str, bool]:
    """vLLM's token-id options, for clients (RL trainers) that need the exact tokens:
    `return_token_ids` (the prompt's and each choice's token ids beside the text) and
    `return_tokens_as_token_ids` (logprobs name each token "token_id:N", not by its text)."""
    return {
        name: typed_field(body, name, "a boolean", False)
        for name in ("return_token_ids", "return_tokens_as_token_ids")
    }


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


def _stream_options(body: dict, stream: bool) -> bool:
    options = typed_field(body, "stream_options", "an object")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    return typed_field(options, "include_usage", "a boolean", False, "stream_options.include_usage")


# -- chat ----------------------------------------------------------------------------------


def _text_content(content: Any, param: str) -> str:
    """A message's content as text: a string, or an array of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise invalid(f"{param} must be a string or a non-empty array of content parts", param)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise invalid(f"{param}[{i}]: only text content parts are supported", param)
        text = typed_field(part, "text", "a string", param=f"{param}[{i}].text")
        if text is None:
            raise invalid(f"{param}[{i}].text is required", f"{param}[{i}].text")
        texts.append(text)
    return "\n".join(texts)


def _tool_call(raw: Any, param: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise invalid(f"{param} must be an object", param)
    function = typed_field(raw, "function", "an object", param=f"{param}.function")
    if function is None:
        raise invalid(f"{param}.function is required", param)
    name = typed_field(function, "name", "a string", param=f"{param}.function.name")
    if not name:
        raise invalid(f"{param}.function.name is required", param)
    arguments = typed_field(function, "arguments", "a string", "{}", f"{param}.function.arguments")
    return ToolCall(
        id=typed_field(raw, "id", "a string", "", f"{param}.id"), name=name, arguments=arguments
    )


def _message(raw: Any, i: int) -> Message:
    param = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise invalid(f"{param} must be an object", "messages")
    role = raw.get("role")
    if role not in ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
    content = raw.get("content")
    text = None if content is None else _text_content(content, f"{param}.content")
    calls_raw = typed_field(raw, "tool_calls", "an array", [], f"{param}.tool_calls")
    if calls_raw and role != "assistant":
        raise invalid(f"{param}: only assistant messages may have tool_calls", "messages")
    calls = [_tool_call(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(calls_raw)]
    if text is None and not (role == "assistant" and calls):
        article = "an" if role[0] in "aeiou" else "a"
        raise invalid(f"{param}.content is required for {article} {role} message", "messages")
    tool_call_id = typed_field(raw, "tool_call_id", "a string", param=f"{param}.tool_call_id")
    if role == "tool" and tool_call_id is None:
        raise invalid(f"{param}.tool_call_id is required for a tool message", "messages")
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
        raise invalid(f'{param} must be an object with "type": "function"', "tools")
    function = typed_field(raw, "function", "an object", param=f"{param}.function")
    if function is None:
        raise invalid(f"{param}.function is required", "tools")
    name = typed_field(function, "name", "a string", "", f"{param}.function.name")
    if not valid_name(name):
        raise invalid(
            f"{param}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
            "tools",
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


# vLLM's request fields that change nothing here, as they change nothing in vLLM serving
# this model on one machine: only their types are checked.
_INERT_FIELDS = {
    "length_penalty": "a number",  # beam search's, which is refused
    # joins special tokens' texts for slow tokenizers only; vLLM's fast ones, like this
    # server's, write them as decoded
    "spaces_between_special_tokens": "a boolean",
    "session_id": "a string",  # routes related requests; one server here
    "return_token_offsets": "a boolean",  # vLLM's render endpoints only
    "return_mm_kwargs": "a boolean",  # vLLM's render endpoints only
    "routed_experts_prompt_start": "an integer",  # mixture-of-experts routing reports
    "guided_decoding_backend": "a string",  # which grammar engine: there is one
}
_CHAT_INERT_FIELDS = {
    # options for media content, which this server refuses in messages
    "mm_processor_kwargs": "an object",
    "media_io_kwargs": "an object",
}

# vLLM's request fields this server cannot honour: a value other than these defaults (or
# null) is a 400 naming the field, never an answer other than the one asked for.
_UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "priority": ((0,), "the scheduler has no priorities (0 is the only one)"),
    "watermarking": ((False,), "watermarking is not implemented"),
    "truncation_side": (("left",), 'truncate_prompt_tokens keeps the last tokens ("left")'),
    "logprob_token_ids": ((), "send logprobs and top_logprobs"),
    "return_prompt_text": ((False,), "the rendered prompt is not returned"),
    "kv_transfer_params": (({},), "there is no disaggregated serving"),
    "ec_transfer_params": (({},), "there is no disaggregated serving"),
    "vllm_xargs": (({},), "no extensions are installed to read them"),
    "logits_processors": (([],), "custom logits processors cannot be loaded"),
    "repetition_detection": ((), "repetition detection is not implemented"),
    "stream_interval": ((1,), "every token is streamed as it comes"),
    "thinking_token_budget": ((-1,), "there is no reasoning parser to count thinking tokens"),
    "guided_whitespace_pattern": ((), "the grammar engine sets JSON's whitespace"),
}
_CHAT_UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "chat_template": ((), "requests cannot bring their own template"),
    "add_special_tokens": ((False,), "the chat template writes the prompt's special tokens"),
    "include_reasoning": ((True,), "there is no reasoning parser: reasoning stays in content"),
}
_COMPLETION_UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "prompt_embeds": ((), "send the prompt as text or token ids"),
}


def _check_vllm_fields(
    body: dict, inert: dict[str, str], unsupported: dict[str, tuple[tuple[Any, ...], str]]
) -> None:
    """vLLM's fields are never silently ignored: an inert one's type is checked, and an
    unsupported one set to anything but its default (same type and value) or null is a
    400 naming it."""
    for name, kind in inert.items():
        typed_field(body, name, kind)
    for name, (defaults, reason) in unsupported.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(d) and value == d for d in defaults):
            raise invalid(f"{name} is not supported: {reason}; got {value!r}", name)


def _check_common(body: dict) -> None:
    """Fields both endpoints accept but do not use: check their types. vLLM's fields that
    would change the answer and have no counterpart here are refused."""
    typed_field(body, "user", "a string")
    _check_vllm_fields(body, _INERT_FIELDS, _UNSUPPORTED_FIELDS)
    if typed_field(body, "use_beam_search", "a boolean"):
        raise invalid(
            "use_beam_search is not supported: beam search is not implemented", "use_beam_search"
        )
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


# vLLM's structured-output kinds, each what its JSON value must be: the keys of its
# `structured_outputs` field, and of its older `guided_*` fields without the prefix.
_STRUCTURE_KINDS = {
    "json": "an object",
    "regex": "a string",
    "choice": "an array",
    "grammar": "a string",
}
_GUIDED_FIELDS = tuple(f"guided_{kind}" for kind in _STRUCTURE_KINDS)
# `structured_outputs` options that change nothing here (which grammar backend serves it).
_STRUCTURE_OPTIONS = ("disable_fallback",)


def _structure_value(kind: str, value: Any, name: str, param: str) -> Any:
    """A structure's value with its shape checked (the structure itself is checked when
    its grammar is built: server/structured.py); `name` is the field or key it came in.
    A json schema may come as its JSON text."""
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise invalid(
                f"{name} must be a JSON schema, as an object or its JSON text", param
            ) from None
        if not isinstance(value, dict):
            raise invalid(f"{name} must be a JSON schema (an object)", param)
    expected = _STRUCTURE_KINDS[kind]
    if not isinstance(value, _KINDS[expected]):
        raise invalid(f"{name} must be {expected}, got {value!r}", param)
    if kind == "choice" and not (value and all(isinstance(c, str) and c for c in value)):
        raise invalid(f"{name} must be a non-empty array of non-empty strings", param)
    return value


def _structured_outputs(body: dict) -> Guided | None:
    """vLLM's `structured_outputs` field: exactly one kind (json, regex, choice, grammar,
    or json_object: true); its other options, which would change the output (structural
    tags, whitespace rules), are refused."""
    spec = typed_field(body, "structured_outputs", "an object")
    if spec is None:
        return None
    param = "structured_outputs"
    known = (*_STRUCTURE_KINDS, "json_object", *_STRUCTURE_OPTIONS)
    unsupported = [k for k, v in spec.items() if k not in known and v not in (None, False)]
    if unsupported:
        raise invalid(f"{param}.{unsupported[0]} is not supported", param)
    kinds = [k for k in (*_STRUCTURE_KINDS, "json_object") if spec.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise invalid(
            f"{param} must set exactly one of json, regex, choice, grammar or json_object, "
            f"got {', '.join(kinds) or 'none'}",
            param,
        )
    kind = kinds[0]
    if kind == "json_object":
        if spec[kind] is not True:
            raise invalid(f"{param}.json_object must be true, got {spec[kind]!r}", param)
        return Guided(param, kind, True)
    return Guided(param, kind, _structure_value(kind, spec[kind], f"{param}.{kind}", param))


def _guided(body: dict, response_format: ResponseFormat | None) -> Guided | None:
    """The structure vLLM's own fields ask for, if any: `structured_outputs`, or one of the
    older `guided_*` fields; either excludes the other and response_format."""
    given = [name for name in _GUIDED_FIELDS if body.get(name) is not None]
    structured = _structured_outputs(body)
    if structured is not None:
        if given or response_format is not None:
            other = given[0] if given else "response_format"
            raise invalid(f"structured_outputs cannot be combined with {other}", structured.param)
        return structured
    if not given:
        return None
    param = given[0]
    if len(given) > 1:
        raise invalid(f"send one of {', '.join(given)}, not several", given[1])
    if response_format is not None:
        raise invalid(f"{param} cannot be combined with response_format", param)
    kind = param.removeprefix("guided_")
    return Guided(param, kind, _structure_value(kind, body[param], param, param))


def _documents(body: dict) -> list[dict[str, str]] | None:
    """vLLM's `documents` (for retrieval-augmented templates): objects of strings, such
    as {"title", "text"}, given to the template as its `documents` variable."""
    documents = typed_field(body, "documents", "an array")
    if documents is not None and not all(
        isinstance(d, dict) and all(isinstance(v, str) for v in d.values()) for d in documents
    ):
        raise invalid("documents must be an array of objects of strings", "documents")
    return documents


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
    documents = _documents(body)
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
            "response_format",
        )
    spec = typed_field(fmt, "json_schema", "an object", param="response_format.json_schema")
    if spec is None:
        raise invalid("response_format.json_schema is required", "response_format")
    name = typed_field(spec, "name", "a string", param="response_format.json_schema.name")
    if name is None or not valid_name(name):
        raise invalid(
            "response_format.json_schema.name must be 1 to 64 letters, digits, '_' "
            f"or '-', got {name!r}",
            "response_format",
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
    _check_vllm_fields(body, _CHAT_INERT_FIELDS, _CHAT_UNSUPPORTED_FIELDS)
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
    guided = _guided(body, response_format)
    if guided is not None and mode != "none":
        raise invalid(f"{guided.param} cannot be combined with tools", guided.param)
    return ChatRequest(
        model=typed_field(body, "model", "a string"),
        messages=messages,
        sampling=sampling,
        stream=stream,
        include_usage=_stream_options(body, stream),
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
        **_token_ids_options(body),
        **_rendering(body, messages),
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
    _check_vllm_fields(body, {}, _COMPLETION_UNSUPPORTED_FIELDS)
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
    return CompletionRequest(
        model=typed_field(body, "model", "a string"),
        prompts=prompts,
        sampling=sampling,
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        echo=echo,
        response_format=response_format,
        guided=_guided(body, response_format),
        add_special_tokens=typed_field(body, "add_special_tokens", "a boolean", True),
        request_id=request_id(body, request_id_header),
        **_token_ids_options(body),
    )
