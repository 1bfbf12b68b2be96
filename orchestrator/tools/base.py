"""What every built-in tool is: a name, a JSON schema for its arguments and an async
`execute`, returning a `ToolOutput` or raising `ToolError` with a message for the model."""

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


def string_argument(arguments: dict, name: str, max_chars: int) -> str:
    """The required string argument `name`, or a ToolError that names it."""
    value = arguments.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ToolError(f"the argument '{name}' must be a non-empty string")
    if len(value) > max_chars:
        raise ToolError(f"the argument '{name}' is longer than {max_chars} characters")
    return value
