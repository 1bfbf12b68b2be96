"""`calculator`: exact arithmetic on an expression, parsed, never evaluated as code.

A small recursive-descent parser reads numbers, + - * / // % **, unary signs and
parentheses, with Python's precedence (** binds tighter than a unary sign and
associates to the right); anything else (names, calls, strings) is refused at the
character where it starts. The parser is ours rather than `ast.parse` because CPython
3.11's AST builder keeps one recursion counter per interpreter, not per thread, and fails
with SystemError when another thread parses at the same moment.

Numbers are `Fraction`s, so 0.1 + 0.2 is exactly 0.3 and 1/3 stays a third; decimal
literals are read from their text, not from the nearest float. Powers are bounded so
that one call cannot build a number of millions of digits.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import ClassVar, NoReturn

from orchestrator.tools.base import ToolError, ToolOutput, string_argument

MAX_CHARS = 1000
MAX_DEPTH = 100  # nested parentheses and signs
MAX_EXPONENT = 10_000
MAX_BITS = 13_000  # of any intermediate numerator or denominator (about 3900 digits)
MAX_DECIMAL_EXPONENT = 4_000  # of a literal such as 1e300, within MAX_BITS' 3900 digits
APPROX_DIGITS = 12

_DIGITS = r"\d(?:_?\d)*"
_TOKEN = re.compile(
    rf"\s*(?:(?P<number>(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?)"
    r"|(?P<op>\*\*|//|[-+*/%()]))"
)
_HINTS = {"^": " (use ** for powers)", "=": " (write only the expression)"}


def _bits(value: Fraction) -> int:
    return max(abs(value.numerator).bit_length(), value.denominator.bit_length())


def _number(text: str) -> Fraction:
    """A literal's value. Its decimal exponent is checked first: Fraction("1e999999999")
    builds 10**999999999 before any size check could run (minutes of CPU, gigabytes)."""
    exponent = text.lower().partition("e")[2]
    if exponent and abs(int(exponent)) > MAX_DECIMAL_EXPONENT:
        raise ToolError(f"a number's exponent is limited to ±{MAX_DECIMAL_EXPONENT}")
    return Fraction(text)


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
    return _checked(base ** int(exponent))


def _divided(op: Callable[[Fraction, Fraction], Fraction]):
    def apply(left: Fraction, right: Fraction) -> Fraction:
        if right == 0:
            raise ToolError("division by zero")
        return _checked(Fraction(op(left, right)))

    return apply


def _plain(op: Callable[[Fraction, Fraction], Fraction]):
    return lambda left, right: _checked(op(left, right))


_ADDITIVE = {"+": _plain(operator.add), "-": _plain(operator.sub)}
_MULTIPLICATIVE = {
    "*": _plain(operator.mul),
    "/": _divided(operator.truediv),
    "//": _divided(operator.floordiv),
    "%": _divided(operator.mod),
}


@dataclass
class _Token:
    kind: str  # "number", "op" or "end"
    text: str
    at: int


def _tokens(source: str) -> list[_Token]:
    found, at = [], 0
    while True:
        match = _TOKEN.match(source, at)
        if match is None:
            rest = source[at:].lstrip()
            if not rest:
                return [*found, _Token("end", "", len(source))]
            start = len(source) - len(rest)
            word = re.match(r"[A-Za-z_]\w*|\S", rest).group()
            hint = (
                " (only numbers are allowed)"
                if word[0].isalpha() or word[0] == "_"
                else (_HINTS.get(word, ""))
            )
            raise ToolError(
                f"the expression is not valid arithmetic: unexpected {word!r} "
                f"at position {start}{hint}"
            )
        kind = match.lastgroup
        found.append(_Token(kind, match.group(kind), match.start(kind)))
        at = match.end()


class _Parser:
    """expression := term (('+'|'-') term)*;  term := unary (('*'|'/'|'//'|'%') unary)*;
    unary := ('+'|'-') unary | power;  power := atom ('**' unary)?;
    atom := number | '(' expression ')'."""

    def __init__(self, source: str) -> None:
        self.tokens = _tokens(source)
        self.position = 0
        self.depth = 0

    def parse(self) -> Fraction:
        value = self.expression()
        token = self.tokens[self.position]
        if token.kind != "end":
            self.unexpected(token)
        return value

    def peek(self) -> _Token:
        return self.tokens[self.position]

    def take(self) -> _Token:
        token = self.tokens[self.position]
        self.position += 1
        return token

    def unexpected(self, token: _Token) -> NoReturn:
        what = "end of the expression" if token.kind == "end" else repr(token.text)
        hint = " (a function call or a missing operator?)" if token.text == "(" else ""
        raise ToolError(
            f"the expression is not valid arithmetic: unexpected {what} "
            f"at position {token.at}{hint}"
        )

    def binary(self, operand: Callable[[], Fraction], table: dict) -> Fraction:
        value = operand()
        while self.peek().kind == "op" and self.peek().text in table:
            value = table[self.take().text](value, operand())
        return value

    def expression(self) -> Fraction:
        return self.binary(self.term, _ADDITIVE)

    def term(self) -> Fraction:
        return self.binary(self.unary, _MULTIPLICATIVE)

    def unary(self) -> Fraction:
        if self.peek().kind == "op" and self.peek().text in ("+", "-"):
            sign = self.take().text
            with _Nesting(self):
                value = self.unary()
            return -value if sign == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek().text == "**":
            self.take()
            with _Nesting(self):
                return _power(base, self.unary())
        return base

    def atom(self) -> Fraction:
        token = self.take()
        if token.kind == "number":
            return _checked(_number(token.text.replace("_", "")))
        if token.text == "(":
            with _Nesting(self):
                value = self.expression()
            if self.take().text != ")":
                self.unexpected(self.tokens[self.position - 1])
            return value
        self.unexpected(token)


class _Nesting:
    """Bounds recursion so that '((((…' is refused politely, not by RecursionError."""

    def __init__(self, parser: _Parser) -> None:
        self.parser = parser

    def __enter__(self) -> None:
        self.parser.depth += 1
        if self.parser.depth > MAX_DEPTH:
            raise ToolError("the expression is nested too deeply")

    def __exit__(self, *exc: object) -> None:
        self.parser.depth -= 1


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
    if scaled.bit_length() > MAX_BITS:  # past what Python prints (and anyone reads)
        return None
    sign = "-" if value < 0 else ""
    digits = str(scaled).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}" if places else f"{sign}{digits}"


def format_number(value: Fraction) -> str:
    exact = _finite_decimal(value)
    if exact is not None:
        return exact
    with localcontext(prec=APPROX_DIGITS):  # any magnitude: no float over- or underflow
        approx = f"{Decimal(value.numerator) / Decimal(value.denominator):g}"
    return f"{value.numerator}/{value.denominator} (≈ {approx})"


def calculate(expression: str) -> Fraction:
    """The exact value of `expression`, or ToolError saying what is wrong with it."""
    return _Parser(expression).parse()


# Numbers and operators in turn, each number behind any opening parentheses and signs and
# ahead of any closing ones: what a model writes under it is arithmetic from its first
# character (the parser, not this, checks that the parentheses pair up).
_OPERAND = r"[(\- ]*[0-9]+(\.[0-9]+)?[) ]*"
_EXPRESSION_PATTERN = rf"^ *{_OPERAND}((\*\*|//|[-+*/%]) *{_OPERAND})*$"


class Calculator:
    name = "calculator"
    description = (
        "Exact arithmetic. Evaluates an expression of numbers with + - * / // % ** "
        "and parentheses, e.g. '(1200 - 950) / 950 * 100'. Fractions stay exact."
    )
    # The pattern holds what an expression may hold, so a constrained call (a forced one)
    # cannot run into markup: the 135M model, offered any string, wrote
    # `17*23}}</tool_call>...` inside it until its token budget ran out. Offered any run of
    # those characters, it closed the quotes at once for three of ten questions (a failed
    # call on ""); held to numbers and operators in turn it wrote an expression for all ten.
    parameters: ClassVar[dict] = {
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "description": "The arithmetic expression.",
                "pattern": _EXPRESSION_PATTERN,
                "maxLength": MAX_CHARS,
            }
        },
        "required": ["expression"],
        "additionalProperties": False,
    }

    async def execute(self, arguments: dict, call_id: str) -> ToolOutput:
        expression = string_argument(arguments, "expression", MAX_CHARS)
        return ToolOutput(format_number(calculate(expression)))
