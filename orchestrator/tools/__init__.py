"""Built-in tools the server runs itself: one module per tool, and the registry.

`ToolRegistry` maps a tool's name to the tool (its JSON schema and its async
`execute`); `builtin_tools()` builds the registry of this server, leaving out a tool
that cannot run here and keeping the reason, so that asking for it gets a clear
error instead of a tool that fails on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.sandbox import Sandbox
from orchestrator.tools.base import (
    Tool,
    ToolError,
    ToolOutput,
    ToolUnavailable,
    argument_schema,
)
from orchestrator.tools.calculator import Calculator
from orchestrator.tools.code_interpreter import CodeInterpreter
from orchestrator.tools.sql_query import SqlQuery


@dataclass
class ResolvedTools:
    """A request's tools: the built-ins the server runs, the client's own functions, and
    every declaration in Responses' function shape (for the prompt's tool listing)."""

    builtins: dict[str, Tool] = field(default_factory=dict)
    client_functions: list[str] = field(default_factory=list)
    declarations: list[dict] = field(default_factory=list)

    def call_schema(self, name: str, declaration: dict) -> dict | None:
        """The schema a call of `name` is decoded under: a built-in's enforced
        `argument_schema`, else the declaration's own `parameters`."""
        tool = self.builtins.get(name)
        if tool is None or name in self.client_functions:
            return declaration.get("parameters")
        return argument_schema(tool)


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool], unavailable: dict[str, str] | None = None):
        self.tools = {tool.name: tool for tool in tools}
        self.unavailable = dict(unavailable or {})

    def get(self, name: str) -> Tool:
        """The tool, or ToolUnavailable saying why this server cannot offer it."""
        if name in self.tools:
            return self.tools[name]
        raise ToolUnavailable(self.unavailable.get(name, f"there is no built-in tool '{name}'"))

    def declaration(self, name: str) -> dict:
        """The Responses function-tool declaration the prompt lists for `name`."""
        tool = self.get(name)
        return {
            "type": "function",
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
            "strict": True,
        }

    def resolve(self, declared: list[dict], defaults: Iterable[str] = ()) -> ResolvedTools:
        """Sort a request's `tools` into built-ins and client functions.

        `{"type": "code_interpreter", "container": {"type": "auto"}}` and a function
        declared by a built-in's name only (`{"type": "function", "name": "calculator"}`)
        are built-ins, their schema filled in here; a function with `parameters`, or
        another name, is the client's (one without `parameters` takes none). `defaults`
        (the server's --default-tools) are offered as well, unless a client function has
        the name: a call of that name is the client's to run, and a built-in of the same
        name would take it (the model's call of it vanished, run by neither). A built-in
        this server cannot run raises ToolUnavailable naming the entry. Entries of other
        types (file_search, made per request by the response service) are left out."""
        resolved = ResolvedTools()
        wanted: list[tuple[str, str]] = [(name, "default tools") for name in defaults]
        for i, tool in enumerate(declared):
            if tool.get("type") == "code_interpreter":
                _check_container(tool.get("container"), f"tools[{i}].container")
                wanted.append(("code_interpreter", f"tools[{i}]"))
            elif tool.get("type") == "function" and self._builtin_named(tool):
                wanted.append((tool.get("name"), f"tools[{i}]"))
            elif tool.get("type") == "function":
                resolved.client_functions.append(tool.get("name"))
                resolved.declarations.append(tool)
        for name, where in wanted:
            if name in resolved.builtins:
                continue
            if name in resolved.client_functions:  # a default (declared names are distinct)
                continue
            try:
                resolved.builtins[name] = self.get(name)
            except ToolUnavailable as exc:
                raise ToolUnavailable(f"{where}: {exc}") from None
            resolved.declarations.append(self.declaration(name))
        return resolved

    def _builtin_named(self, tool: dict) -> bool:
        """A function declared without parameters under a built-in's name (one this
        server runs, or one it would name the reason it cannot)."""
        name = tool.get("name")
        return tool.get("parameters") is None and (name in self.tools or name in self.unavailable)


def _check_container(container: object, param: str) -> None:
    """code_interpreter's container: `{"type": "auto"}`, each call a fresh empty sandbox.
    What else OpenAI's auto container takes (`file_ids` to copy in, `memory_limit`,
    `network_policy`) is refused rather than ignored: the code would run without it."""
    if not (isinstance(container, dict) and container.get("type") == "auto"):
        raise ToolUnavailable(
            f'{param}: only {{"type": "auto"}} is supported (each call runs in a fresh sandbox)'
        )
    for key, value in container.items():
        if key != "type" and value not in (None, []):
            raise ToolUnavailable(
                f"{param}.{key}: not supported (each call runs in a fresh, empty sandbox "
                "with the server's limits)"
            )


def builtin_tools(database: Path | None = None, sandbox: Sandbox | None = None) -> ToolRegistry:
    """Every built-in tool that can run here: sql_query on `database` (the demo sales
    database by default), code_interpreter on `sandbox` (a default one by default)."""
    makers: dict[str, Callable[[], Tool]] = {
        "calculator": Calculator,
        "sql_query": lambda: SqlQuery(database),
        "code_interpreter": lambda: CodeInterpreter(sandbox),
    }
    tools, unavailable = [], {}
    for name, make in makers.items():
        try:
            tools.append(make())
        except ToolUnavailable as exc:
            unavailable[name] = str(exc)
    return ToolRegistry(tools, unavailable)


__all__ = [
    "ResolvedTools",
    "Tool",
    "ToolError",
    "ToolOutput",
    "ToolRegistry",
    "ToolUnavailable",
    "builtin_tools",
]
