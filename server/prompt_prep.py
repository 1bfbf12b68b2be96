"""A request's prompt turned into token ids, with the checks that bound the work: what
the preparation process (server/prep_process.py) runs for a large prompt, and the event
loop for a small one.

The child imports this module to run these functions, so it imports only what rendering
and tokenizing need (the tokenizer, the chat prompt's assembly, the error shapes): not
torch, the engine or the store, which would cost the child seconds of start-up and
hundreds of megabytes for nothing it uses.
"""

from __future__ import annotations

import json

from engine.errors import ContextLengthExceededError
from engine.tokenizer import chat_template_options, truncate_prompt
from orchestrator.chat_prompt import build_chat_prompt
from orchestrator.chat_types import ChatRequest
from server.errors import APIError, invalid
from server.prep_process import PromptContext


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Prompt token ids a client sends must name tokens of the model."""
    beyond = next((t for t in ids if t >= vocab_size), None)
    if beyond is not None:
        raise invalid(
            f"{param} must hold token ids below the vocabulary size ({vocab_size}), got {beyond}",
            param=param,
        )


def check_prompt_chars(num_chars: int, limit: int, param: str) -> None:
    """Refuse a prompt too long to fit before paying to render or tokenize it."""
    if num_chars > limit:
        raise context_error(
            f"the {param} has {num_chars} characters; this server accepts at most {limit} "
            "per prompt (its context window could not hold more)",
            param,
        )


def context_error(message: str, param: str) -> APIError:
    return invalid(message, param=param, code="context_length_exceeded")


def window_error(exc: ContextLengthExceededError, max_model_len: int, param: str) -> APIError:
    """A prompt the tokenizer found too long before tokenizing all of it."""
    return context_error(
        f"This model's maximum context length is {max_model_len} tokens; {exc}", param
    )


def check_context(num_prompt: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    """Reject up front what cannot fit, with OpenAI's wording and error code. `max_tokens`
    None: at least one token; 0: none (a prompt scored, not continued)."""
    wanted = num_prompt + (1 if max_tokens is None else max_tokens)
    if wanted > max_model_len:
        completion = max_tokens if max_tokens is not None else "at least 1"
        raise context_error(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {wanted} tokens ({num_prompt} in the {param}, {completion} in the "
            "completion). Please reduce the length of the prompt or of max_tokens.",
            param,
        )


def prompt_chars(request: ChatRequest) -> int:
    """The text a request puts into its prompt: contents, past calls, tool schemas and
    the template variables (chat_template_kwargs), which a template may write out."""
    chars = sum(len(t.name) + len(json.dumps(t.spec)) for t in request.tools)
    chars += len(json.dumps(request.chat_template_kwargs, ensure_ascii=False))
    for m in request.messages:
        chars += len(m.content or "") + sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
    return chars


def encode_chat_prompt(
    context: PromptContext, request: ChatRequest, truncate: int | None
) -> list[int]:
    """Render and tokenize (in the preparation process for a large prompt), after
    checking the request's size; `truncate` (truncate_prompt_tokens) keeps the last
    tokens of a prompt that may be longer than the window."""
    check_prompt_chars(prompt_chars(request), context.max_prompt_chars, "messages")
    tokenizer = context.tokenizer
    prompt = build_chat_prompt(request, context.native_tools)
    options = chat_template_options(
        request.add_generation_prompt,
        request.continue_final_message,
        prompt.tools,
        request.chat_template_kwargs,
    )
    max_len = context.max_model_len
    try:
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, **options)
        ids = tokenizer.encode_chat_text(text, max_tokens=None if truncate else max_len)
        return truncate_prompt(ids, truncate, max_len)
    except ContextLengthExceededError as exc:
        raise window_error(exc, max_len, "messages") from None
    # Templates reject conversations with jinja's raise_exception (a TemplateError) or
    # trip on a shape they do not expect; either way the messages are what to fix.
    except Exception as exc:
        raise invalid(
            f"the model's chat template cannot render these messages: {exc}", "messages"
        ) from None


def prepare_prompts(
    context: PromptContext,
    prompts: list[str | list[int]],
    echo: bool,
    completion: int | None,
    truncate: int | None,
    special: bool,
) -> tuple[list[list[int]], list[str]]:
    """Each prompt as token ids, and as text when echoed (in the preparation process for
    large prompts), after the size and vocabulary checks that make tokenizing and
    decoding them safe and bounded. `truncate` (truncate_prompt_tokens) keeps each
    prompt's last tokens; a prompt it cut echoes the tokens kept. `special`
    (add_special_tokens) frames text prompts with the model's special tokens (a BOS)."""
    tokenizer, max_len = context.tokenizer, context.max_model_len
    ids_list: list[list[int]] = []
    echoed: list[str] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            check_prompt_chars(len(prompt), context.max_prompt_chars, "prompt")
            try:
                ids = tokenizer.encode(
                    prompt, add_special_tokens=special, max_tokens=None if truncate else max_len
                )
            except ContextLengthExceededError as exc:
                raise window_error(exc, max_len, "prompt") from None
        else:
            ids = prompt
        kept = truncate_prompt(ids, truncate, max_len)
        check_context(len(kept), completion, max_len, "prompt")
        if isinstance(prompt, list):
            check_token_ids(kept, context.vocab_size, "prompt")
        if not kept:
            raise invalid("prompt must not be empty", "prompt")
        ids_list.append(kept)
        if echo:
            # Token prompts echo every token as written, special ones (`<|im_start|>`)
            # included, as a text prompt holding them does.
            whole = isinstance(prompt, str) and len(kept) == len(ids)
            echoed.append(prompt if whole else tokenizer.decode(kept, skip_special_tokens=False))
    return ids_list, echoed
