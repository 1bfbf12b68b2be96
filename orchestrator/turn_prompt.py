"""What each generation of a turn is shown after the history, and the grammar its
output must follow.

`ResponseService.create` builds the first generation's prompt (to check the request and
reserve its tokens before the turn starts); the `Turn` builds the later ones. Both use
these, so every generation of a turn is framed the same way.
"""

from __future__ import annotations

from engine.structured_output import StructuredOutputsParams
from orchestrator.context import ToolConfig, item_text
from orchestrator.output_structure import check_left_out, turn_structure
from orchestrator.response_request import FunctionTool, ResponseRequest
from orchestrator.tools import ResolvedTools

ANSWER_REMINDER = (
    "Question: {}\nAnswer the question in one short sentence, using the results above."
)


def model_turn_structure(
    request: ResponseRequest,
    config: ToolConfig,
    tools: ResolvedTools,
    shows_calls: bool = False,
    after_results: bool = False,
) -> StructuredOutputsParams | None:
    """The grammar a model turn's output must follow: text.format's JSON, and the turn's
    offered tools' calls (forced by "required" or a named function, lazily triggered by
    "auto"), a built-in's arguments under its enforced schema (`argument_schema`), which
    can be stricter than the parameters the prompt lists. A schema the grammar cannot
    take is a 400 naming its field (a function's `tools[i].parameters`). Where the prompt
    shows tool calls or results (`shows_calls`: `shows_tool_items`), text holds none of
    the protocol's tags, and right after results (`after_results`: `prompt_input`) it
    does not open with `<` (`output_structure.protocol_text`)."""
    functions = [(t.name, tools.call_schema(t.name, t.spec["function"])) for t in config.callable]
    fmt = request.text_format
    return turn_structure(
        functions,
        config.mode,
        config.parallel,
        request.format_schema(),
        "text.format",
        "text.format.schema",
        _function_params(request),
        strict_functions=_strict_functions(request),
        strict_format=fmt["name"] if fmt.get("strict") else None,
        shows_calls=shows_calls,
        after_results=after_results,
    )


# The items the prompt renders as tool calls and their results (orchestrator/context.py).
_TOOL_ITEMS = {"function_call", "function_call_output", "code_interpreter_call", "file_search_call"}


def shows_tool_items(items: list[dict]) -> bool:
    """Whether a prompt showing `items` holds tool calls or results."""
    return any(item.get("type") in _TOOL_ITEMS for item in items)


def check_turn_structures(
    request: ResponseRequest, config: ToolConfig, tools: ResolvedTools
) -> None:
    """A request's schemas checked before its turn starts (a bad one is a 400 naming its
    field): the first generation's grammar, and the client functions it does not offer
    ("none", another function named, one allowed_tools leaves out), which a later
    generation may (tool_choice is "auto" after a forced call); as in OpenAI's API,
    whatever the tool_choice."""
    model_turn_structure(request, config, tools)
    declared = [(t.name, t.parameters) for t in request.tools if isinstance(t, FunctionTool)]
    offered = {t.name for t in config.callable}
    check_left_out(
        declared, offered, _function_params(request), "tools", _strict_functions(request)
    )


def _strict_functions(request: ResponseRequest) -> set[str]:
    """The client functions declared `"strict": true`, held to OpenAI's strict rules; one
    that leaves `strict` out is not, so that a request accepted before still is."""
    return {t.name for t in request.tools if isinstance(t, FunctionTool) and t.strict}


def _function_params(request: ResponseRequest) -> dict[str, str]:
    """Each client function's name to its schema's place in the request."""
    return {
        t.name: f"tools[{i}].parameters"
        for i, t in enumerate(request.tools)
        if isinstance(t, FunctionTool)
    }


def prompt_input(
    history: list[dict],
    input_items: list[dict],
    made: list[dict],
    output: list[dict],
    config: ToolConfig,
) -> tuple[list[dict], bool]:
    """What a generation's prompt shows after the history (the input, this turn's output
    so far as the prompt renders it, `output`), and whether tool results end it (this
    turn's own, or the client's function_call_output closing the input). Offered no
    tools, that is an answer turn, whose prompt repeats the question."""
    shown = [*input_items, *output]
    after_results = (shown or [{}])[-1].get("type") == "function_call_output"
    # The question may be in the history when the input holds only the tool results.
    question = user_question([*history, *input_items])
    # file_search's own output ends with the question already (and how to cite).
    searched = bool(made) and made[-1]["type"] == "file_search_call"
    if after_results and not config.tools and question is not None and not searched:
        shown.append(_question_reminder(question))
    return shown, after_results


def _question_reminder(question: str) -> dict:
    """The user message that follows tool results on an answer turn: the question again,
    outside the results' untrusted frame, and what to do with them. Without it a small
    model answers the frame rather than the question, which may be far above the
    results: it repeats the frame's markup or its reminder line. Only the prompt shows
    it, never the response's items."""
    return {"type": "message", "role": "user", "content": ANSWER_REMINDER.format(question)}


def user_question(items: list[dict]) -> str | None:
    """The text of the last user message of the input (what file_search also searches)."""
    for item in reversed(items):
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return item_text(item).strip() or None
    return None
