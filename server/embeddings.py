"""`POST /v1/embeddings` in OpenAI's shape: parse the body, embed, format the list.

`input` is a string, a list of strings, a list of token ids or a list of such lists; token
ids are the embedding model's own WordPiece ids. `encoding_format` "base64" sends each
vector as little-endian float32 bytes, which is what the openai SDK asks for by default.
vLLM's own fields are honoured (`truncate_prompt_tokens`, `add_special_tokens`,
`normalize` or `use_activation`, `endianness`), type-checked where they change nothing,
or, where this server cannot honour them, a 400 naming the field (`embed_dtype` other than
float32, and server/vllm_fields.py's). vLLM's chat-style request (`messages`) is a 400.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from starlette.responses import Response

from engine.tokenizer import truncate_prompt
from server.errors import APIError, invalid, typed_field
from server.json_body import json_response
from server.vllm_fields import check_embedding_fields, request_id

if TYPE_CHECKING:
    from orchestrator.accounts import Meter
    from orchestrator.retrieval.embeddings import Embedder, Encoded

MAX_INPUTS = 2048
MAX_INPUT_TOKENS = 8192  # per input, as OpenAI's; longer inputs are embedded in windows
MAX_REQUEST_TOKENS = 300_000


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str] | None  # exactly one of texts / token_ids is set
    token_ids: list[list[int]] | None
    encoding_format: Literal["float", "base64"]
    # vLLM's: keep each input's last n tokens (-1: the model's window of them)
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True  # vLLM's: [CLS] and [SEP] frame each window
    normalize: bool = True  # vLLM's: unit length, the model's output; else the mean pooled
    byte_order: Literal["<", ">"] = "<"  # base64's, from vLLM's `endianness`


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _parse_input(value: Any, vocab_size: int) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid(
            "input must be a non-empty string, array of strings, array of token ids "
            "or array of token-id arrays",
            param="input",
        )
    # One array of token ids is one input, however long (its length is checked in tokens).
    sequences = [value] if _is_token_list(value) else value
    if len(sequences) > MAX_INPUTS:
        raise invalid(
            f"input must have at most {MAX_INPUTS} items, got {len(sequences)}", param="input"
        )
    if all(isinstance(v, str) for v in value):
        if any(not v for v in value):
            raise invalid("input must not contain empty strings", param="input")
        return value, None
    if not all(_is_token_list(s) and s for s in sequences):
        raise invalid(
            "input must be a string, an array of strings, an array of token ids or "
            "an array of non-empty token-id arrays, not a mix",
            param="input",
        )
    if any(t < 0 or t >= vocab_size for s in sequences for t in s):
        raise invalid(f"input token ids must be in [0, {vocab_size})", param="input")
    return None, sequences


def parse_embedding_request(body: Any, embedder: Embedder) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid("model is required and must be a string", param="model")
    if model != embedder.name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server embeds with {embedder.name!r}",
            param="model",
            code="model_not_found",
        )
    if body.get("messages") is not None:
        raise invalid(
            "chat embeddings (messages) are not supported: send the text as input",
            param="messages",
        )
    texts, token_ids = _parse_input(body.get("input"), embedder.vocab_size)
    # null is the default, as omitted; any other value not a string is a 400, not the default
    encoding_format = typed_field(body, "encoding_format", "a string", "float")
    if encoding_format not in ("float", "base64"):
        raise invalid("encoding_format must be 'float' or 'base64'", param="encoding_format")
    dimensions = typed_field(body, "dimensions", "an integer")
    if dimensions is not None and dimensions != embedder.dimensions:
        raise invalid(
            f"dimensions must be {embedder.dimensions} for {embedder.name}", param="dimensions"
        )
    typed_field(body, "user", "a string")
    return EmbeddingRequest(texts, token_ids, encoding_format, *_vllm_fields(body))


_BYTE_ORDERS = {"native": "<" if sys.byteorder == "little" else ">", "little": "<", "big": ">"}


def _vllm_fields(body: dict) -> tuple[int | None, bool, bool, Literal["<", ">"]]:
    """vLLM's own fields of an embedding request: those this server honours, checked, and
    a 400 naming any that would ask for what it cannot do."""
    truncate = typed_field(body, "truncate_prompt_tokens", "an integer")
    if truncate is not None and truncate != -1 and truncate < 1:
        raise invalid(
            f"truncate_prompt_tokens must be -1 (the model's window) or an integer >= 1, "
            f"got {truncate}",
            param="truncate_prompt_tokens",
        )
    special_tokens = typed_field(body, "add_special_tokens", "a boolean", True)
    normalize = typed_field(body, "normalize", "a boolean")
    activation = typed_field(body, "use_activation", "a boolean")  # vLLM's newer name
    if None not in (normalize, activation) and normalize != activation:
        raise invalid("normalize and use_activation disagree", param="use_activation")
    embed_dtype = typed_field(body, "embed_dtype", "a string", "float32")
    if embed_dtype != "float32":
        raise invalid(
            f"embed_dtype {embed_dtype!r} is not supported: embeddings are float32",
            param="embed_dtype",
        )
    endianness = typed_field(body, "endianness", "a string", "native")
    if endianness not in _BYTE_ORDERS:
        raise invalid("endianness must be 'native', 'little' or 'big'", param="endianness")
    request_id(body)  # checked as on chat and completions; it names nothing here
    check_embedding_fields(body)
    unit = next((v for v in (normalize, activation) if v is not None), True)
    return truncate, special_tokens, unit, _BYTE_ORDERS[endianness]


def _check_lengths(token_ids: list[list[int]], special_tokens: bool) -> None:
    """Each input within MAX_INPUT_TOKENS and all within MAX_REQUEST_TOKENS; without
    special tokens, a text that has no tokens (whitespace) leaves the model nothing."""
    for i, ids in enumerate(token_ids):
        if not ids and not special_tokens:
            raise invalid(
                f"input[{i}] has no tokens, so without special tokens there is nothing to embed",
                param="input",
            )
        if len(ids) > MAX_INPUT_TOKENS:
            raise invalid(
                f"input[{i}] has {len(ids)} tokens; the limit is {MAX_INPUT_TOKENS}", param="input"
            )
    total = sum(len(ids) for ids in token_ids)
    if total > MAX_REQUEST_TOKENS:
        raise invalid(
            f"input has {total} tokens in all; the limit is {MAX_REQUEST_TOKENS}", param="input"
        )


def _format_vector(vector: np.ndarray, encoding_format: str, byte_order: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype(f"{byte_order}f4").tobytes()).decode("ascii")
    return vector.tolist()


async def create_embeddings(
    embedder: Embedder, request: EmbeddingRequest, meter: Meter
) -> Response:
    """Embed the inputs, their tokens reserved on `meter` first (a user's quota and tpm, as
    generation's) and counted as its input batch by batch as they go to the embedder
    (`Embedder.aencode_metered`): a client that goes away mid-way (the route cancels this)
    is charged the batches embedded, not given them for free."""
    token_ids = request.token_ids
    if token_ids is None:
        assert request.texts is not None
        token_ids = await embedder.atokenize(request.texts)
    window = embedder.window_tokens(request.add_special_tokens)
    token_ids = [truncate_prompt(ids, request.truncate_prompt_tokens, window) for ids in token_ids]
    _check_lengths(token_ids, request.add_special_tokens)
    encoded = await embedder.aencode_metered(
        token_ids, meter, special_tokens=request.add_special_tokens, normalize=request.normalize
    )
    tokens = sum(encoded.token_counts)
    # 2,048 inputs' vectors as JSON floats are some 15 MB, about a second to format and
    # render: not on the event loop, where every other stream would stall meanwhile (the
    # vectors are formatted on a worker thread, and `json_response` renders them there).
    content = await asyncio.to_thread(_answer, encoded, request, embedder.name, tokens)
    return await json_response(content)


def _answer(encoded: Encoded, request: EmbeddingRequest, model: str, tokens: int) -> dict:
    """The embedding list in OpenAI's shape."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _format_vector(vector, request.encoding_format, request.byte_order),
        }
        for i, vector in enumerate(encoded.vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
