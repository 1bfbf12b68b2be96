"""How often structured chat outputs are valid, through a live server and the openai SDK.

    python -m engine.serve &
    python benchmarks/structured_validity.py --base-url http://127.0.0.1:8000/v1 \
        --requests 300 --concurrency 16

Sends `--requests` chat completions with `response_format` json_schema (cycling through a
few schemas and questions, half greedy and half sampled with a seed) and as many with a
forced tool call (`tool_choice` naming a function, or "required"), and checks every answer:
the content parses and validates against its schema with `jsonschema`, and every tool call
names an offered function with arguments that validate against its parameters. A request
cut by its token budget (finish_reason "length") counts as invalid. tests/server/
test_live.py runs it with a small count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass, field
from decimal import Decimal

import jsonschema
import openai

MODEL = "smollm2-135m-instruct"

SCHEMAS = [
    (
        "city",
        "Describe Paris.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "country": {"type": "string", "maxLength": 40},
                "population": {"type": "integer", "minimum": 0, "maximum": 50_000_000},
            },
            "required": ["city", "country", "population"],
            "additionalProperties": False,
        },
    ),
    (
        "recipe",
        "Give me a pancake recipe.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "ingredients": {
                    "type": "array",
                    "maxItems": 5,
                    "items": {"type": "string", "maxLength": 30},
                },
                "minutes": {"type": "integer", "minimum": 1, "maximum": 240},
            },
            "required": ["name", "ingredients", "minutes"],
            "additionalProperties": False,
        },
    ),
    (
        "review",
        "Review the film Casablanca.",
        {
            "type": "object",
            "properties": {
                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                "verdict": {"type": "string", "enum": ["must see", "worth it", "skip"]},
                "summary": {"type": "string", "maxLength": 80},
            },
            "required": ["stars", "verdict", "summary"],
            "additionalProperties": False,
        },
    ),
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 40},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount between currencies",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number", "minimum": 0, "multipleOf": 0.01},
                    "source": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "target": {"type": "string", "pattern": "^[A-Z]{3}$"},
                },
                "required": ["amount", "source", "target"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_QUESTIONS = [
    "What is the weather in Oslo?",
    "How much is 20 euros in dollars?",
    "Is it raining in Lima?",
    "Convert 99.5 GBP to JPY.",
]


@dataclass
class Report:
    json_valid: int = 0
    json_total: int = 0
    tools_valid: int = 0
    tools_total: int = 0
    failures: list[str] = field(default_factory=list)


def _sampling(i: int) -> dict:
    return {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "seed": i}


def validate(text: str, schema: dict) -> None:
    """`jsonschema.validate` on JSON numbers read as decimals, as JSON writes them: with
    floats, 1.15 is not a multiple of 0.01 (1.15 / 0.01 = 114.99999999999999)."""
    decimal_schema = json.loads(json.dumps(schema), parse_float=Decimal)
    jsonschema.validate(json.loads(text, parse_float=Decimal), decimal_schema)


async def _json_request(client: openai.AsyncOpenAI, i: int, report: Report) -> None:
    name, question, schema = SCHEMAS[i % len(SCHEMAS)]
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=160,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
        **_sampling(i),
    )
    choice = reply.choices[0]
    report.json_total += 1
    try:
        assert choice.finish_reason == "stop", f"finish_reason {choice.finish_reason}"
        validate(choice.message.content, schema)
        report.json_valid += 1
    except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
        report.failures.append(f"json #{i}: {exc}: {choice.message.content!r}")


async def _tool_request(client: openai.AsyncOpenAI, i: int, report: Report) -> None:
    tool = TOOLS[i % len(TOOLS)]
    choice_arg = (
        "required"
        if i % 4 < 2
        else {"type": "function", "function": {"name": tool["function"]["name"]}}
    )
    reply = await client.chat.completions.create(
        model=MODEL,
        max_tokens=120,
        tools=TOOLS,
        tool_choice=choice_arg,
        parallel_tool_calls=False,
        messages=[{"role": "user", "content": TOOL_QUESTIONS[i % len(TOOL_QUESTIONS)]}],
        **_sampling(i),
    )
    choice = reply.choices[0]
    report.tools_total += 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    try:
        assert choice.finish_reason == "tool_calls", f"finish_reason {choice.finish_reason}"
        calls = choice.message.tool_calls or []
        assert len(calls) == 1, f"{len(calls)} calls"
        if isinstance(choice_arg, dict):
            assert calls[0].function.name == tool["function"]["name"]
        validate(calls[0].function.arguments, schemas[calls[0].function.name])
        report.tools_valid += 1
    except (AssertionError, ValueError, KeyError, jsonschema.ValidationError) as exc:
        report.failures.append(f"tools #{i}: {exc}: {choice.message}")


async def run(
    base_url: str, api_key: str, requests: int, concurrency: int, progress: int = 0
) -> Report:
    """`requests` json_schema and `requests` forced-tool requests, `concurrency` at a time;
    with `progress`, a running count every that many answers."""
    report = Report()
    limit = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=600
    ) as client:

        async def one(kind, i):
            async with limit:
                await kind(client, i, report)
            if progress and (report.json_total + report.tools_total) % progress == 0:
                print(
                    f"  {report.json_valid}/{report.json_total} json_schema valid, "
                    f"{report.tools_valid}/{report.tools_total} tool calls valid",
                    flush=True,
                )

        jobs = [one(k, i) for i in range(requests) for k in (_json_request, _tool_request)]
        await asyncio.gather(*jobs)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--requests", type=int, default=300, help="of each kind")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    report = asyncio.run(
        run(args.base_url, args.api_key, args.requests, args.concurrency, progress=20)
    )
    print(f"response_format json_schema: {report.json_valid}/{report.json_total} valid")
    print(f"forced tool calls:           {report.tools_valid}/{report.tools_total} valid")
    for failure in report.failures[:10]:
        print("  " + failure)


if __name__ == "__main__":
    main()
