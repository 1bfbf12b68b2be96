"""`calculator`: exact arithmetic on an expression, parsed, never evaluated as code.

The expression is parsed with Python's `ast` and only numeric literals, + - * / // %
**, unary signs and parentheses are accepted; everything else (names, calls,
attributes, strings) is refused before any evaluation. Numbers are `Fraction`s, so
0.1 + 0.2 is exactly 0.3 and 1/3 stays a third; decimal literals are read from their
text, not from the nearest float. Powers are bounded so that one call cannot build a
number of millions of digits.
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction
from typing import ClassVar

from orchestrator.tools.base import ToolError, ToolOutput, string_argument

MAX_CHARS = 1000
MAX_EXPONENT = 10_000
MAX_BITS = 13_000  # of any intermediate numerator or denominator (about 3900 digits)
APPROX_DIGITS = 12

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_HINTS = {ast.BitXor: " (use ** for powers)", ast.Name: " (only numbers are allowed)",
          ast.Call: " (functions are not supported)"}


def _bits(value: Fraction) -> int:
    return max(abs(value.numerator).bit_length(), value.denominator.bit_length())


def _checked(value: Fraction) -> Fraction:
    if _bits(value) > MAX_BITS:
        raise ToolError("the result is too large to compute exactly")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise ToolError("only whole-number exponents give exact results")
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponents are limited to ±{MAX_EXPONENT}")
    if _bits(base) * abs(int(exponent)) > MAX_BITS:
        raise ToolError("the result of this power would be too large")
    if base == 0 and exponent < 0:
        raise ToolError("division by zero")
    return base ** int(exponent)


def _literal(node: ast.Constant, source: str) -> Fraction:
    """A number as written (0.1 is one tenth, not the float nearest to it)."""
    if isinstance(node.value, int):
        return _checked(Fraction(node.value))
    text = ast.get_source_segment(source, node) or repr(node.value)
    try:
        return _checked(Fraction(text.replace("_", "")))
    except ValueError:
        raise ToolError(f"the number {text} is not supported") from None


def _evaluate(node: ast.AST, source: str) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, source)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _literal(node, source)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, source))
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, source), _evaluate(node.right, source)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        if type(node.op) in _BINARY:
            if right == 0 and not isinstance(node.op, ast.Add | ast.Sub | ast.Mult):
                raise ToolError("division by zero")
            return _checked(Fraction(_BINARY[type(node.op)](left, right)))
        what = type(node.op)
    else:
        what = type(node)
    raise ToolError(f"unsupported element in the expression: {what.__name__}"
                    f"{_HINTS.get(what, '')}")


def _finite_decimal(value: Fraction) -> str | None:
    """The exact decimal text of `value`, when its denominator is 2^a·5^b."""
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return None
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    sign = "-" if value < 0 else ""
    digits = str(scaled).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}" if places else f"{sign}{digits}"


def format_number(value: Fraction) -> str:
    exact = _finite_decimal(value)
    if exact is not None:
        return exact
    try:
        approx = f"{value.numerator / value.denominator:.{APPROX_DIGITS}g}"
    except OverflowError:
        approx = "beyond the float range"
    return f"{value.numerator}/{value.denominator} (≈ {approx})"


def calculate(expression: str) -> Fraction:
    """The exact value of `expression`, or ToolError saying what is wrong with it."""
    expression = expression.strip()
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"the expression is not valid arithmetic: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ToolError("the expression is too complex") from None
    try:
        return _evaluate(tree, expression)
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None


class Calculator:
    name = "calculator"
    description = ("Exact arithmetic. Evaluates an expression of numbers with + - * / // % ** "
                   "and parentheses, e.g. '(1200 - 950) / 950 * 100'. Fractions stay exact.")
    parameters: ClassVar[dict] = {
        "type": "object",
        "properties": {"expression": {"type": "string",
                                      "description": "The arithmetic expression."}},
        "required": ["expression"],
        "additionalProperties": False,
    }

    async def execute(self, arguments: dict, call_id: str) -> ToolOutput:
        expression = string_argument(arguments, "expression", MAX_CHARS)
        return ToolOutput(format_number(calculate(expression)))
