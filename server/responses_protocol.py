"""Bodies of the Responses and Conversations APIs, checked and normalised.

Unlike chat completions, unknown or unsupported fields are refused with a 400 naming
them: a client relying on a Responses feature tokenmill lacks (built-in tools, images)
must learn so rather than get a plausible answer
that silently ignored it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator import FunctionTool, Page, ResponseRequest
from orchestrator.agent import CODE_INTERPRETER, DEFAULT_MAX_TOOL_CALLS
from orchestrator.events import output_text_part
from orchestrator.response_request import OUTPUT_TEXT_LOGPROBS, CodeInterpreterTool
from orchestrator.tools.file_search import DEFAULT_MAX_RESULTS, FileSearchTool
from server.errors import invalid, known_fields, typed_field
from server.filenames import checked_filename
from server.protocol import top_count, valid_name
from server.vector_store_search import parse_filters, parse_max_results, parse_ranking

MAX_METADATA_KEYS = 16
MAX_ITEMS_PER_CALL = 20  # OpenAI's limit for conversation items per request
MAX_PAGE = 100
MAX_SEARCHED_STORES = 16
# Every value OpenAI's API takes. A code_interpreter_call carries its outputs whether or
# not they are asked for; the rest name what this server never produces (web search calls,
# input images, computer calls, encrypted reasoning), so asking for them changes nothing,
# as clients such as OpenAI's Agents SDK ask for reasoning.encrypted_content routinely.
INCLUDABLE = (
    "file_search_call.results",
    "code_interpreter_call.outputs",
    OUTPUT_TEXT_LOGPROBS,
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "reasoning.encrypted_content",
)
_MESSAGE_ROLES = ("user", "system", "developer", "assistant")

_RESPONSE_FIELDS = {
    "model",
    "input",
    "instructions",
    "previous_response_id",
    "conversation",
    "store",
    "stream",
    "stream_options",
    "max_output_tokens",
    "temperature",
    "top_p",
    "truncation",
    "metadata",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_tool_calls",
    "text",
    "background",
    "include",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "service_tier",
    "top_logprobs",
    "reasoning",
}
# The tiers OpenAI takes: this server has one, which a response reports as "default".
_SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
_REASONING_FIELDS = {"effort", "summary", "generate_summary"}


def _required(body: dict, name: str, param: str, kind: str = "a string") -> Any:
    value = typed_field(body, name, kind, param=f"{param}.{name}")
    if value is None:
        raise invalid(f"{param}.{name} is required", f"{param}.{name}")
    return value


def parse_metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata: up to 16 string pairs, keys up to 64 and values up to 512 chars."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object of strings", param)
    if len(value) > MAX_METADATA_KEYS:
        raise invalid(f"{param} may hold at most {MAX_METADATA_KEYS} keys", param)
    for key, text in value.items():
        if len(key) > 64 or not isinstance(text, str) or len(text) > 512:
            raise invalid(
                f"{param}[{key!r}] must be a string of at most 512 characters "
                "under a key of at most 64",
                param,
            )
    return dict(value)


# -- items ---------------------------------------------------------------------------------


def _content(raw: Any, role: str, param: str) -> list[dict]:
    """A message's content as text parts: input_text for what users and systems say
    (with input_file, a file whose text the service reads), output_text for the
    assistant's own earlier words, which keep the annotations and logprobs they were
    given (an earlier response's output given back as it was), and refusal for an
    assistant's refusal, kept as given (an output message holds either)."""
    if isinstance(raw, str):
        parts = [{"type": "input_text", "text": raw}]
    elif isinstance(raw, list):
        parts = raw
    else:
        raise invalid(f"{param} must be a string or an array of content parts", param)
    content = []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and role == "assistant":
            content.append({"type": "refusal", "refusal": _required(part, "refusal", where)})
            continue
        if kind == "input_file" and role != "assistant":
            content.append(_input_file(part, where))
            continue
        if kind == "input_image":
            raise invalid(
                f"{where}.type 'input_image' is not supported: this model reads text only, "
                "not images; give what the image shows as input_text",
                f"{where}.type",
            )
        if kind not in ("input_text", "output_text"):
            raise invalid(
                f"{where}.type {kind!r} is not supported: only text content "
                "(input_text, input_file, output_text, and refusal in an assistant "
                "message) is",
                f"{where}.type",
            )
        text = _required(part, "text", where)
        if role != "assistant":
            content.append({"type": "input_text", "text": text})
        elif kind == "input_text":
            content.append(output_text_part(text))
        else:
            content.append(
                output_text_part(text, _annotations(part, where), _logprobs(part, where))
            )
    return content


def _input_file(part: dict, param: str) -> dict:
    """`{"type": "input_file"}` with an uploaded file's `file_id`, or a file given inline
    as `filename` and `file_data` (a base64 data URL); the service reads its text. A
    `file_url` is refused: this server fetches nothing from the internet."""
    if part.get("file_url") is not None:
        raise invalid(
            f"{param}.file_url is not supported: this server does not fetch URLs; upload "
            "the file to /v1/files and give its file_id, or give it inline as file_data",
            f"{param}.file_url",
        )
    file_id = typed_field(part, "file_id", "a string", param=f"{param}.file_id")
    data = typed_field(part, "file_data", "a string", param=f"{param}.file_data")
    if (file_id is None) == (data is None):
        raise invalid(f"{param} must have exactly one of file_id and file_data", param)
    if file_id is not None:
        return {"type": "input_file", "file_id": file_id}
    filename = checked_filename(_required(part, "filename", param), f"{param}.filename")
    return {"type": "input_file", "filename": filename, "file_data": data}


# OpenAI's output_text annotations: each type's fields, all required.
_ANNOTATION_FIELDS = {
    "file_citation": {"file_id": "a string", "filename": "a string", "index": "an integer"},
    "url_citation": {
        "url": "a string",
        "title": "a string",
        "start_index": "an integer",
        "end_index": "an integer",
    },
    "container_file_citation": {
        "container_id": "a string",
        "file_id": "a string",
        "filename": "a string",
        "start_index": "an integer",
        "end_index": "an integer",
    },
    "file_path": {"file_id": "a string", "index": "an integer"},
}
# A content part's token logprob, and each of its top_logprobs: field -> kind.
_LOGPROB_FIELDS = {"token": "a string", "logprob": "a number", "bytes": "an array"}


def _annotations(part: dict, param: str) -> list[dict]:
    """An output_text part's annotations, each checked against its type's fields."""
    annotations = []
    for j, raw in enumerate(
        typed_field(part, "annotations", "an array", [], f"{param}.annotations")
    ):
        where = f"{param}.annotations[{j}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in _ANNOTATION_FIELDS:
            raise invalid(
                f"{where}.type must be one of {', '.join(_ANNOTATION_FIELDS)}, got {kind!r}",
                f"{where}.type",
            )
        fields = _ANNOTATION_FIELDS[kind]
        annotations.append(
            {"type": kind} | {f: _required(raw, f, where, k) for f, k in fields.items()}
        )
    return annotations


def _logprobs(part: dict, param: str) -> list[dict]:
    """An output_text part's token logprobs in the content part's shape."""
    logprobs = []
    for j, raw in enumerate(typed_field(part, "logprobs", "an array", [], f"{param}.logprobs")):
        where = f"{param}.logprobs[{j}]"
        entry = _logprob(raw, where)
        tops = _required(raw, "top_logprobs", where, "an array")
        entry["top_logprobs"] = [
            _logprob(t, f"{where}.top_logprobs[{i}]") for i, t in enumerate(tops)
        ]
        logprobs.append(entry)
    return logprobs


def _logprob(raw: Any, param: str) -> dict:
    """A token's `token`, `logprob` and `bytes` (integers of 0 to 255)."""
    if not isinstance(raw, dict):
        raise invalid(f"{param} must be an object", param)
    entry = {f: _required(raw, f, param, k) for f, k in _LOGPROB_FIELDS.items()}
    if not all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in entry["bytes"]
    ):
        raise invalid(f"{param}.bytes must be an array of byte values (0 to 255)", f"{param}.bytes")
    return entry


_PHASES = ("commentary", "final_answer")


def _phase(raw: dict, role: str, param: str) -> dict:
    """An assistant message's `phase` as it was given (OpenAI's clients resend it on every
    assistant message, and read it back from stored items), or nothing."""
    phase = raw.get("phase")
    if phase is None:
        return {}
    if role != "assistant" or phase not in _PHASES:
        raise invalid(
            f"{param}.phase must be one of {', '.join(_PHASES)}, on an assistant message; "
            f"got {phase!r} on a {role} message",
            f"{param}.phase",
        )
    return {"phase": phase}


# The status a client may give a message, function_call or function_call_output.
_ITEM_STATUSES = ("in_progress", "completed", "incomplete")


def _given_status(raw: dict, param: str) -> dict:
    """`{"status": ...}` as the item was given it, or nothing (stored as completed)."""
    status = raw.get("status")
    if status is None:
        return {}
    if status not in _ITEM_STATUSES:
        raise invalid(
            f"{param}.status must be one of {', '.join(_ITEM_STATUSES)}, got {status!r}",
            f"{param}.status",
        )
    return {"status": status}


def _item(raw: Any, param: str) -> dict:
    if not isinstance(raw, dict):
        raise invalid(f"{param} must be an object", param)
    # OpenAI's item_reference may leave out its type: an item of an id and no role is one.
    kind = raw.get("type") or ("item_reference" if "role" not in raw and "id" in raw else "message")
    if kind == "item_reference":
        return {"type": "item_reference", "id": _required(raw, "id", param)}
    if kind == "message":
        role = raw.get("role")
        if role not in _MESSAGE_ROLES:
            raise invalid(
                f"{param}.role must be one of {', '.join(_MESSAGE_ROLES)}, got {role!r}",
                f"{param}.role",
            )
        return {
            "type": "message",
            **_given_status(raw, param),
            "role": role,
            "content": _content(raw.get("content"), role, f"{param}.content"),
            **_phase(raw, role, param),
        }
    if kind == "function_call":
        return {
            "type": "function_call",
            **_given_status(raw, param),
            "call_id": _required(raw, "call_id", param),
            "name": _required(raw, "name", param),
            "arguments": _required(raw, "arguments", param),
        }
    if kind == "function_call_output":
        return {
            "type": "function_call_output",
            **_given_status(raw, param),
            "call_id": _required(raw, "call_id", param),
            "output": _call_output(raw, param),
        }
    if kind == "code_interpreter_call":
        return _code_interpreter_call(raw, param)
    if kind == "file_search_call":
        return _file_search_call(raw, param)
    raise invalid(
        f"{param}.type {kind!r} is not supported: items are messages, function_call, "
        "function_call_output, code_interpreter_call, file_search_call and item_reference",
        f"{param}.type",
    )


def _call_output(raw: dict, param: str) -> str | list[dict]:
    """A function_call_output's `output`: a string, or the SDK's list of content parts,
    of which this server reads text only (`input_text`, kept as given): the model reads
    no images, and a tool's files are not read."""
    output = raw.get("output")
    if not isinstance(output, list):
        return _required(raw, "output", param)
    parts = []
    for j, part in enumerate(output):
        where = f"{param}.output[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "input_text":
            raise invalid(
                f"{where}.type {kind!r} is not supported: a function_call_output's parts "
                "are input_text only (this model reads text, not images or files)",
                f"{where}.type" if isinstance(part, dict) else where,
            )
        parts.append({"type": "input_text", "text": _required(part, "text", where)})
    return parts


_CODE_STATUSES = ("in_progress", "completed", "incomplete", "interpreting", "failed")
_SEARCH_STATUSES = ("in_progress", "searching", "completed", "incomplete", "failed")
_CODE_OUTPUT_TEXT = {"logs": "logs", "image": "url"}  # an output's type -> its text field


def _status(raw: dict, allowed: tuple[str, ...], param: str) -> str:
    """The status of a built-in call given back, required as OpenAI requires it (with the
    call's `id`, which only says the item came from a response: the stored copy gets an id
    of its own)."""
    _required(raw, "id", param)
    status = raw.get("status")
    if status not in allowed:
        raise invalid(
            f"{param}.status must be one of {', '.join(allowed)}, got {status!r}", f"{param}.status"
        )
    return status


def _code_interpreter_call(raw: dict, param: str) -> dict:
    """An earlier response's code_interpreter_call: its code and outputs (logs, images),
    which the prompt shows as the call and its logs."""
    status = _status(raw, _CODE_STATUSES, param)
    outputs = []
    for j, out in enumerate(typed_field(raw, "outputs", "an array", [], f"{param}.outputs")):
        where = f"{param}.outputs[{j}]"
        kind = out.get("type") if isinstance(out, dict) else None
        if kind not in _CODE_OUTPUT_TEXT:
            raise invalid(f'{where}.type must be "logs" or "image", got {kind!r}', f"{where}.type")
        text = _CODE_OUTPUT_TEXT[kind]
        outputs.append({"type": kind, text: _required(out, text, where)})
    return {
        "type": "code_interpreter_call",
        "code": typed_field(raw, "code", "a string", "", f"{param}.code"),
        "container_id": _required(raw, "container_id", param),
        "outputs": outputs,
        "status": status,
    }


def _file_search_call(raw: dict, param: str) -> dict:
    """An earlier response's file_search_call: its queries and, when it carries them, its
    results, which the prompt shows again as numbered, spotlighted sources."""
    status = _status(raw, _SEARCH_STATUSES, param)
    queries = typed_field(raw, "queries", "an array", param=f"{param}.queries")
    if queries is None:
        raise invalid(f"{param}.queries is required", f"{param}.queries")
    for j, query in enumerate(queries):
        if not isinstance(query, str):
            raise invalid(f"{param}.queries[{j}] must be a string", f"{param}.queries[{j}]")
    results = typed_field(raw, "results", "an array", None, f"{param}.results")
    return {
        "type": "file_search_call",
        "queries": list(queries),
        "results": None
        if results is None
        else [_search_result(r, f"{param}.results[{j}]") for j, r in enumerate(results)],
        "status": status,
    }


def _search_result(raw: Any, param: str) -> dict:
    if not isinstance(raw, dict):
        raise invalid(f"{param} must be an object", param)
    return {
        "file_id": typed_field(raw, "file_id", "a string", "", f"{param}.file_id"),
        "filename": typed_field(raw, "filename", "a string", "", f"{param}.filename"),
        "score": typed_field(raw, "score", "a number", 0.0, f"{param}.score"),
        "text": _required(raw, "text", param),
        "attributes": typed_field(raw, "attributes", "an object", {}, f"{param}.attributes"),
    }


def parse_items(raw: Any, param: str, limit: int | None = None) -> list[dict]:
    if not isinstance(raw, list):
        raise invalid(f"{param} must be an array of items", param)
    if limit is not None and len(raw) > limit:
        raise invalid(f"{param} may hold at most {limit} items per request", param)
    return [_item(item, f"{param}[{i}]") for i, item in enumerate(raw)]


def _input(body: dict, required: bool) -> list[dict]:
    """The input items; none (missing, null or `[]`) only where not `required`."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": raw}]}
        ]
    items = parse_items(raw, "input") if raw is not None else []
    if not items and required:
        raise invalid(
            "input must be a string or a non-empty array of items (it may be left out only "
            "to continue a previous_response_id or a conversation as it stands)",
            "input",
        )
    return items


# -- responses -----------------------------------------------------------------------------


_FILE_SEARCH_KEYS = {"type", "vector_store_ids", "max_num_results", "filters", "ranking_options"}


def _file_search(raw: dict, param: str) -> FileSearchTool:
    """`{"type": "file_search", "vector_store_ids", "max_num_results"?, "filters"?,
    "ranking_options"?}`, checked as the vector store search route checks its body."""
    for key in raw:
        if key not in _FILE_SEARCH_KEYS and raw[key] is not None:
            raise invalid(f"{param}.{key} is not supported", f"{param}.{key}")
    ids = raw.get("vector_store_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or len(ids) > MAX_SEARCHED_STORES
        or not all(isinstance(i, str) and i for i in ids)
    ):
        raise invalid(
            f"{param}.vector_store_ids must be an array of 1 to "
            f"{MAX_SEARCHED_STORES} vector store ids",
            f"{param}.vector_store_ids",
        )
    limit = raw.get("max_num_results")
    ranking = parse_ranking(raw.get("ranking_options"), f"{param}.ranking_options")
    return FileSearchTool(
        vector_store_ids=list(dict.fromkeys(ids)),
        max_num_results=(
            DEFAULT_MAX_RESULTS
            if limit is None
            else parse_max_results(limit, f"{param}.max_num_results")
        ),
        filters=parse_filters(raw.get("filters"), f"{param}.filters"),
        raw_filters=raw.get("filters"),
        score_threshold=ranking.score_threshold,
        ranker=ranking.ranker,
        hybrid_weights=ranking.weights,
    )


def _tools(body: dict) -> list[FunctionTool | CodeInterpreterTool | FileSearchTool]:
    """Function tools (a function declared by name only is a built-in the server runs,
    e.g. calculator), the built-in code_interpreter and file_search."""
    tools: list[FunctionTool | CodeInterpreterTool | FileSearchTool] = []
    for i, raw in enumerate(typed_field(body, "tools", "an array", [])):
        param = f"tools[{i}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind == "code_interpreter":
            if raw.get("container") is None:  # required in OpenAI's API too
                raise invalid(
                    f"Missing required parameter: '{param}.container'.", f"{param}.container"
                )
            tools.append(CodeInterpreterTool(raw["container"]))
            continue
        if kind == "file_search":
            tools.append(_file_search(raw, param))
            continue
        if kind != "function":
            raise invalid(
                f"{param}.type {kind!r} is not supported: only function, "
                "code_interpreter and file_search tools are",
                f"{param}.type",
            )
        name = _required(raw, "name", param)
        if not valid_name(name):
            raise invalid(
                f"{param}.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                f"{param}.name",
            )
        tools.append(
            FunctionTool(
                name=name,
                description=typed_field(
                    raw, "description", "a string", param=f"{param}.description"
                ),
                parameters=typed_field(raw, "parameters", "an object", param=f"{param}.parameters"),
                strict=typed_field(raw, "strict", "a boolean", param=f"{param}.strict"),
            )
        )
    if len({t.name for t in tools}) != len(tools):
        raise invalid("tools must have distinct names", "tools")
    return tools


def _tool_choice(body: dict, tools: list) -> str | dict:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice  # whether there are tools to require, the service checks
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid(f"tool_choice.name must be a string, got {name!r}", "tool_choice")
        return {"type": "function", "name": name}
    if isinstance(choice, dict) and choice.get("type") == "file_search":
        if not any(isinstance(t, FileSearchTool) for t in tools):
            raise invalid(
                'tool_choice {"type": "file_search"} needs a file_search tool', "tool_choice"
            )
        return {"type": "file_search"}
    if isinstance(choice, dict) and choice.get("type") == CODE_INTERPRETER:
        return {"type": CODE_INTERPRETER}  # declared or a default tool, the service checks
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return _allowed_tools(choice)
    raise invalid(
        'tool_choice must be "none", "auto", "required", {"type": "function", "name": ...}, '
        '{"type": "file_search"}, {"type": "code_interpreter"} or {"type": "allowed_tools", '
        '"mode": ..., "tools": [...]}',
        "tool_choice",
    )


def _allowed_tools(choice: dict) -> dict:
    """OpenAI's and the Open Responses spec's `allowed_tools`: every declared tool stays
    listed in the prompt (whose prefix the cache keeps as the allowed set changes), and the
    model may call only these, with `mode` "auto" (text or their calls) or "required"
    (their calls). Each is a function by name or a built-in by type (whether the request
    has it, the service checks)."""
    known_fields(choice, {"type", "mode", "tools"}, "tool_choice")
    mode = choice.get("mode")
    if mode not in ("auto", "required"):
        raise invalid(f'tool_choice.mode must be "auto" or "required", got {mode!r}', "tool_choice")
    tools = choice.get("tools")
    if not isinstance(tools, list) or not tools:
        raise invalid("tool_choice.tools must list at least one tool", "tool_choice")
    return {"type": "allowed_tools", "mode": mode, "tools": [_allowed_tool(t) for t in tools]}


def _allowed_tool(tool: Any) -> dict:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind == "function" and isinstance(tool.get("name"), str) and set(tool) == {"type", "name"}:
        return {"type": "function", "name": tool["name"]}
    if kind in (CODE_INTERPRETER, "file_search") and set(tool) == {"type"}:
        return {"type": kind}
    raise invalid(
        'each of tool_choice.tools must be {"type": "function", "name": ...}, '
        f'{{"type": "code_interpreter"}} or {{"type": "file_search"}}, got {tool!r}',
        "tool_choice",
    )


def _check_unsupported(body: dict) -> None:
    known_fields(body, _RESPONSE_FIELDS)
    tier = typed_field(body, "service_tier", "a string")
    if tier is not None and tier not in _SERVICE_TIERS:
        raise invalid(f"service_tier must be one of {', '.join(_SERVICE_TIERS)}", "service_tier")
    _check_reasoning(body)


def _check_reasoning(body: dict) -> None:
    """`reasoning`, for a model that does not reason: one that asks for nothing (`{}`,
    null fields, effort "none": the defaults SDKs and agent frameworks send) is taken,
    and the response reports `reasoning: null`; an effort or a summary is OpenAI's 400
    for a model without reasoning, naming the field."""
    reasoning = typed_field(body, "reasoning", "an object", {})
    known_fields(reasoning, _REASONING_FIELDS, "reasoning")
    for name in ("effort", "summary", "generate_summary"):
        value = reasoning.get(name)
        if value is not None and not (name == "effort" and value == "none"):
            raise invalid(
                f"Unsupported parameter: 'reasoning.{name}' is not supported with this model.",
                f"reasoning.{name}",
                "unsupported_parameter",
            )


def _stream(body: dict) -> bool:
    """`stream`, and its `stream_options` checked: OpenAI's one option,
    `include_obfuscation`, may be false (what this server does: its events carry no
    `obfuscation` padding); true is refused rather than silently not done."""
    stream = typed_field(body, "stream", "a boolean", False)
    options = typed_field(body, "stream_options", "an object")
    if options is None:
        return stream
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    known_fields(options, {"include_obfuscation"}, "stream_options")
    param = "stream_options.include_obfuscation"
    if typed_field(options, "include_obfuscation", "a boolean", False, param):
        raise invalid("stream obfuscation is not supported by this server", param)
    return stream


def _include(body: dict) -> list[str]:
    include = typed_field(body, "include", "an array", [])
    return check_include(include, lambda i: f"include[{i}]")


def check_include(values: list, param: Callable[[int], str]) -> list[str]:
    """`include` values, each one OpenAI's API takes (a 400 naming `param(i)` for the
    first that is not), without repeats: POST's body and GET's query take the same."""
    for i, value in enumerate(values):
        if value not in INCLUDABLE:
            raise invalid(
                f"{param(i)} {value!r} is not supported: only {', '.join(INCLUDABLE)} are",
                param(i),
            )
    return list(dict.fromkeys(values))


def check_query_include(query) -> list[str]:
    """A GET's `include` values (`include` or `include[]`, repeated), checked as POST's."""
    return check_include(query.getlist("include") + query.getlist("include[]"), lambda _: "include")


# text.verbosity: the verbosity a model without the setting writes at, the one value
# OpenAI takes for one (this one writes as it writes).
VERBOSITY = "medium"
# prompt_cache_retention: how this server keeps prompt prefixes (in its KV cache, the least
# recently used evicted first); OpenAI's "24h", retention on storage past memory, is
# refused as OpenAI refuses it for a model without it.
IN_MEMORY_RETENTION = "in_memory"
_FORMAT_KEYS = {
    "text": {"type"},
    "json_object": {"type"},
    "json_schema": {"type", "name", "schema", "strict", "description"},
}


def _the_one_value(body: dict, name: str, supported: str, param: str | None = None) -> str | None:
    """A string setting this server has one value of (`supported`), taken and echoed;
    another is OpenAI's 400 `unsupported_value` for a model without the setting."""
    value = typed_field(body, name, "a string", param=param)
    if value is not None and value != supported:
        raise invalid(
            f"Unsupported value: {value!r} is not supported with this model. "
            f"Supported values are: {supported!r}.",
            param or name,
            "unsupported_value",
        )
    return value


def _text_format(body: dict) -> dict:
    """text.format in OpenAI's shapes: text, json_object, or json_schema with a name and a
    schema (the schema itself is checked when its grammar is built)."""
    text = typed_field(body, "text", "an object", {})
    for key in text:
        if key not in ("format", "verbosity"):
            raise invalid(f"text.{key} is not supported", f"text.{key}")
    fmt = typed_field(text, "format", "an object", {"type": "text"}, "text.format")
    kind = fmt.get("type")
    if not isinstance(kind, str) or kind not in _FORMAT_KEYS:
        raise invalid(
            f'text.format.type must be "text", "json_object" or "json_schema", got {kind!r}',
            "text.format.type",
        )
    for key in fmt:
        if key not in _FORMAT_KEYS[kind]:
            raise invalid(
                f"text.format.{key} is not a field of the {kind} format", f"text.format.{key}"
            )
    if kind != "json_schema":
        return {"type": kind}
    name = _required(fmt, "name", "text.format")
    if not valid_name(name):
        raise invalid(
            "text.format.name must be 1 to 64 letters, digits, '_' or '-'", "text.format.name"
        )
    schema = typed_field(fmt, "schema", "an object", param="text.format.schema")
    if schema is None:
        raise invalid("text.format.schema is required", "text.format.schema")
    out = {
        "type": kind,
        "name": name,
        "schema": schema,
        "strict": typed_field(fmt, "strict", "a boolean", param="text.format.strict"),
    }
    description = typed_field(fmt, "description", "a string", param="text.format.description")
    return out if description is None else {**out, "description": description}


def _conversation_id(body: dict) -> str | None:
    """`conversation`: an id, or OpenAI's `{"id": ...}`, which has no other field."""
    raw = body.get("conversation")
    if isinstance(raw, dict):
        return _required(known_fields(raw, {"id"}, "conversation"), "id", "conversation")
    return typed_field(body, "conversation", "a string")


def parse_response_request(
    body: Any, resolve_model: Callable[[str | None], str], input_required: bool = True
) -> tuple[ResponseRequest, bool]:
    """The request and whether to stream it; `resolve_model` maps the requested model
    name to the served one (or raises 404). `input` is optional, as in the Open Responses
    spec, for a request that continues a history (`previous_response_id`, `conversation`):
    the model answers the history as it stands, a conversation's items appended with its
    items route, say. Without `input_required` (counting tokens) it is optional always."""
    _check_unsupported(body)
    previous = typed_field(body, "previous_response_id", "a string")
    conversation = _conversation_id(body)
    if previous is not None and conversation is not None:
        raise invalid(
            "previous_response_id and conversation cannot both be set", "previous_response_id"
        )
    truncation = typed_field(body, "truncation", "a string", "disabled")
    if truncation not in ("auto", "disabled"):
        raise invalid(f'truncation must be "auto" or "disabled", got {truncation!r}', "truncation")
    max_output = typed_field(body, "max_output_tokens", "an integer")
    if max_output is not None and max_output < 1:
        raise invalid(
            f"max_output_tokens must be at least 1, got {max_output}", "max_output_tokens"
        )
    temperature = typed_field(body, "temperature", "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise invalid(f"temperature must be in [0, 2], got {temperature}", "temperature")
    tools = _tools(body)
    max_tool_calls = typed_field(body, "max_tool_calls", "an integer", DEFAULT_MAX_TOOL_CALLS)
    if max_tool_calls < 0:
        raise invalid(f"max_tool_calls must be at least 0, got {max_tool_calls}", "max_tool_calls")
    request = ResponseRequest(
        model=resolve_model(typed_field(body, "model", "a string")),
        input=_input(body, input_required and previous is None and conversation is None),
        instructions=typed_field(body, "instructions", "a string"),
        previous_response_id=previous,
        conversation_id=conversation,
        store=typed_field(body, "store", "a boolean", True),
        background=typed_field(body, "background", "a boolean", False),
        max_output_tokens=max_output,
        temperature=temperature,
        top_p=typed_field(body, "top_p", "a number"),
        truncation=truncation,
        metadata=parse_metadata(body.get("metadata")),
        tools=tools,
        tool_choice=_tool_choice(body, tools),
        parallel_tool_calls=typed_field(body, "parallel_tool_calls", "a boolean", True),
        text_format=_text_format(body),
        verbosity=_the_one_value(
            typed_field(body, "text", "an object", {}), "verbosity", VERBOSITY, "text.verbosity"
        ),
        max_tool_calls=max_tool_calls,
        include=_include(body),
        user=typed_field(body, "user", "a string"),
        presence_penalty=typed_field(body, "presence_penalty", "a number", 0.0),
        frequency_penalty=typed_field(body, "frequency_penalty", "a number", 0.0),
        prompt_cache_key=typed_field(body, "prompt_cache_key", "a string"),
        prompt_cache_retention=_the_one_value(body, "prompt_cache_retention", IN_MEMORY_RETENTION),
        safety_identifier=typed_field(body, "safety_identifier", "a string"),
        top_logprobs=top_count(body, "top_logprobs") or 0,
    )
    return request, _stream(body)


def parse_stream_query(query: Any) -> tuple[bool, int]:
    """A GET's `stream` (true to stream a background response again) and `starting_after`
    (the sequence_number after which its events start; -1: from the first), which only a
    stream takes. `include_obfuscation` may be false, as on a POST's stream_options."""
    stream = _query_flag(query, "stream")
    if _query_flag(query, "include_obfuscation"):
        raise invalid("stream obfuscation is not supported by this server", "include_obfuscation")
    after_text = query.get("starting_after")
    if after_text is None:
        return stream, -1
    if not stream:
        raise invalid("starting_after is only allowed when stream is true", "starting_after")
    if not (after_text.isascii() and after_text.isdigit() and len(after_text) <= 18):
        raise invalid(
            f"starting_after must be a non-negative integer, got {after_text!r}", "starting_after"
        )
    return stream, int(after_text)


def _query_flag(query: Any, name: str) -> bool:
    """A boolean query parameter (false when absent)."""
    text = query.get(name, "false").lower()
    if text not in ("true", "1", "false", "0"):
        raise invalid(f"{name} must be true or false, got {text!r}", name)
    return text in ("true", "1")


def parse_limit(query: Any, most: int = MAX_PAGE, default: int = 20) -> int:
    """A page's `limit`: 1 to `most`, `default` when absent (100 and 20 for most lists,
    as OpenAI's)."""
    limit_text = query.get("limit", str(default))
    # ASCII digits only: str.isdigit also takes '²' (int() refuses it) and '５'
    digits = limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= len(str(most))
    if not digits or not 1 <= int(limit_text) <= most:
        raise invalid(f"limit must be an integer from 1 to {most}, got {limit_text!r}", "limit")
    return int(limit_text)


def parse_page(query: Any, most: int = MAX_PAGE, default: int = 20) -> Page:
    """`limit` (`parse_limit`), `after` or `before` (an item id: the page after it, or the
    one before it), `order` ("asc" or "desc")."""
    limit = parse_limit(query, most, default)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid(f'order must be "asc" or "desc", got {order!r}', "order")
    after, before = query.get("after"), query.get("before")
    if after is not None and before is not None:
        raise invalid("give after or before, not both", "before")
    return Page(limit=limit, after=after, order=order, before=before)
