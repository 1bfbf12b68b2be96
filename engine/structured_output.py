"""Structured outputs: grammar-constrained decoding on llguidance.

A request asks for a structure with `StructuredOutputsParams` (vLLM's names: a JSON schema,
any JSON object, a regular expression, a choice among strings, or a Lark / GBNF grammar).
The request is checked when the parameters are built, without a tokenizer, so a bad schema
or a feature llguidance cannot express is a `ValueError` naming it before anything runs,
never a silently unconstrained answer.

Each constrained sequence owns an `LLMatcher` that follows its output. At every step
`GrammarMasks.submit` computes the allowed-token masks of the batch's constrained rows on a
worker thread while the forward pass runs; the sampler sets the other tokens of those rows
to -inf, and rows without a grammar are never touched. A matcher that can take no token but
EOS (the grammar is complete) finishes its sequence with "stop".

llguidance was chosen over xgrammar by measurement (docs/engine.md, benchmarks/
bench_grammar.py): both compute a step's masks in well under a millisecond, which the forward
pass hides, while llguidance compiles a schema about seven times faster (that cost is on the
request's path) and rejects the JSON Schema keywords it cannot enforce where xgrammar
ignores them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import llguidance
import numpy as np
import torch

from engine.errors import NothingToSampleError
from engine.thread_pinning import keep_cpus

# Compact, deterministic JSON: what json.dumps writes, and no free whitespace a model could
# fill until its budget ends.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The escapes a string may use (the letters after its backslash) in a schema whose objects
# list properties and allow others: all of JSON's but `\u`. See _json_options.
_ESCAPES_WITHOUT_U = '"\\bfnrt'
# The characters llguidance writes only as a `\u` escape in a const's or an enum's text;
# without `\u` it would leave them out of the value.
_ONLY_U_ESCAPED = re.compile("[\x00-\x07\x0b\x0e-\x1f\x7f]")

_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# llguidance compiles a schema recursively, into each `$ref`'s target, on the native stack:
# about 2,800 nested objects fill an 8 MiB stack and crash the process. A request body
# nests at most 64 levels, so only `$ref` chains get near; real schemas stay far below.
MAX_SCHEMA_DEPTH = 1024
# The integers llguidance can take in a schema: it reads them as an i64 or a u64, and those
# whose f64 is -2**63 (from -(2**63 - 512) down) crash the process (a segfault) as a const,
# an enum's value or a range's both bounds.
SCHEMA_INTEGERS = range(-(2**63) + 513, 2**64)
# The least float a schema may hold. An integer schema's float bound, const or enum value
# is cast to an i64, saturating: -1e300 becomes -2**63 and crashes the process as the
# integers above do. llguidance's JSON parser may also round a float one step (1024 here)
# from the nearest f64: -(2**63) + 1024, written as Python writes it, reaches -2**63.
SCHEMA_FLOAT_MIN = float(-(2**63) + 2048)
# Where a Lark grammar embeds a JSON schema: the directive, then the schema's JSON (which
# llguidance's lexer reads after any whitespace).
_JSON_DIRECTIVE = re.compile(r"%json[ \t\r\n]*")
# llguidance also compiles a Lark grammar recursively, through each rule or token into the
# ones it names and into each group, `(...)` or `[...]`: a chain of about 2,500 rules
# crashes the process (a segfault), one of 400 rules each nested in 20 groups too.
MAX_GRAMMAR_DEPTH = 1024
# A Lark rule's or token's head, at the start of its line: `?name[attributes].priority:`.
_LARK_HEAD = re.compile(
    r"^[ \t]*[?!]?([A-Za-z_]\w*)[ \t]*(?:\[[^\]\n]*\])?[ \t]*(?:\.-?\d+)?[ \t]*:", re.M
)
# A rule's body as tokens: what cannot name a rule (comments, strings, regular
# expressions, special tokens, a directive's JSON argument), names, and groups.
_LARK_TOKEN = re.compile(
    r"""(?P<skip>//[^\n]*|"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)+/|<[^>\n]*>)"""
    r"|(?P<directive>%(?:json|regex|llguidance)[ \t\r\n]*)"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<open>[(\[])|(?P<close>[)\]])"
)


@dataclass
class StructuredOutputsParams:
    """Exactly one of the fields: the structure every output of the request must have.

    `json` is a JSON schema (a dict or its JSON text); `json_object` any JSON object;
    `regex` a regular expression (Rust `regex` syntax); `choice` one of these strings;
    `grammar` a Lark grammar (llguidance's dialect, which may embed `%json {schema}`) or a
    GBNF grammar.
    """

    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # The llguidance grammar the fields compile to; built and checked at construction.
    llg_grammar: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs must set exactly one of "
                f"{', '.join(_KINDS)}; got {', '.join(given) or 'none'}"
            )
        kind = given[0]
        self.llg_grammar = _checked_grammar(kind, getattr(self, kind))

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name for `StructuredOutputsParams`, with its options, so scripts that
    pass `SamplingParams(guided_decoding=GuidedDecodingParams(...))` run unchanged.

    The options that pick or tune a grammar engine change nothing here (there is one, and
    it writes JSON compactly, which is what `disable_any_whitespace` asks for); those that
    would change the output (`whitespace_pattern`, `structural_tag`,
    `disable_additional_properties`) are refused rather than ignored."""

    backend: str | None = None
    backend_was_auto: bool = False
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        unsupported = {
            "whitespace_pattern": "JSON is written compactly",
            "structural_tag": "structural tags are not supported",
            "disable_additional_properties": "a schema's additionalProperties is kept as written",
        }
        for name, why in unsupported.items():
            if getattr(self, name) not in (None, False):
                raise ValueError(f"guided_decoding.{name} is not supported: {why}")
        if self.backend is not None and not isinstance(self.backend, str):
            raise ValueError(f"guided_decoding.backend must be a string, got {self.backend!r}")
        super().__post_init__()


class CheckedGrammars:
    """The grammars of requests already built and validated, by the request's text, least
    recently used first, so that the same structure asked for again is not built again: a
    Responses turn checks its structure when created and builds it for each generation, and
    a client may send one schema with every request. A large schema takes 0.1 s or more.

    Bounded by entries and by the characters held (keys and grammars), so that large
    bodies cannot grow it without limit; one larger than the whole bound is not kept.
    """

    def __init__(self, max_entries: int, max_chars: int) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
            return grammar

    def put(self, key: str, grammar: str) -> None:
        size = len(key) + len(grammar)
        if size > self.max_chars:
            return
        with self._lock:
            if key in self._grammars:
                return
            self._grammars[key] = grammar
            self._chars += size
            while len(self._grammars) > self.max_entries or self._chars > self.max_chars:
                old_key, old = self._grammars.popitem(last=False)
                self._chars -= len(old_key) + len(old)


CHECKED_GRAMMARS = CheckedGrammars(max_entries=256, max_chars=32 * 2**20)


def _checked_grammar(kind: str, value: Any) -> str:
    """The llguidance grammar for one kind of request, built and validated (ValueError
    naming the problem) unless CHECKED_GRAMMARS holds it."""
    key = _request_text(kind, value)
    grammar = None if key is None else CHECKED_GRAMMARS.get(key)
    if grammar is None:
        grammar = _to_llguidance(kind, value)
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise ValueError(f"structured_outputs.{kind} is not supported: {_reason(error)}")
        if key is not None:
            CHECKED_GRAMMARS.put(key, grammar)
    return grammar


def _request_text(kind: str, value: Any) -> str | None:
    """The request as text, keys in their order (a schema's properties are generated in
    it): equal for equal requests. None for a value JSON cannot write, which the build
    refuses."""
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return f"{kind}:{text}"


def _reason(error: str) -> str:
    """What failed, in one line. llguidance's first line says it, except for a regular
    expression, whose pattern and cause follow on lines of their own; the lines after
    quote the compiled grammar, which is ours, not the client's."""
    lines = [line.strip() for line in error.strip().splitlines()]
    if lines[0].endswith("regex parse error:") and len(lines) > 1:
        cause = next((line for line in lines[2:] if line.startswith("error:")), "error:")
        return f"{lines[0]} {lines[1]} ({cause.removeprefix('error:').strip()})"
    return lines[0]


def _to_llguidance(kind: str, value: Any) -> str:
    """The llguidance grammar text for one kind of request, or ValueError for a bad shape."""
    M = llguidance.LLMatcher
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if not isinstance(value, dict | bool):
            raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        if isinstance(value, dict) and "x-guidance" in value:
            raise ValueError(
                "structured_outputs.json is not supported: x-guidance at the schema's root "
                "(llguidance's JSON options; a grammar's %json schema may set them)"
            )
        _check_schema(value, "structured_outputs.json")
        return M.grammar_from_json_schema(value, defaults=_json_options(value))
    if kind == "json_object":
        if value is not True:
            raise ValueError("structured_outputs.json_object must be true")
        return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        if not isinstance(value, str):
            raise ValueError("structured_outputs.regex must be a string")
        return M.grammar_from_regex(value)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if not isinstance(value, str) or not value.strip():
        raise ValueError("structured_outputs.grammar must be a non-empty string")
    try:
        lark = llguidance.grammar_from("grammar", value)
    except ValueError as exc:  # a GBNF grammar the converter cannot read
        raise ValueError(f"structured_outputs.grammar: {exc}") from None
    _check_grammar_depth(lark)
    _check_embedded_schemas(lark)
    return lark


def _check_schema(schema: dict | bool, where: str) -> None:
    """ValueError naming `where` for a schema llguidance would crash on, or accept and then
    fail to follow."""
    nodes = list(_subschemas(schema))  # walked once for the three checks that read them
    _check_refs(schema, nodes, where)
    _check_depth(schema, where)
    _check_numbers(schema, where)
    _check_finite(schema, where)
    _check_min_properties(nodes, where)
    _check_multiple_of(nodes, where)


def _check_embedded_schemas(lark: str) -> None:
    """A `json` schema's checks on each `%json` schema of a Lark grammar, which llguidance
    compiles as it does a `json` one, crashes included. Text that only looks like one (in a
    string or a comment) is checked too, harmlessly; text Python cannot parse as JSON,
    llguidance's parser (serde_json, nesting at most 128 deep) refuses as well."""
    decoder = json.JSONDecoder()
    for found in _JSON_DIRECTIVE.finditer(lark):
        try:
            schema, _ = decoder.raw_decode(lark, found.end())
        except (ValueError, RecursionError):
            continue
        if isinstance(schema, dict | bool):
            line = lark.count("\n", 0, found.start()) + 1
            _check_schema(schema, f"structured_outputs.grammar's %json schema on line {line}")


def _check_grammar_depth(lark: str) -> None:
    """ValueError when a Lark grammar's rules and groups, each rule followed into those it
    names, may nest deeper than MAX_GRAMMAR_DEPTH (bounded as _check_depth bounds a
    schema's). A name that is no rule's (an attribute such as `lazy`) is left out."""
    heads = list(_LARK_HEAD.finditer(lark))
    rules = {head[1]: i for i, head in enumerate(heads)}
    children: dict[int, list[int]] = {i: [] for i in range(len(heads))}
    decoder = json.JSONDecoder()
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(lark)
        groups, pos = [i], head.end()
        while (token := _LARK_TOKEN.search(lark, pos, end)) is not None:
            pos = token.end()
            if token["directive"] is not None:
                with contextlib.suppress(ValueError, RecursionError):
                    pos = decoder.raw_decode(lark, pos)[1]
            elif token["name"] in rules:
                children[groups[-1]].append(rules[token["name"]])
            elif token["open"] is not None:
                children[len(children)] = []
                children[groups[-1]].append(len(children) - 1)
                groups.append(len(children) - 1)
            elif token["close"] is not None and len(groups) > 1:
                groups.pop()
    children[-1] = list(rules.values())  # a root above every rule, one more level
    if _longest_path(children, -1) - 1 > MAX_GRAMMAR_DEPTH:
        raise ValueError(
            f"structured_outputs.grammar nests deeper than {MAX_GRAMMAR_DEPTH} rules and "
            "groups once each rule is followed into those it names"
        )


def _check_finite(schema: dict | bool, where: str) -> None:
    """ValueError when no finite JSON value matches `schema`: a subschema every value of
    which must hold another value of it (a `$ref` cycle through `$ref`, `allOf`, required
    properties or non-empty arrays, with no way out through `anyOf`). llguidance accepts
    such a schema, and its output then reaches a dead end partway."""
    nodes = _schema_graph(schema)
    finite: set[str] = set()
    changed = True
    while changed:
        changed = False
        for pointer, (needs, choices) in nodes.items():
            if pointer in finite:
                continue
            if all(n in finite for n in needs) and all(
                any(c in finite for c in group) for group in choices
            ):
                finite.add(pointer)
                changed = True
    if "#" not in finite:
        endless = sorted(p for p in nodes if p not in finite and p != "#") or ["#"]
        raise ValueError(
            f"{where} has no finite value: every value of {endless[0]} "
            "would have to contain another one ($ref cycle)"
        )


# Keywords whose values are JSON data, not subschemas.
_DATA_KEYWORDS = ("const", "enum", "default", "examples")
# Keywords whose values map names to subschemas: a name there is no keyword.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _subschemas(schema: dict | bool) -> Iterator[dict]:
    """Every object in a subschema's place: not data (`const`, `enum`, ...), nor a map of
    names to subschemas (`properties`, `$defs`, ...), whose values are subschemas even
    when a name is spelled like a data keyword."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            for key, value in node.items():
                if key in _SCHEMA_MAPS and isinstance(value, dict):
                    stack.extend(value.values())
                elif key not in _DATA_KEYWORDS:
                    stack.append(value)


def _check_numbers(schema: dict | bool, where: str) -> None:
    """ValueError naming a number of the schema (a bound, a length, an enum's value) outside
    SCHEMA_INTEGERS, or a float below SCHEMA_FLOAT_MIN: llguidance's own message for an
    integer past 64 bits ("Value is not JSON serializable") says neither where it is nor
    what is wrong with it, and one near -2**63 crashes the server."""
    stack: list[tuple[str, Any]] = [("#", schema)]
    while stack:
        pointer, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{pointer}/{_escape(str(k))}", v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((f"{pointer}/{i}", v) for i, v in enumerate(node))
        elif isinstance(node, float) and node < SCHEMA_FLOAT_MIN:
            raise ValueError(
                f"{where} is not supported: {pointer} is {node}, below the least float a "
                f"schema may hold ({SCHEMA_FLOAT_MIN})"
            )
        elif isinstance(node, int) and not isinstance(node, bool) and node not in SCHEMA_INTEGERS:
            raise ValueError(
                f"{where} is not supported: {pointer} is {node}, outside the integers a "
                f"schema may hold ({SCHEMA_INTEGERS.start} to {SCHEMA_INTEGERS.stop - 1})"
            )


def _check_multiple_of(nodes: list[dict], where: str) -> None:
    """ValueError for a `multipleOf` not above 0, as JSON Schema requires: llguidance
    accepts a negative one, and refuses 0 as "invalid multiple of", naming no keyword."""
    for node in nodes:
        step = node.get("multipleOf")
        if isinstance(step, int | float) and not isinstance(step, bool) and step <= 0:
            raise ValueError(f"{where} is not valid: multipleOf must be greater than 0, got {step}")


def _check_min_properties(nodes: list[dict], where: str) -> None:
    """ValueError for a `minProperties` above the required properties' count: the others
    would be additional ones (llguidance allows none of `properties` to be optional
    beside it), whose names the grammar cannot keep apart, and a name written twice is one
    property once parsed: `{"a": 1, "a": 2}` would pass for two."""
    for node in nodes:
        least = node.get("minProperties")
        if not isinstance(least, int) or least <= 1:
            continue
        required = {name for name in _list(node.get("required")) if isinstance(name, str)}
        if least > len(required):
            raise ValueError(
                f"{where} is not supported: minProperties {least} counts "
                "properties beyond the required ones, whose names the grammar cannot keep "
                "distinct"
            )


def _check_refs(schema: dict | bool, nodes: list[dict], where: str) -> None:
    """ValueError for a `$ref` other than a JSON pointer into the schema itself ("#" or
    "#/..."), or an `$id` below the root: the depth and finiteness checks follow `$ref`s
    as pointers from the root, and llguidance resolves an anchor ("#a"), a URI ("b.json",
    "https://...") or a pointer inside a subschema with an `$id` (relative to that
    subschema) elsewhere, where a `$ref` chain thousands deep would crash the process.
    Also for a pointer to an object that is no subschema (in a `const`, an `enum`, or a
    `properties` map itself): llguidance compiles it as one, and the checks that see
    subschemas only would never have seen it."""
    places = {id(node) for node in nodes}
    for node in nodes:
        ref = node.get("$ref")
        if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
            raise ValueError(
                f"{where} is not supported: $ref {ref!r} is not a JSON pointer into the "
                'schema ("#" or "#/...")'
            )
        target = _resolve(schema, ref) if isinstance(ref, str) else None
        if isinstance(target, dict) and id(target) not in places:
            raise ValueError(
                f"{where} is not supported: $ref {ref!r} is not a subschema (it points "
                "into data, such as a const or an enum, or at a map of names)"
            )
        if node is not schema and isinstance(node.get("$id"), str):
            raise ValueError(f"{where} is not supported: $id below the schema's root")


def _check_depth(schema: dict | bool, where: str) -> None:
    """ValueError when the schema, with its local `$ref`s followed, may nest deeper than
    MAX_SCHEMA_DEPTH objects. The bound is safe whatever order llguidance follows them in:
    objects that reach each other (a recursive definition) count as deep as they are many."""
    children: dict[int, list[int]] = {}
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if id(node) in children:
            continue
        found: list[int] = []
        children[id(node)] = found
        values = list(node.values()) if isinstance(node, dict) else []
        ref = values and node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            values.append(_resolve(schema, ref))
        while values:
            value = values.pop()
            if isinstance(value, list):
                values.extend(value)
            elif isinstance(value, dict):
                found.append(id(value))
                stack.append(value)
    if _longest_path(children, id(schema)) > MAX_SCHEMA_DEPTH:
        raise ValueError(
            f"{where} nests deeper than {MAX_SCHEMA_DEPTH} objects once its $refs are followed"
        )


def _longest_path(children: dict[int, list[int]], root: int) -> int:
    """An upper bound on the nodes of a path from `root`: the longest path between the
    graph's strongly connected components (Tarjan's, iterative), each weighing its size."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    path: list[int] = []
    component: dict[int, int] = {}
    depth: list[int] = []  # per component, in the order found: its successors come first
    work = [(root, 0)]
    while work:
        node, i = work.pop()
        if i == 0:
            index[node] = low[node] = len(index)
            path.append(node)
            on_stack.add(node)
        kids = children[node]
        if i < len(kids):
            work.append((node, i + 1))
            kid = kids[i]
            if kid not in index:
                work.append((kid, 0))
            elif kid in on_stack:
                low[node] = min(low[node], index[kid])
            continue
        for kid in kids:
            if kid in on_stack:
                low[node] = min(low[node], low[kid])
        if low[node] == index[node]:
            members = []
            while True:
                member = path.pop()
                on_stack.discard(member)
                component[member] = len(depth)
                members.append(member)
                if member == node:
                    break
            below = [
                depth[component[k]]
                for m in members
                for k in children[m]
                if component.get(k, len(depth)) < len(depth)
            ]
            depth.append(len(members) + max(below, default=0))
    return depth[component[root]]


def _schema_graph(root: dict | bool) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per subschema (by JSON pointer): the subschemas any value of it must also hold a
    value of, and the groups of which it must hold a value of one. Only what certainly
    applies counts: a subschema without a single `type` gets no edges from properties or
    items, since a value of another type would satisfy it."""
    nodes: dict[str, tuple[list[str], list[list[str]]]] = {}
    stack: list[tuple[str, Any]] = [("#", root)]

    def edge(path: str, sub: Any, into: list[str]) -> None:
        into.append(path)
        stack.append((path, sub))

    while stack:
        pointer, schema = stack.pop()
        if pointer in nodes:
            continue
        needs: list[str] = []
        choices: list[list[str]] = []
        nodes[pointer] = (needs, choices)
        if not isinstance(schema, dict) or "enum" in schema or "const" in schema:
            continue
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            target = _resolve(root, ref)
            if target is not None:
                edge(ref, target, needs)
        for i, sub in enumerate(_list(schema.get("allOf"))):
            edge(f"{pointer}/allOf/{i}", sub, needs)
        for key in ("anyOf", "oneOf"):
            group: list[str] = []
            for i, sub in enumerate(_list(schema.get(key))):
                edge(f"{pointer}/{key}/{i}", sub, group)
            if group:
                choices.append(group)
        kind = schema.get("type")
        properties = schema.get("properties")
        if kind == "object" and isinstance(properties, dict):
            for name in _list(schema.get("required")):
                if isinstance(name, str) and name in properties:
                    edge(f"{pointer}/properties/{_escape(name)}", properties[name], needs)
        min_items = schema.get("minItems")
        if kind == "array" and isinstance(min_items, int) and min_items > 0:
            prefix = _list(schema.get("prefixItems"))
            for i, sub in enumerate(prefix[:min_items]):
                edge(f"{pointer}/prefixItems/{i}", sub, needs)
            if min_items > len(prefix) and isinstance(schema.get("items"), dict):
                edge(f"{pointer}/items", schema["items"], needs)
    return nodes


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _resolve(root: Any, ref: str) -> Any:
    """The subschema a local `$ref` ("#/$defs/a") names, or None. The fragment is
    percent-decoded before it is split, as llguidance does: "#/$defs/a%2Fb" is a/b."""
    node = root
    for token in unquote(ref[1:]).split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _json_options(schema: dict | bool) -> dict:
    """The engine's JSON options for `schema`. Where an object lists properties and allows
    others, llguidance keeps an extra key apart from the listed ones only as written text,
    and lets it use any `\\u` escape: `{"a": 1, "\\u0061": "text"}` passed a schema whose
    `a` is an integer, and parses as `{"a": "text"}`. Such a schema's strings take no `\\u`
    escape, so each key has one spelling; raw UTF-8 still writes every character but the
    control characters other than \\b \\f \\n \\r \\t, which are then unwritable. A schema
    holding one of those (in a const, an enum...) keeps `\\u`, which that value needs."""
    if any(_lists_and_allows_others(node) for node in _subschemas(schema)) and not any(
        _ONLY_U_ESCAPED.search(text) for text in _strings(schema)
    ):
        return {**JSON_OPTIONS, "json_allowed_escapes": _ESCAPES_WITHOUT_U}
    return JSON_OPTIONS


def _lists_and_allows_others(node: dict) -> bool:
    """Whether an object schema names properties and allows properties beyond them."""
    properties = node.get("properties")
    return (
        isinstance(properties, dict)
        and bool(properties)
        and (node.get("additionalProperties") is not False)
    )


def _strings(value: Any) -> Iterator[str]:
    """Every string of a JSON value, its objects' keys included."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())


def json_schema_grammar_fragment(schema: dict) -> str:
    """`%json {...}` for embedding a schema in a Lark grammar, with the engine's JSON
    options (compact separators, no free whitespace...) written into the schema."""
    options = _json_options(schema)
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


class GrammarCompiler:
    """Turns checked parameters into matchers for one engine's tokenizer and vocabulary.

    llguidance's view of the tokenizer takes ~0.4 s to build, so it is built on the first
    constrained request, once; every matcher after that costs about a millisecond.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: SequenceABC[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                self._lltok = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._lltok

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the output. Raises ValueError when the grammar
        cannot be built for this vocabulary."""
        if self._tokenizer is None:
            raise ValueError("structured outputs need a tokenizer; this model has none")
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), params.llg_grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{params.kind}: {matcher.get_error()}")
        return matcher


def accept_token(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Advance a sequence's matcher by its sampled token; True when the grammar is complete.

    The mask allowed only tokens the grammar accepts, so a refusal means llguidance could
    not follow its own grammar: its parser's limits ran out on this structure (an object of
    about 500 optional properties does that). It ends the request, the client's to fix,
    with llguidance's reason, rather than let the output leave the grammar. A grammar at a
    dead end (its mask allowed nothing) raises a ValueError, the request's error, rather
    than ending the output where it stands as if it were complete.
    """
    if matcher.is_error():
        raise ValueError(
            "structured_outputs: no continuation of the output so far matches its structure "
            f"(llguidance: {_reason(matcher.get_error())})"
        )
    if not matcher.consume_token(token):
        raise NothingToSampleError(
            "structured_outputs: the grammar engine cannot follow this structure past "
            f"token {token} (llguidance: {_reason(matcher.get_error())})"
        )
    return matcher.is_stopped()


@dataclass
class MaskTimes:
    """Where a step's mask time goes: computing on the worker, and the part the engine
    thread still waits for after its forward pass (the only part on the critical path)."""

    num_steps: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class PendingMasks:
    """Masks being computed for one step; `result()` waits for them."""

    future: Future | None  # None: no row of this step is constrained
    times: MaskTimes | None = None

    def result(self) -> list[torch.Tensor | None]:
        """Per sampling row, its allowed tokens (bool [vocab], CPU) or None if unconstrained."""
        if self.future is None:
            return []
        start = time.perf_counter()
        masks = self.future.result()
        self.times.wait_s += time.perf_counter() - start
        return masks


class GrammarMasks:
    """Computes a step's masks on a worker thread, so they overlap the forward pass.

    The worker uses numpy, not torch, to unpack the bitmask: a torch op on a second thread
    would start a second OpenMP team, which slows the engine thread's kernels (see
    engine/async_llm.py). llguidance's executor runs the matchers on its own threads with
    the GIL released.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32
        self._executor: llguidance.LLExecutor | None = None  # made on the worker, when needed
        # Started on first use by the engine thread, which may be pinned to one CPU by then.
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tokenmill-grammar", initializer=keep_cpus()
        )
        self.times = MaskTimes()

    def submit(self, matchers: list[llguidance.LLMatcher | None]) -> PendingMasks:
        """Start computing the masks of `matchers` (one per sampling row, None if free)."""
        if all(m is None for m in matchers):
            return PendingMasks(None)
        self.times.num_steps += 1
        return PendingMasks(self._worker.submit(self._compute, list(matchers)), self.times)

    def _compute(self, matchers: list[llguidance.LLMatcher | None]) -> list[torch.Tensor | None]:
        start = time.perf_counter()
        if self._executor is None:
            # A quarter of the cores: the forward pass it overlaps needs the rest.
            threads = max(1, min(4, (os.cpu_count() or 2) // 4))
            self._executor = llguidance.LLExecutor(num_threads=threads)
        rows = [(m, j) for j, m in enumerate(m for m in matchers if m is not None)]
        bits = np.zeros((len(rows), self._words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr(rows, bits.ctypes.data, self._words * 4, len(rows))
        # Bit i of word w is token 32w + i; little-endian bytes keep that order.
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
        allowed = allowed[:, : self.vocab_size].astype(bool)
        masks = iter(torch.from_numpy(allowed))
        self.times.compute_s += time.perf_counter() - start
        return [None if m is None else next(masks) for m in matchers]
