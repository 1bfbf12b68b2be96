"""What every built-in tool is: a name, a JSON schema for its arguments and an async
`execute`, returning a `ToolOutput` or raising `ToolError` with a message for the model.

A tool may also have an `argument_schema`: a stricter schema that constrained decoding
enforces on its calls, kept apart from the `parameters` the model is shown. sql_query's
holds a regular expression of every query its database can run, far too long for the
prompt; its `parameters` say only `{"sql": string}` and its description lists the schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ToolError(Exception):
    """A failure the model should read and can act on (bad arguments, a failed query)."""


class ToolUnavailable(Exception):
    """The tool cannot run on this server (no sandbox, no database): the message says why."""


@dataclass
class ToolOutput:
    text: str  # what the model reads back (a function_call_output's `output`)
    outputs: list[dict] = field(default_factory=list)  # code_interpreter_call `outputs`


class Tool(Protocol):
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object

    async def execute(self, arguments: dict, call_id: str) -> ToolOutput: ...


def argument_schema(tool: Tool) -> dict:
    """The schema a call of `tool` is decoded under: its `argument_schema` if it has one,
    else the `parameters` the model is shown."""
    return getattr(tool, "argument_schema", None) or tool.parameters


def string_argument(arguments: dict, name: str, max_chars: int) -> str:
    """The required string argument `name`, or a ToolError that names it. JSON's `\\ud800`
    escape decodes to a lone surrogate, which is no text a query or a program can be given
    (encoding it fails): refused here, so the model reads why."""
    value = arguments.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ToolError(f"the argument '{name}' must be a non-empty string")
    if len(value) > max_chars:
        raise ToolError(f"the argument '{name}' is longer than {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ToolError(
            f"the argument '{name}' is not text: it holds an unpaired surrogate"
        ) from None
    return value
