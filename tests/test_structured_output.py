"""Structured outputs: what the engine accepts, and outputs that always match their grammar.

A tiny random model with the default model's tokenizer writes the outputs: its preferences
have nothing to do with JSON, so the grammar alone keeps them valid, and it does so for
every token the 49k vocabulary offers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import LLM, AsyncLLM, SamplingParams, StructuredOutputsParams, structured_output
from engine.errors import NothingToSampleError, RequestFailedError
from engine.structured_output import CheckedGrammars

PROMPT = "Answer in JSON."


@pytest.fixture(scope="module")
def llm(tiny_chat_model_dir):
    # One thread: on a shared 2-core machine OpenMP's spinning threads cost more than they give.
    return LLM(tiny_chat_model_dir, device="cpu", num_threads=1, compile="off")


def _texts(llm: LLM, params: list[SamplingParams]) -> list[tuple[str, str]]:
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


# -- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"json": {"type": "object"}, "regex": "a+"}, "exactly one"),
        ({"json": {"type": "objekt"}}, "objekt"),
        ({"json": {"type": "string", "pattern": "(("}}, "regex"),
        ({"json": {"type": "object", "not": {"required": ["a"]}}}, "not"),
        ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        # {"a": 1, "a": 2} would parse as one property
        ({"json": {"type": "object", "minProperties": 2}}, "minProperties 2"),
        (
            {
                "json": {
                    "type": "object",
                    "properties": {"p": {"patternProperties": {"^x": {}}, "minProperties": 3}},
                }
            },
            "minProperties 3",
        ),
        # integers past 64 bits: named with their place, not "not JSON serializable"
        (
            {"json": {"type": "integer", "maximum": 10**30}},
            f"#/maximum is {10**30}, outside the integers a schema may hold",
        ),
        ({"json": {"enum": [1, -(2**63) - 1]}}, "#/enum/1 is"),
        # near -2**63, llguidance crashed the process (a segfault)
        ({"json": {"properties": {"n": {"const": -(2**63)}}}}, "#/properties/n/const is"),
        (
            {"json": {"type": "integer", "minimum": -(2**63) + 512, "maximum": -(2**63) + 512}},
            "#/m",
        ),
        ({"json": {"type": "integer", "multipleOf": -3}}, "multipleOf must be greater than 0"),
        # a property or definition named like a data keyword is a schema all the same
        (
            {"json": {"type": "object", "properties": {"enum": {"minProperties": 2}}}},
            "minProperties 2",
        ),
        ({"json": {"$defs": {"const": {"multipleOf": -3}}}}, "multipleOf must be"),
        # llguidance follows a $ref into data as a schema the checks never saw
        (
            {"json": {"$defs": {"a": {"const": {"minProperties": 2}}}, "$ref": "#/$defs/a/const"}},
            "$ref '#/$defs/a/const' is not a subschema",
        ),
        (
            {"json": {"enum": [{"multipleOf": -3}], "anyOf": [{"$ref": "#/enum/0"}]}},
            "$ref '#/enum/0' is not a subschema",
        ),
        ({"json": {"properties": {}, "$ref": "#/properties"}}, "is not a subschema"),
        # llguidance's own options would override the engine's (compact JSON, strictness)
        (
            {"json": {"type": "object", "x-guidance": {"whitespace_flexible": True}}},
            "structured_outputs.json is not supported: x-guidance",
        ),
        (
            {"json": {"properties": {"n": {"type": "number", "multipleOf": 0}}}},
            "multipleOf must be greater than 0, got 0",
        ),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": [1, 2]}, "JSON schema"),
        ({"regex": "[a-"}, "regex"),
        ({"choice": []}, "non-empty list"),
        ({"choice": ["a", 3]}, "non-empty list"),
        ({"grammar": "start: missing_rule"}, "missing_rule"),
        ({"json_object": False}, "exactly one"),
        # $ref cycles no finite value can leave: llguidance would reach a dead end partway
        ({"json": {"$ref": "#"}}, "no finite value"),
        ({"json": {"anyOf": [{"$ref": "#"}]}}, "no finite value"),
        (
            {
                "json": {
                    "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                    "$ref": "#/$defs/a",
                }
            },
            "no finite value",
        ),
        (
            {"json": {"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}},
            "#/properties/x",
        ),
        ({"json": {"type": "array", "minItems": 1, "items": {"$ref": "#"}}}, "#/items"),
    ],
)
def test_bad_structures_are_refused_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputsParams(**kwargs)


def test_min_properties_that_distinct_names_guarantee_are_accepted():
    declared = {"a": {"type": "integer"}, "b": {"type": "integer"}}
    for schema in (
        {"type": "object", "minProperties": 1},
        {"type": "object", "properties": declared, "required": ["a", "b"], "minProperties": 2},
        {"type": "object", "properties": {"c": {"const": {"minProperties": 5}}}},
    ):
        StructuredOutputsParams(json=schema)


def test_the_widest_integers_and_data_named_multiple_of_are_accepted():
    for schema in (
        {"type": "integer", "minimum": -(2**63) + 513, "maximum": -(2**63) + 513},
        {"enum": [-(2**63) + 513, 2**64 - 1]},
        {"type": "integer", "multipleOf": 3},
        {"type": "number", "multipleOf": 0.5},
        {"const": {"multipleOf": -3}},  # data, not a schema
    ):
        StructuredOutputsParams(json=schema)


def test_refs_to_subschemas_named_like_data_keywords_are_accepted():
    StructuredOutputsParams(json={"$defs": {"const": {"type": "integer"}}, "$ref": "#/$defs/const"})
    StructuredOutputsParams(
        json={"properties": {"enum": {"type": "string"}}, "$ref": "#/properties/enum"}
    )


def test_a_grammars_own_json_options_are_its_authors():
    StructuredOutputsParams(
        grammar='start: %json {"type": "object", "x-guidance": {"whitespace_flexible": true}}'
    )


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"next": {"$ref": "#"}}},  # optional
        {"anyOf": [{"type": "null"}, {"$ref": "#"}]},
        {"type": "array", "items": {"$ref": "#"}},  # may be empty
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                    "required": ["kids"],
                }
            },
            "$ref": "#/$defs/node",
        },
    ],
)
def test_recursive_schemas_with_a_finite_value_are_accepted(schema):
    StructuredOutputsParams(json=schema)


def _ref_chain(length: int, ref: str = "#/$defs/d{}") -> dict:
    """A schema whose value nests `length` objects deep, each a `$ref` to the next: a
    small body (a request's JSON may nest 64 levels, a `$ref` chain any number). `ref`
    spells the reference to definition {} of `$defs`."""
    defs = {
        f"d{i}": {"type": "object", "properties": {"a": {"$ref": ref.format(i + 1)}}}
        for i in range(length)
    }
    defs[f"d{length}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": ref.format(0)}


def test_schemas_nested_too_deep_through_refs_are_refused():
    """llguidance compiles `$ref`s recursively on the native stack: a chain of a thousand
    crashed the whole process (segfault) instead of failing the request."""
    with pytest.raises(ValueError, match="nests deeper than 1024 objects"):
        StructuredOutputsParams(json=_ref_chain(4000))
    # a recursive definition cannot hide its size behind a cycle
    ring = {
        f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{(i + 1) % 600}"}}}
        for i in range(600)
    }
    with pytest.raises(ValueError, match="nests deeper"):
        StructuredOutputsParams(json={"$defs": ring, "$ref": "#/$defs/d0"})
    StructuredOutputsParams(json=_ref_chain(300))


def _rule_chain(length: int, groups: int = 0) -> str:
    """A Lark grammar of `length` rules, each naming the next inside `groups` groups."""
    rules = [f'r{i}: {"(" * groups}"a" r{i + 1}{")" * groups}' for i in range(length)]
    return "\n".join(["start: r0", *rules, f'r{length}: "b"'])


def test_grammars_within_the_rule_depth_are_accepted():
    StructuredOutputsParams(grammar=_rule_chain(1000))
    StructuredOutputsParams(grammar=_rule_chain(45, groups=20))


# Each of these crashed llguidance (a segfault) where it was accepted.
_CRASHES = [
    # llguidance compiles a grammar's rules recursively, into those they name and groups
    ({"grammar": _rule_chain(3000)}, "grammar nests deeper than 1024 rules and groups"),
    ({"grammar": _rule_chain(400, groups=20)}, "grammar nests deeper than 1024"),
    # a Lark grammar's %json schemas get a `json` schema's checks
    (
        {"grammar": 'start: %json {"const": -9223372036854775808}'},
        "on line 1 is not supported: #/const",
    ),
    (
        {"grammar": 'start: "a" | b\nb: %json\n  {"enum": [1, -9223372036854775296]}'},
        "%json schema on line 2 is not supported: #/enum/1",
    ),
    ({"grammar": "start: %json " + json.dumps(_ref_chain(4000))}, "nests deeper than 1024"),
    # an integer schema's float bound or const is cast to an i64, -1e300 to -2**63
    ({"json": {"type": "integer", "minimum": -1e300, "maximum": -1e300}}, "#/maximum is -1e+300"),
    ({"json": {"type": "integer", "const": -1e300}}, "#/const is -1e+300, below the least float"),
    # its JSON text, -9.223372036854775e+18, is read as -2**63
    ({"json": {"type": "integer", "const": -(2.0**63) + 1024}}, "#/const is -9.2"),
    # $ref chains the depth check cannot follow: a URI, an anchor, a pointer relative to a
    # subschema's $id, and a pointer whose percent-encoded "/" splits it (x%2Fd1 is x/d1)
    (
        {"json": {"$id": "https://x.test/s", **_ref_chain(4000, "https://x.test/s#/$defs/d{}")}},
        "$ref 'https://x.test/s#/$defs/d0' is not a JSON pointer into the schema",
    ),
    ({"json": _ref_chain(4000, "json-schema:///#/$defs/d{}")}, "not a JSON pointer"),
    ({"json": _ref_chain(4000, "#d{}") | {"$anchor": "d0"}}, "$ref '#d0' is not a JSON pointer"),
    (
        {"json": {"$defs": {"w": {"$id": "w", **_ref_chain(4000)}}, "$ref": "#/$defs/w"}},
        "$id below the schema's root",
    ),
    (
        {
            "json": {
                "$defs": {"x": _ref_chain(4000, "#/$defs/x%2Fd{}")["$defs"]},
                "$ref": "#/$defs/x%2Fd0",
            }
        },
        "nests deeper than 1024",
    ),
]


def test_structures_that_crash_llguidance_are_refused_naming_the_problem():
    """In a child process, which a crash kills instead of the test run."""
    script = (
        "import json, sys\n"
        "from engine import StructuredOutputsParams\n"
        "for kwargs in json.load(sys.stdin):\n"
        "    try:\n"
        "        StructuredOutputsParams(**kwargs)\n"
        "        print('accepted')\n"
        "    except ValueError as exc:\n"
        "        print(str(exc).replace(chr(10), ' '))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([kwargs for kwargs, _ in _CRASHES]),
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(_CRASHES)
    for line, (_, message) in zip(lines, _CRASHES, strict=True):
        assert message in line


def test_references_resolve_as_json_pointers_from_the_root(llm):
    """A root `$id` leaves "#/..." pointers to the root; a pointer is percent-decoded
    before it is split, so the output follows what llguidance reads."""
    schema = {
        "$id": "https://x.test/s",
        "$defs": {"x": {"d": {"type": "integer"}}, "x/d": {"type": "string"}},
        "type": "object",
        "properties": {"n": {"$ref": "#/$defs/x%2Fd"}},
        "required": ["n"],
    }
    params = SamplingParams(
        temperature=0,
        max_tokens=24,
        structured_outputs=StructuredOutputsParams(json=schema),
    )
    [(text, _)] = _texts(llm, [params])
    assert isinstance(json.loads(text)["n"], int)


def test_vllms_older_guided_decoding_spelling_constrains_the_output(llm):
    """SamplingParams(guided_decoding=GuidedDecodingParams(...)), vLLM's older spelling,
    imported from where vLLM users import it, is the structured output it names."""
    from engine import GuidedDecodingParams
    from engine.sampling_params import GuidedDecodingParams as FromSamplingParams

    assert FromSamplingParams is GuidedDecodingParams
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    guided = [
        GuidedDecodingParams(json=schema, backend="xgrammar", disable_any_whitespace=True),
        GuidedDecodingParams(regex="[0-9]{3}"),
        GuidedDecodingParams(choice=["yes", "no"]),
        GuidedDecodingParams(grammar='start: "a" "b"+ "c"'),
    ]
    params = [SamplingParams(temperature=0, max_tokens=24, guided_decoding=g) for g in guided]
    assert all(p.structured_outputs is g for p, g in zip(params, guided, strict=True))
    params.append(params[0].clone())
    params.append(dataclasses.replace(params[1], max_tokens=20))
    (obj, _), (digits, _), (choice, _), (abc, _), (obj2, _), (digits2, _) = _texts(llm, params)
    assert isinstance(json.loads(obj)["n"], int) and obj2 == obj
    assert re.fullmatch("[0-9]{3}", digits) and digits2 == digits
    assert choice in ("yes", "no") and re.fullmatch("ab+c", abc)


def test_guided_decoding_and_structured_outputs_together_are_refused():
    from engine import GuidedDecodingParams

    with pytest.raises(ValueError, match="structured_outputs or guided_decoding"):
        SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="a"),
            guided_decoding=GuidedDecodingParams(regex="b"),
        )
    with pytest.raises(ValueError, match="guided_decoding"):
        SamplingParams(guided_decoding={"regex": "a"})
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams(regex="a", choice=["b"])
    for option in ({"whitespace_pattern": " "}, {"structural_tag": "{}"}):
        with pytest.raises(ValueError, match=f"guided_decoding.{next(iter(option))}"):
            GuidedDecodingParams(json={"type": "object"}, **option)
    with pytest.raises(ValueError, match="disable_additional_properties"):
        GuidedDecodingParams(json={"type": "object"}, disable_additional_properties=True)


def test_a_grammars_json_text_that_only_looks_like_a_schema_is_harmless():
    StructuredOutputsParams(grammar='start: "%json {\\"const\\": -9223372036854775808}"')
    StructuredOutputsParams(grammar='start: %json {"type": "number", "minimum": -9.2e18} | "a"')


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The kinds of the grammars built from now on, with an empty cache of two entries and
    10,000 characters."""
    built: list[str] = []
    build = structured_output._to_llguidance

    def counted(kind, value):
        built.append(kind)
        return build(kind, value)

    monkeypatch.setattr(structured_output, "_to_llguidance", counted)
    monkeypatch.setattr(structured_output, "CHECKED_GRAMMARS", CheckedGrammars(2, 10_000))
    return built


def test_a_structure_asked_for_again_is_not_built_again(builds):
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    first = StructuredOutputsParams(json=schema)
    again = StructuredOutputsParams(json=json.loads(json.dumps(schema)))  # equal, not the same
    assert again.llg_grammar == first.llg_grammar
    assert builds == ["json"]
    # the order of the properties is the order they are written in: another structure
    StructuredOutputsParams(
        json={**schema, "properties": dict(reversed(schema["properties"].items()))}
    )
    assert builds == ["json", "json"]
    # a refused structure is refused every time
    for _ in range(2):
        with pytest.raises(ValueError, match="regex"):
            StructuredOutputsParams(regex="[a-")
    assert builds == ["json", "json", "regex", "regex"]


def test_the_built_structures_kept_are_bounded(builds):
    StructuredOutputsParams(regex="a+")
    StructuredOutputsParams(regex="b+")
    StructuredOutputsParams(regex="a+")  # used last: "b+" goes first
    StructuredOutputsParams(regex="c+")
    StructuredOutputsParams(regex="a+")
    assert builds == ["regex"] * 3
    StructuredOutputsParams(regex="b+")
    assert builds == ["regex"] * 4
    # 10,000 characters: one of 9,920 (its text and its grammar) leaves room for no other
    StructuredOutputsParams(choice=["x" * 4950])
    StructuredOutputsParams(regex="b+")
    assert builds == ["regex"] * 4 + ["choice", "regex"]
    # and one larger than the whole bound is not kept
    for _ in range(2):
        StructuredOutputsParams(choice=["y" * 6000])
    assert builds[-2:] == ["choice", "choice"]


def test_a_structure_at_a_dead_end_fails_its_request(llm):
    """An endless rule the checks cannot see (a Lark rule with no way out): the request
    fails with an error, not an output ended where it stands as if it were complete."""
    grammar = 'start: "x" obj\nobj: obj "a"\n'
    params = SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(grammar=grammar)
    )
    with pytest.raises(RequestFailedError, match="no continuation"):
        _texts(llm, [params])


def test_a_structure_beyond_the_grammar_engines_limits_is_the_clients_error(llm):
    """An object of a thousand optional properties passes every check, then llguidance's
    parser exceeds its limit on the first token its mask allowed: the request ends with
    the client's error (a 400 at the server), not an internal one (a 500)."""
    many = {f"f{i}": {"type": "integer"} for i in range(1000)}
    schema = {"type": "object", "properties": many, "additionalProperties": False}
    params = SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(json=schema)
    )
    with pytest.raises(NothingToSampleError, match=r"cannot follow this structure.*max is"):
        _texts(llm, [params])


def test_sampling_params_check_structured_outputs_and_logit_bias_types():
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"12": 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={12: 101})
    SamplingParams(logit_bias={12: -100, 13: 2.5})


def test_logit_bias_beyond_the_vocabulary_is_refused(llm):
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(PROMPT, SamplingParams(logit_bias={vocab: 1.0}), use_tqdm=False)


def test_logit_bias_forces_and_bans_tokens(llm):
    favourite = llm.tokenizer.encode(" yes")[0]
    out = _texts(
        llm, [SamplingParams(temperature=1.0, max_tokens=4, seed=1, logit_bias={favourite: 100})]
    )
    assert out[0][0] == " yes" * 4
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    first = free[0].outputs[0].token_ids[0]
    banned = llm.generate(
        PROMPT,
        SamplingParams(temperature=0, max_tokens=6, logit_bias={first: -100}),
        use_tqdm=False,
    )
    assert banned[0].outputs[0].token_ids[0] != first


# -- outputs follow their structure ---------------------------------------------------------


def test_choice_regex_and_grammar_outputs_match(llm):
    # Bounded structures: a random model would happily fill an unbounded one (any JSON
    # object, say) until its budget ends; the default model's tests cover json_object.
    lark = 'start: "(" NUM ")" | "(" NUM "+" NUM ")"\nNUM: /[0-9]{1,3}/'
    kinds = [
        StructuredOutputsParams(choice=["red", "green", "blue"]),
        StructuredOutputsParams(regex=r"[a-c]{2}-[0-9]{3}"),
        StructuredOutputsParams(grammar=lark),
    ]
    params = [
        SamplingParams(temperature=t, max_tokens=120, structured_outputs=k, seed=s)
        for k in kinds
        for t, s in ((0, None), (1.0, 7))
    ]
    outs = _texts(llm, params)
    for (text, reason), p in zip(outs, params, strict=True):
        kind = p.structured_outputs.kind
        if kind == "choice":
            assert text in ("red", "green", "blue")
        elif kind == "regex":
            assert re.fullmatch(r"[a-c]{2}-[0-9]{3}", text)
        else:
            assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})?\)", text)
        assert reason == "stop"  # the grammar completed, and that ended the request


def _leaf() -> st.SearchStrategy[dict]:
    bounds = st.integers(-1000, 1000).flatmap(
        lambda lo: st.tuples(st.just(lo), st.integers(lo, lo + 500))
    )
    return st.one_of(
        bounds.map(lambda b: {"type": "integer", "minimum": b[0], "maximum": b[1]}),
        # A number's digits never have to end; multipleOf bounds them for a random model.
        bounds.map(
            lambda b: {"type": "number", "minimum": b[0], "maximum": b[1], "multipleOf": 0.25}
        ),
        st.just({"type": "boolean"}),
        st.lists(
            st.text("abcxyz _", min_size=1, max_size=6), min_size=1, max_size=4, unique=True
        ).map(lambda e: {"enum": e}),
        st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
        st.sampled_from(["^[a-z]{1,6}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no)$"]).map(
            lambda p: {"type": "string", "pattern": p}
        ),
    )


def _object(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    def build(props: dict[str, dict], required_flags: list[bool]) -> dict:
        required = [k for k, r in zip(props, required_flags, strict=False) if r]
        return {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }

    names = st.text("abcdefgh_", min_size=1, max_size=5)
    return st.dictionaries(names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(
            lambda flags: build(props, flags)
        )
    )


def _array(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.tuples(children, st.integers(0, 1), st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[2]}
    )


SCHEMAS = _object(st.recursive(_leaf(), lambda c: st.one_of(_array(c), _object(c)), max_leaves=6))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SCHEMAS, min_size=6, max_size=6))
def test_every_output_parses_and_validates_against_its_schema(llm, schemas):
    """Six generated schemas per batch, each once greedy and once sampled."""
    params = [
        SamplingParams(
            temperature=t, max_tokens=400, structured_outputs=StructuredOutputsParams(json=s)
        )
        for s in schemas
        for t in (0, 1.0)
    ]
    outs = _texts(llm, params)
    for (text, reason), p in zip(outs, params, strict=True):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), p.structured_outputs.json)


# -- batch invariance ------------------------------------------------------------------------


def test_unconstrained_requests_are_bit_identical_beside_constrained_ones(tiny_chat_model_dir):
    free = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3),
        SamplingParams(
            temperature=0.9, top_p=0.9, seed=5, max_tokens=16, ignore_eos=True, logprobs=2
        ),
    ]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    constrained = [
        SamplingParams(
            temperature=t, max_tokens=16, structured_outputs=StructuredOutputsParams(json=schema)
        )
        for t in (0, 1.0)
    ]
    alone = LLM(tiny_chat_model_dir, device="cpu", num_threads=1, compile="off")
    solo = [alone.generate(PROMPT, p, use_tqdm=False)[0].outputs[0] for p in free]
    busy = LLM(tiny_chat_model_dir, device="cpu", num_threads=1, compile="off")
    mixed = busy.generate([PROMPT] * 4, [*constrained, *free], use_tqdm=False)[2:]
    for a, b in zip(solo, mixed, strict=True):
        b = b.outputs[0]
        assert b.token_ids == a.token_ids
        assert [lp.logprob for lp in b.logprobs] == [lp.logprob for lp in a.logprobs]
        assert [lp.top for lp in b.logprobs] == [lp.top for lp in a.logprobs]


def test_n_siblings_each_follow_the_grammar(llm):
    params = SamplingParams(
        n=3,
        temperature=1.0,
        max_tokens=40,
        seed=3,
        structured_outputs=StructuredOutputsParams(regex=r"[xyz]{4}"),
    )
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert all(re.fullmatch("[xyz]{4}", o.text) and o.finish_reason == "stop" for o in out.outputs)


def test_a_grammar_cut_by_the_budget_finishes_with_length(llm):
    params = SamplingParams(
        temperature=0, max_tokens=3, structured_outputs=StructuredOutputsParams(regex="[a-z]{40}")
    )
    ((text, reason),) = _texts(llm, [params])
    assert reason == "length" and re.fullmatch("[a-z]+", text)


def test_chat_and_async_llm_take_structured_outputs(llm, tiny_chat_model_dir):
    params = SamplingParams(
        temperature=1.0,
        max_tokens=20,
        seed=2,
        structured_outputs=StructuredOutputsParams(choice=["up", "down"]),
    )
    chat = llm.chat([{"role": "user", "content": "Which way?"}], params, use_tqdm=False)
    assert chat[0].outputs[0].text in ("up", "down")

    async def stream() -> tuple[str, str]:
        engine = AsyncLLM(model=tiny_chat_model_dir, device="cpu", num_threads=1, compile="off")
        text, reason = "", None
        try:
            async for out in engine.generate("Which way?", params, "r0"):
                text += out.outputs[0].text
                reason = out.outputs[0].finish_reason
        finally:
            await engine.shutdown()
        return text, reason

    text, reason = asyncio.run(stream())
    assert text in ("up", "down") and reason == "stop"
