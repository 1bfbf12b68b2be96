"""Context assembly: instructions + history + this turn's input -> the prompt's token ids.

Items are turned into chat messages and rendered with the model's chat template through
the same chat format as /v1/chat/completions (`orchestrator.chat_prompt`: tool listing, calls
and results), so a conversation reads the same to the model whichever API carried it.

The prompt extends the previous turn token for token wherever it can: when the newly
rendered text starts with the text of the previous turn's prompt+output tokens, those
tokens are kept as they are and only the rest is tokenized. Re-tokenizing the whole
text would usually give the same ids, but not always (a reply cut mid-word, a template
that re-spaces), and any difference early on would cost the radix prefix cache the
whole history after it. When the text does not extend (other instructions, a deleted
item, a dropped turn), the prompt is rendered afresh and the cache still serves
whatever prefix is shared.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.client import TokenizerLike
from orchestrator.agent import code_interpreter_as_function_items, file_search_as_function_items
from orchestrator.chat_prompt import build_chat_prompt, template_supports_tools
from orchestrator.chat_types import ChatRequest, Message, Tool, ToolCall
from orchestrator.errors import InvalidRequestError
from orchestrator.retrieval.index import Hit
from orchestrator.store import History
from orchestrator.tools.file_search import render_sources
from orchestrator.untrusted import spotlight

SEARCH_HISTORY_BUDGET = 4_000  # characters of an earlier search's results in a prompt
# No token takes more characters than this (the tokenizers here average 3-5): a prompt of
# more characters than this many per token of the window cannot fit, which can be known
# before paying to render and tokenize it.
PROMPT_CHARS_PER_TOKEN = 16
# An input_file part's text as stored (orchestrator/input_resolver.py): prompts show it,
# reads of items never do.
FILE_TEXT = "file_text"


@dataclass
class ToolConfig:
    """The function tools offered this turn, in chat-format terms."""

    tools: list[Tool] = field(default_factory=list)  # listed in the prompt
    mode: str = "none"  # "none" | "auto" | "required" | "function"
    forced: str | None = None
    parallel: bool = True
    # The listed tools the model may call (a Responses `allowed_tools` choice); None: all.
    allowed: frozenset[str] | None = None

    @property
    def callable(self) -> list[Tool]:
        """The listed tools the model may call this turn."""
        return [t for t in self.tools if self.allowed is None or t.name in self.allowed]


@dataclass
class Prompt:
    token_ids: list[int]
    reused_tokens: int  # leading ids taken as-is from the previous turn
    dropped_items: int  # history items left out to fit the window (truncation "auto")


def item_text(item: dict) -> str:
    """A message item's own words, its parts joined: a refusal part's is its `refusal`
    (what the assistant said, as an output_text part's `text` is); its files are not."""
    content = item.get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(
        part.get("refusal", part.get("text", ""))
        for part in content
        if part.get("type") != "input_file"
    )


def call_output_text(item: dict) -> str:
    """A function_call_output's result as text: its string, or its text parts joined (the
    list form of `output`, which holds input_text parts only)."""
    output = item["output"]
    return output if isinstance(output, str) else "\n".join(part["text"] for part in output)


def _message_text(item: dict, special_tokens: Iterable[str]) -> str:
    """A message item as the prompt shows it: its parts in order, each input_file's text
    whole (it was checked to fit when given) and spotlighted as data from the user's
    file, so that its instructions, chat tokens and tool tags do not act."""
    content = item.get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(
        spotlight(
            part[FILE_TEXT],
            f"file {part['filename']} given by the user",
            limit=None,
            special_tokens=special_tokens,
        )
        if part.get("type") == "input_file"
        else part.get("refusal", part.get("text", ""))
        for part in content
    )


def _search_text(item: dict, special_tokens: Iterable[str]) -> str:
    """What an earlier response's file_search_call shows now: its results when the
    request included them (stored), else a note that they were not kept."""
    results = item.get("results")
    if not results:
        return "[the results of this search were not kept; search again to read them]"
    hits = [
        Hit("", r["file_id"], r["filename"], 0, r["text"], r.get("attributes") or {}, r["score"])
        for r in results
    ]
    return render_sources(hits, 1, SEARCH_HISTORY_BUDGET, special_tokens)[0]


def _function_items(items: list[dict], special_tokens: Iterable[str]) -> list[dict]:
    """Items with each code_interpreter_call and file_search_call as the function call +
    output pair a chat template can render."""
    flat = []
    for item in items:
        if item.get("type") == "code_interpreter_call":
            flat += code_interpreter_as_function_items(item)
        elif item.get("type") == "file_search_call":
            flat += file_search_as_function_items(item, _search_text(item, special_tokens))
        else:
            flat.append(item)
    return flat


def _framed_output(item: dict, names: dict[str, str], special_tokens: Iterable[str]) -> str:
    """A function call's output as the prompt shows it: spotlighted as data from its tool.
    The server's file_search output is framed source by source already (`framed`). The
    same item framed again reads the same, so every turn that shows it extends the last
    one's prompt token for token."""
    if item.get("framed"):
        return item["output"]
    name = names.get(item["call_id"], "function")
    return spotlight(call_output_text(item), f"tool {name}", special_tokens=special_tokens)


def items_to_messages(items: list[dict], special_tokens: Iterable[str] = ()) -> list[Message]:
    """Responses items -> chat messages: a function call joins the assistant message it
    follows (as a chat assistant turn holds text and tool calls together). Every tool
    output, of this turn or an earlier one, the server's tools or the client's, enters as
    untrusted data (`spotlight`), with `special_tokens` (the tokenizer's) broken up."""
    flat = _function_items(items, special_tokens)
    names = {i["call_id"]: i["name"] for i in flat if i.get("type") == "function_call"}
    messages: list[Message] = []
    for item in flat:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(Message(item["role"], _message_text(item, special_tokens)))
        elif kind == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            if messages and messages[-1].role == "assistant":
                messages[-1].tool_calls.append(call)
            else:
                messages.append(Message("assistant", None, tool_calls=[call]))
        elif kind == "function_call_output":
            output = _framed_output(item, names, special_tokens)
            messages.append(Message("tool", output, tool_call_id=item["call_id"]))
    return messages


def characters(value) -> int:
    """The characters of every string in an item (texts, arguments, outputs, ids)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(characters(v) for v in value.values())
    if isinstance(value, list):
        return sum(characters(v) for v in value)
    return 0


def _cuts(items: list[dict], input_items: list[dict]) -> list[int]:
    """Where the history may start when its oldest items are dropped, oldest first: at
    each user message (a turn's start) and at its end, except where a function_call_output
    after the cut (in the history or this turn's input) answers a call before it. A call
    and its output are kept or dropped together: the model never reads a result without
    the call that asked for it (nor the question of a turn the input continues)."""
    answers = _answered_calls([*items, *input_items])
    # the earliest call answered after the cut, at first by this turn's input
    earliest = min([len(items), *(call for out, call in answers.items() if out >= len(items))])
    cuts = [len(items)] if earliest == len(items) else []
    for i in range(len(items) - 1, -1, -1):
        item = items[i]
        kind = item.get("type", "message")
        if kind == "function_call_output":
            earliest = min(earliest, answers[i])
        elif kind == "message" and item.get("role") == "user" and earliest >= i:
            cuts.append(i)
    return cuts[::-1]


def _answered_calls(items: list[dict]) -> dict[int, int]:
    """Each function_call_output's index -> the index of the call it answers: the latest
    function_call with its call_id before it (a client-built history may reuse an id in
    two turns), or its own index when none is."""
    latest: dict[str, int] = {}
    answers = {}
    for i, item in enumerate(items):
        if item.get("type") == "function_call":
            latest[item["call_id"]] = i
        elif item.get("type") == "function_call_output":
            answers[i] = latest.get(item["call_id"], i)
    return answers


class ContextBuilder:
    def __init__(self, tokenizer: TokenizerLike, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.native_tools = template_supports_tools(tokenizer.chat_template)
        self.special_tokens = tuple(tokenizer.all_special_tokens)

    def build(
        self,
        instructions: str | None,
        history: History,
        input_items: list[dict],
        tools: ToolConfig,
        max_output_tokens: int | None,
        truncate: bool,
    ) -> Prompt:
        """The prompt for this turn, or InvalidRequestError when it cannot fit.

        With `truncate`, a history too long for the window is cut at a turn's start (never
        the instructions or this turn's input), chosen so the prefix cache keeps serving it:
        where the previous prompt started (`history.start`) while that still fits, so the
        prompt extends the previous one; else anew, dropping enough oldest turns that the
        prompt takes at most half the room left beside the output, so that the next turns
        fit at that start too (or the fewest that fit, when no start gets it that short).
        Cutting at the fewest oldest turns each time would move the start every turn, and
        no prefix would ever be shared. The starts are bisected, a few renders, not one
        per turn."""
        budget = self.max_model_len - (max_output_tokens or 1)
        items = history.items
        cuts = _cuts(items, input_items)
        dropped = self._drop_beyond_characters(instructions, items, input_items, cuts, truncate)
        # Where the kept history may start: whole turns, the fewest dropped first.
        starts = [dropped, *(s for s in cuts if s > dropped)]

        @functools.cache
        def render(k: int) -> Prompt:
            base = history.context_tokens if starts[k] == history.start else None
            ids, reused = self._render(instructions, items[starts[k] :], input_items, tools, base)
            return Prompt(ids, reused, starts[k])

        def fewest_dropped(limit: int, too_long: int, fits: int) -> Prompt:
            """The prompt of the fewest-dropped start within `limit` tokens, between
            `too_long` (whose prompt exceeds it) and `fits` (whose prompt is within)."""
            while fits - too_long > 1:
                middle = (fits + too_long) // 2
                if len(render(middle).token_ids) <= limit:
                    fits = middle
                else:
                    too_long = middle
            return render(fits)

        prompt = render(0)
        if len(prompt.token_ids) <= budget:
            return prompt
        if truncate:
            previous = starts.index(history.start) if history.start in starts else 0
            prompt = render(previous)
            if len(prompt.token_ids) <= budget:
                return prompt
            last = len(starts) - 1
            shortest = render(last)
            if len(shortest.token_ids) <= budget:
                half = budget // 2
                limit = half if len(shortest.token_ids) <= half else budget
                # Every start up to the previous one is too long already.
                return fewest_dropped(limit, previous, last)
            prompt = shortest
        ids = prompt.token_ids
        wanted = len(ids) + (max_output_tokens or 1)
        # Truncation can only help where there is history it may drop.
        hint = ' or set truncation to "auto"' if not truncate and len(starts) > 1 else ""
        raise InvalidRequestError(
            f"This model's maximum context length is {self.max_model_len} tokens. However, "
            f"this response needs {wanted} tokens ({len(ids)} in the input, "
            f"{max_output_tokens or 'at least 1'} in the output). Shorten the input or "
            f"max_output_tokens{hint}.",
            param="input",
            code="context_length_exceeded",
        )

    def _drop_beyond_characters(
        self,
        instructions: str | None,
        items: list[dict],
        input_items: list[dict],
        cuts: list[int],
        truncate: bool,
    ) -> int:
        """How many oldest history items to leave out before rendering, by characters
        alone: a conversation grown far past the window (megabytes of items) would
        otherwise be rendered and tokenized whole, in time and memory that grow with it.
        Without `truncate` that is a 400 at once. `cuts`: where the history may start."""
        limit = PROMPT_CHARS_PER_TOKEN * self.max_model_len
        fixed = len(instructions or "") + sum(map(characters, input_items))
        sizes = [characters(item) for item in items]
        total = fixed + sum(sizes)
        if total <= limit:
            return 0
        # Truncation cannot help beyond the latest cut: it never drops the instructions,
        # the input, nor the turn of a call the input answers.
        latest = cuts[-1] if cuts else 0
        least = fixed + sum(sizes[latest:])
        hopeless = least > limit
        if not truncate or hopeless:
            what = "instructions, history and input"
            if hopeless:
                what = "instructions and input" + (
                    "" if latest == len(items) else " with the turns of the calls it answers"
                )
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens, and "
                f"this response's {what} have {least if hopeless else total} characters, "
                f"more than {limit} could ever fit. Shorten the input"
                + ("." if hopeless else ' or set truncation to "auto".'),
                param="input",
                code="context_length_exceeded",
            )
        dropped = 0
        for start in cuts:  # whole turns, oldest first
            if start <= dropped:
                continue
            total -= sum(sizes[dropped:start])
            dropped = start
            if total <= limit:
                break
        return dropped

    def _render(
        self,
        instructions: str | None,
        history: list[dict],
        input_items: list[dict],
        tools: ToolConfig,
        base: list[int] | None,
    ) -> tuple[list[int], int]:
        messages = items_to_messages([*history, *input_items], self.special_tokens)
        if instructions:
            messages.insert(0, Message("system", instructions))
        request = ChatRequest(
            model=None,
            messages=messages,
            sampling={},
            tools=tools.tools,
            tool_choice=tools.mode,
            forced_tool=tools.forced,
            parallel_tool_calls=tools.parallel,
        )
        chat = build_chat_prompt(request, self.native_tools)
        try:
            fresh = self.tokenizer.encode_chat(
                chat.messages, add_generation_prompt=True, tools=chat.tools
            )
        # A template rejects a conversation with raise_exception or trips on its shape.
        except Exception as exc:
            raise InvalidRequestError(
                f"the model's chat template cannot render this conversation: {exc}", "input"
            ) from None
        if not base:
            return fresh, 0
        if fresh[: len(base)] == base:
            return fresh, len(base)
        decode = self.tokenizer.decode
        base_text = decode(base, skip_special_tokens=False)
        text = decode(fresh, skip_special_tokens=False)
        if not text.startswith(base_text):
            return fresh, 0
        return base + self.tokenizer.encode(text[len(base_text) :]), len(base)
