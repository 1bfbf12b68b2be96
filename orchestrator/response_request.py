"""The parsed `POST /v1/responses` request, and the checks it must pass before a turn starts.

The server's routes (server/responses_protocol.py) parse a body into a `ResponseRequest`;
`ResponseService.create` then checks it against what the store and the server's tools
add (`check_*`) and derives the engine's sampling parameters from it. The turn reads
its tool configuration and text format from it as it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine import SamplingParams
from orchestrator.agent import CODE_INTERPRETER, DEFAULT_MAX_TOOL_CALLS
from orchestrator.chat_types import Tool
from orchestrator.context import ToolConfig, call_output_text, item_text
from orchestrator.errors import InvalidRequestError
from orchestrator.output_structure import ANY_OBJECT, require_json_mention
from orchestrator.store import History
from orchestrator.tools.file_search import FileSearchTool


@dataclass
class FunctionTool:
    """A client-executed function the model may call (Responses' flat tool shape)."""

    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def as_dict(self) -> dict:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }

    def chat_tool(self) -> Tool:
        function = {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }
        spec = {k: v for k, v in function.items() if v is not None}
        return Tool(self.name, {"type": "function", "function": spec})


@dataclass
class CodeInterpreterTool:
    """The built-in code_interpreter tool (`{"type": "code_interpreter", "container":
    {"type": "auto"}}`); the server runs its calls in a sandbox."""

    container: dict | str
    name: str = CODE_INTERPRETER

    def as_dict(self) -> dict:
        return {"type": "code_interpreter", "container": self.container}


# The `include` value that asks for each output_text token's logprobs.
OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"
# The `include` value that asks for a file_search_call's results.
FILE_SEARCH_RESULTS = "file_search_call.results"


@dataclass
class ResponseRequest:
    """A validated `POST /v1/responses` body (the server parses and checks it)."""

    model: str
    input: list[dict]  # items without ids: message, function_call, function_call_output
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation_id: str | None = None
    store: bool = True
    # Run on in the server, apart from the request (`orchestrator/background.py`).
    background: bool = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    truncation: str = "disabled"  # "disabled" | "auto"
    metadata: dict = field(default_factory=dict)
    tools: list[FunctionTool | CodeInterpreterTool | FileSearchTool] = field(default_factory=list)
    # "none" | "auto" | "required" | {"type": "function", "name"} | {"type": "file_search"}
    # | {"type": "code_interpreter"}
    tool_choice: str | dict = "auto"
    parallel_tool_calls: bool = True
    # text.format as given: {"type": "text"}, {"type": "json_object"} or
    # {"type": "json_schema", "name", "schema", "strict"[, "description"]}.
    text_format: dict = field(default_factory=lambda: {"type": "text"})
    verbosity: str | None = None  # text.verbosity as given ("medium", the model's own)
    max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS  # built-in calls one response may run
    include: list[str] = field(default_factory=list)  # e.g. "file_search_call.results"
    top_logprobs: int = 0  # likeliest tokens beside each output_text token's, with the include
    user: str | None = None  # the client's own end-user label, echoed (OpenAI's, deprecated)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Echoed hints: OpenAI routes by the first to its prompt caches (this server's prefix
    # cache needs no key) and tracks abuse by the second (this server has its own users).
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prompt_cache_retention: str | None = None  # "in_memory", the one this server has

    @property
    def logprobs(self) -> int | None:
        """The top logprobs to ask the engine for (None: no logprobs): only when `include`
        asks for the output text's logprobs, as OpenAI gives them only then."""
        return self.top_logprobs if OUTPUT_TEXT_LOGPROBS in self.include else None

    def format_schema(self) -> dict | None:
        """The JSON schema text.format asks for (None: free text)."""
        kind = self.text_format["type"]
        if kind == "text":
            return None
        return ANY_OBJECT if kind == "json_object" else self.text_format["schema"]

    def tool_config(self, declared: list[FunctionTool] | None = None) -> ToolConfig:
        """The tools offered to the model: `declared` (every tool's function declaration,
        built-ins with their schema filled in) or the request's own function tools."""
        tools = (
            declared
            if declared is not None
            else [t for t in self.tools if isinstance(t, FunctionTool)]
        )
        choice = self.tool_choice
        allowed = allowed_tools(choice)
        if allowed is not None:
            mode, forced = choice["mode"], None
        elif isinstance(choice, dict):
            mode, forced = "function", choice.get("name", choice["type"])
        else:
            mode, forced = choice, None
        if not tools:
            mode = "none"
        offered = [t for t in tools if mode != "function" or t.name == forced]
        return ToolConfig(
            [t.chat_tool() for t in offered] if mode != "none" else [],
            mode,
            forced,
            self.parallel_tool_calls,
            allowed,
        )


def function_tools(declarations: list[dict]) -> list[FunctionTool]:
    """Tool declarations (`ResolvedTools.declarations`: built-ins with their schema filled
    in, the client's functions) as the function tools offered to the model."""
    return [
        FunctionTool(d["name"], d.get("description"), d.get("parameters"), d.get("strict"))
        for d in declarations
    ]


def allowed_tools(choice: str | dict) -> frozenset[str] | None:
    """The names of the tools an `allowed_tools` choice lets the model call (a built-in
    named by its type); None for any other choice."""
    if not (isinstance(choice, dict) and choice["type"] == "allowed_tools"):
        return None
    return frozenset(tool.get("name", tool["type"]) for tool in choice["tools"])


def later_tool_choice(choice: str | dict) -> str | dict:
    """The tool choice of a response's generations after its first: a forced or required
    call was made, so "auto", within the allowed tools when the choice names them (a
    hard limit for the whole response, as the Open Responses spec has it)."""
    return {**choice, "mode": "auto"} if allowed_tools(choice) is not None else "auto"


def check_tool_choice(choice: str | dict, offered: list[FunctionTool]) -> None:
    """A tool choice that forces a call needs the tool: among the request's own, or the
    server's default tools, which are offered without being declared. A built-in is
    named by its type (`{"type": "code_interpreter"}`), a function by its name; so are
    the tools an `allowed_tools` choice names."""
    if choice == "required" and not offered:
        raise InvalidRequestError('tool_choice "required" needs tools', "tool_choice")
    allowed = allowed_tools(choice)
    if allowed is not None:
        names = sorted(allowed)
    else:
        names = [choice.get("name", choice["type"])] if isinstance(choice, dict) else []
    for name in names:
        if name not in {t.name for t in offered}:
            raise InvalidRequestError(
                f"tool_choice names the tool {name!r}, which is not in tools", "tool_choice"
            )


def check_json_mention(request: ResponseRequest, history: History) -> None:
    """The json_object format needs the word JSON in the instructions, a message or a tool
    result of the context, as OpenAI requires of chat messages."""
    if request.text_format["type"] != "json_object":
        return
    texts = [request.instructions]
    for item in [*history.items, *request.input]:  # messages and tool results, as in chat
        kind = item.get("type", "message")
        if kind == "message":
            texts.append(item_text(item))
        elif kind == "function_call_output":
            texts.append(call_output_text(item))
    require_json_mention(texts, "input", "text.format")


def sampling_params(request: ResponseRequest) -> SamplingParams:
    """The engine's sampling parameters the request sets; a value they refuse is a 400
    naming the request's own field."""
    chosen = {"temperature": request.temperature, "top_p": request.top_p}
    try:
        return SamplingParams(
            max_tokens=request.max_output_tokens,
            logprobs=request.logprobs,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            **{k: v for k, v in chosen.items() if v is not None},
        )
    except ValueError as exc:  # SamplingParams names the field first
        message = str(exc).replace("max_tokens", "max_output_tokens")
        raise InvalidRequestError(message, param=message.split(" ", 1)[0]) from None


def check_call_outputs(history: list[dict], input_items: list[dict]) -> None:
    """Calls and outputs must pair up, as OpenAI requires: each function_call_output
    answers a function call made before it (in the history or earlier in the input), and
    each call the history left unanswered (a client's function, the previous turn's end)
    gets its output in this input. Either way the model would otherwise read a tool
    result nothing asked for, or a call whose result never came."""
    calls = {item["call_id"] for item in history if item["type"] == "function_call"}
    answered = {item["call_id"] for item in history if item["type"] == "function_call_output"}
    waiting = calls - answered
    for item in input_items:
        if item["type"] == "function_call":
            calls.add(item["call_id"])
        elif item["type"] == "function_call_output":
            if item["call_id"] not in calls:
                raise InvalidRequestError(
                    f"No tool call found for function call output with call_id {item['call_id']}.",
                    "input",
                )
            waiting.discard(item["call_id"])
    if waiting:
        raise InvalidRequestError(
            f"No tool output found for function call {sorted(waiting)[0]}.", "input"
        )
