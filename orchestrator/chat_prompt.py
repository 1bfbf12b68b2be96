"""Turn an OpenAI conversation (with tools) into what the model's chat template expects.

Templates that know about tools (they reference a `tools` variable, as Qwen2.5/Qwen3
and Llama 3.1 do) get the tool list and structured tool calls, exactly as transformers
would pass them. Templates without a tool section (SmolLM2's, for one) get our
documented default instead: a system-prompt section listing the tools as JSON and
asking for Hermes-style `<tool_call>` blocks, with past calls and tool results written
into the conversation as plain text in that same format, so any model sees one
consistent convention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.tokenizer import template_arguments
from orchestrator.chat_types import ChatRequest, Message, Tool
from orchestrator.tool_parser import CLOSE_TAG, OPEN_TAG
from orchestrator.untrusted import break_tool_tags

DEFAULT_TOOL_PROMPT = """# Tools

You can call functions to help answer. Their JSON schemas are listed one per line \
between <tools> and </tools>:
<tools>
{tools}
</tools>

To call a function, write <tool_call>, then on a line of its own a JSON object whose \
"name" is the function's name and whose "arguments" object holds a value for each of its \
parameters, then </tool_call>. For several calls, write several such blocks. Results \
come back between <tool_response> and </tool_response> tags; use them to write your \
answer."""

_REQUIRED = "You must call at least one of the functions listed above in your next reply."
_FORCED = "You must call the function {name!r} in your next reply."
_SINGLE = "Call at most one function per reply."


@dataclass
class ChatPrompt:
    messages: list[dict]
    tools: list[dict] | None  # for templates with a tool section; None otherwise


def template_supports_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def active_tools(request: ChatRequest) -> list[Tool]:
    """The tools the model is offered: none for "none", only the forced one if named."""
    if request.tool_choice == "none":
        return []
    if request.tool_choice == "function":
        return [t for t in request.tools if t.name == request.forced_tool]
    return request.tools


def build_chat_prompt(request: ChatRequest, native_tools: bool) -> ChatPrompt:
    tools = active_tools(request)
    extra = []
    if tools and not native_tools:
        listing = "\n".join(json.dumps(t.spec, ensure_ascii=False) for t in tools)
        extra.append(DEFAULT_TOOL_PROMPT.format(tools=listing))
    if request.tool_choice == "required":
        extra.append(_REQUIRED)
    elif request.tool_choice == "function":
        extra.append(_FORCED.format(name=request.forced_tool))
    if tools and not request.parallel_tool_calls:
        extra.append(_SINGLE)
    if native_tools:
        messages = [_native_message(m) for m in request.messages]
    else:
        messages = _plain_messages(request.messages)
    return ChatPrompt(
        messages=_with_system_text(messages, "\n\n".join(extra)),
        tools=[t.spec for t in tools] if native_tools and tools else None,
    )


def _base(message: Message) -> dict:
    # "developer" is OpenAI's newer name for system; templates only know "system".
    role = "system" if message.role == "developer" else message.role
    out: dict = {"role": role, "content": message.content or ""}
    if message.name is not None:
        out["name"] = message.name
    return out


def _native_message(message: Message) -> dict:
    out = _base(message)
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": template_arguments(c.arguments)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _plain_messages(messages: list[Message]) -> list[dict]:
    """Default format: calls and results become text the model was told about.

    Tool results go in a user turn (consecutive results share one, and a user message
    right after them joins it), so that templates which insist on alternating roles
    still render. A result's own tool tags are broken up (`break_tool_tags`), so its
    text stays inside its block.
    """
    out: list[dict] = []
    previous_was_result = False
    for message in messages:
        if message.role == "tool":
            block = f"<tool_response>\n{break_tool_tags(message.content or '')}\n</tool_response>"
            if previous_was_result:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            previous_was_result = True
            continue
        if message.role == "user" and previous_was_result:
            out[-1]["content"] += "\n\n" + (message.content or "")
            previous_was_result = False
            continue
        entry = _base(message)
        if message.tool_calls:
            blocks = [
                OPEN_TAG
                + "\n"
                + json.dumps(
                    {"name": c.name, "arguments": template_arguments(c.arguments)},
                    ensure_ascii=False,
                )
                + "\n"
                + CLOSE_TAG
                for c in message.tool_calls
            ]
            entry["content"] = "\n".join(filter(None, [entry["content"], *blocks]))
        out.append(entry)
        previous_was_result = False
    return out


def _with_system_text(messages: list[dict], extra: str) -> list[dict]:
    """Append `extra` to the leading system message(s), creating one if needed."""
    if not extra:
        return messages
    leading = 0
    while leading < len(messages) and messages[leading]["role"] == "system":
        leading += 1
    parts = [m["content"] for m in messages[:leading] if m["content"]]
    system = {"role": "system", "content": "\n\n".join([*parts, extra])}
    return [system, *messages[leading:]]
