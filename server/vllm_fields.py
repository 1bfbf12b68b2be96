"""vLLM's own request fields on chat, completions and embeddings, beside OpenAI's
(server/protocol.py, server/embeddings.py):
those this server honours (cache_salt, request_id, the token-id options, structured outputs
and the older guided_* fields, documents, beam search), those that change nothing here
(type-checked), and those it cannot honour (a value but the default is a 400 naming the
field). None is ever silently ignored: a vLLM client either gets what it asked for or is
told why not."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.chat_types import Guided, ResponseFormat
from server.errors import KINDS, invalid, typed_field

MAX_CACHE_SALT_CHARS = 1024  # vLLM's bound
MAX_REQUEST_ID_CHARS = 256  # repeated in every chunk of a stream


def cache_salt(body: dict) -> str | None:
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


def token_ids_options(body: dict) -> dict[str, bool]:
    """vLLM's token-id options, for clients (RL trainers) that need the exact tokens:
    `return_token_ids` (the prompt's and each choice's token ids beside the text) and
    `return_tokens_as_token_ids` (logprobs name each token "token_id:N", not by its text)."""
    return {
        name: typed_field(body, name, "a boolean", False)
        for name in ("return_token_ids", "return_tokens_as_token_ids")
    }


# vLLM's request fields that change nothing here, as they change nothing in vLLM serving
# this model on one machine: only their types are checked.
_INERT_FIELDS = {
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


def _check(
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


# vLLM's embedding request fields (its EmbeddingCompletionRequest) beside those
# server/embeddings.py honours: the same treatment as on the other routes.
_EMBEDDING_INERT_FIELDS = {
    "mm_processor_kwargs": "an object",  # options for media inputs; the inputs are text
}
_EMBEDDING_UNSUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "priority": _UNSUPPORTED_FIELDS["priority"],
    "truncation_side": _UNSUPPORTED_FIELDS["truncation_side"],
    "padding": (("do_not_pad",), "inputs are not padded"),
    "additional_data": ((), "no pooler here reads it"),
}


def check_embedding_fields(body: dict) -> None:
    """vLLM's fields of an embedding request that server/embeddings.py does not read
    (`_check`); `cache_salt` is checked as vLLM bounds it, and changes nothing: embeddings
    share no prefix cache."""
    cache_salt(body)
    _check(body, _EMBEDDING_INERT_FIELDS, _EMBEDDING_UNSUPPORTED_FIELDS)


def check_common_fields(body: dict) -> None:
    """vLLM's fields both routes share (`_check`)."""
    _check(body, _INERT_FIELDS, _UNSUPPORTED_FIELDS)


def check_chat_fields(body: dict) -> None:
    """vLLM's chat-only fields (`_check`)."""
    _check(body, _CHAT_INERT_FIELDS, _CHAT_UNSUPPORTED_FIELDS)


def check_completion_fields(body: dict) -> None:
    """vLLM's completions-only fields (`_check`)."""
    _check(body, {}, _COMPLETION_UNSUPPORTED_FIELDS)


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
    if not isinstance(value, KINDS[expected]):
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


def requested_structure(body: dict, response_format: ResponseFormat | None) -> Guided | None:
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


def beam_search_fields(body: dict, refused: dict[str, bool]) -> dict[str, Any]:
    """vLLM's `use_beam_search` and `length_penalty` (beam search's: without it, it changes
    nothing and is only type-checked). `refused`: the request's fields beam search cannot
    answer (tools, logprobs...), by name, and whether they were sent: the first sent is a
    400 naming it. The sampling fields it cannot answer are refused once they are
    parsed (`server.generation.beam_search_params`)."""
    use = typed_field(body, "use_beam_search", "a boolean", False)
    length_penalty = typed_field(body, "length_penalty", "a number", 1.0)
    sent = next((name for name, given in refused.items() if given), None)
    if use and sent is not None:
        raise invalid(f"{sent} cannot be combined with use_beam_search", sent)
    return {"use_beam_search": use, "length_penalty": length_penalty}


def template_documents(body: dict) -> list[dict[str, str]] | None:
    """vLLM's `documents` (for retrieval-augmented templates): objects of strings, such
    as {"title", "text"}, given to the template as its `documents` variable."""
    documents = typed_field(body, "documents", "an array")
    if documents is not None and not all(
        isinstance(d, dict) and all(isinstance(v, str) for v in d.values()) for d in documents
    ):
        raise invalid("documents must be an array of objects of strings", "documents")
    return documents
