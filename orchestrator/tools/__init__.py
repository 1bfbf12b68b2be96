"""Built-in tools the server runs itself: one module per tool, and the registry.

`ToolRegistry` maps a tool's name to the tool (its JSON schema and its async
`execute`); `builtin_tools()` builds the registry of this server, leaving out a tool
that cannot run here and keeping the reason, so that asking for it gets a clear
error instead of a tool that fails on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from orchestrator.sandbox import Sandbox
from orchestrator.tools.base import Tool, ToolError, ToolOutput, ToolUnavailable
from orchestrator.tools.calculator import Calculator
from orchestrator.tools.code_interpreter import CodeInterpreter
from orchestrator.tools.sql_query import SqlQuery


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
        return {"type": "function", "name": tool.name, "description": tool.description,
                "parameters": tool.parameters, "strict": True}


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


__all__ = ["Tool", "ToolError", "ToolOutput", "ToolRegistry", "ToolUnavailable",
           "builtin_tools"]
