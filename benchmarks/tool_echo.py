"""Does the model echo the tool protocol in its answers, or copy the tool prompt's example?

    python benchmarks/tool_echo.py [--base-url URL]

Without `--base-url` it starts `python -m engine.serve` (the default model) on a free port
and stops it at the end. Every request is greedy (temperature 0), through the openai SDK,
in the shapes agent frameworks send:

- **tool answers**: for each scenario (a function, a question, the function's result), on
  chat completions and on the Responses API (the full input list, as the OpenAI Agents
  SDK sends it): a first turn offered the function (`auto`; `calls`: did it call?), then
  the answer turn after the call and its result, the function still offered (as
  LangChain, pydantic-ai and the Agents SDK send it). Counted: `echoing`, answers holding
  `RESERVED` text (the protocol's tags, the frame's opening and closing and its note's
  `(Data from`); `markup`, answers opening with `<` or holding a tag begun as the
  protocol's (`<tool_response]`, `<untrust>`) or `(Data `; `using_result`, answers
  without markup that say the result's key figure or words; `answer_calls`, answer
  turns that called the function again; `empty`, answers with neither text nor a call;
- **forced structured outputs**: a function the output must call (`tool_choice`
  "required" with the one function, as pydantic-ai's `output_type` sends it), on both
  APIs. Counted: `with_placeholders`, outputs whose arguments hold the old tool prompt's
  placeholders (`<function name>`, `<argument>`, `<value>`); `naming_the_function`,
  outputs whose arguments hold the function's own name as a value.

It prints each reply that counts against it (`--show`: every reply), then the totals as
JSON. Results of 2026-12-06 are in docs/tools.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts
import bench_serving

RESERVED = (
    "<tool_response>",
    "</tool_response>",
    "<tool_call>",
    "</tool_call>",
    "<untrusted",
    "</untrusted",
    "(Data from",
)
PLACEHOLDERS = ("<function name>", "<argument>", "<value>")
# Markup of the protocol, exact or not: an answer opening with `<`, or writing a tag that
# begins as the protocol's do (`<tool_response]`, `<untrust>`), or the frame's note.
MARKUP = re.compile(r"^\s*<|</?(tool|untrust)|\(Data ", re.IGNORECASE)


def _schema(**properties: str) -> dict:
    return {
        "type": "object",
        "properties": {name: {"type": kind} for name, kind in properties.items()},
        "required": list(properties),
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    parameters: dict
    question: str
    arguments: dict  # the call the answer turn follows
    result: str
    key: str  # what an answer that uses the result says


SCENARIOS = [
    Scenario("get_weather", "Get the current weather in a city.", _schema(city="string"),
             "What's the weather in Paris?", {"city": "Paris"},
             "The weather in Paris is sunny, 21C.", "21"),
    Scenario("get_stock_price", "Get the latest price of a stock.", _schema(symbol="string"),
             "What is Apple's stock price?", {"symbol": "AAPL"},
             '{"symbol": "AAPL", "price": 187.3, "currency": "USD"}', "187.3"),
    Scenario("convert_currency", "Convert an amount between currencies.",
             _schema(amount="number", source="string", target="string"),
             "How much is 100 US dollars in euros?",
             {"amount": 100, "source": "USD", "target": "EUR"}, "92.50 EUR", "92.5"),
    Scenario("search_flights", "Find flights between two cities on a date.",
             _schema(origin="string", destination="string", date="string"),
             "Find me a flight from London to Paris on 2026-12-10.",
             {"origin": "London", "destination": "Paris", "date": "2026-12-10"},
             "AF1081 departs 08:10, arrives 10:25; BA304 departs 13:45, arrives 16:00.", "AF1081"),
    Scenario("get_time", "Get the current time in a time zone.", _schema(timezone="string"),
             "What time is it in Tokyo?", {"timezone": "Asia/Tokyo"}, "14:32", "14:32"),
    Scenario("lookup_user", "Look up a customer by email.", _schema(email="string"),
             "Which plan is ada@example.com on?", {"email": "ada@example.com"},
             '{"name": "Ada Lovelace", "plan": "pro", "since": "2024-03-01"}', "pro"),
    Scenario("translate", "Translate text into another language.",
             _schema(text="string", target_language="string"),
             "Translate 'hello world' into French.",
             {"text": "hello world", "target_language": "French"}, "bonjour le monde", "bonjour"),
    Scenario("get_population", "Get the population of a country.", _schema(country="string"),
             "How many people live in France?", {"country": "France"},
             "68.4 million (2024 estimate)", "68.4"),
    Scenario("calculate_tip", "Compute a tip for a bill.",
             _schema(bill="number", percent="number"),
             "What is a 15% tip on a 60 dollar bill?", {"bill": 60, "percent": 15}, "9.00", "9"),
    Scenario("find_restaurant", "Find a restaurant in a city.",
             _schema(city="string", cuisine="string"),
             "Recommend an Italian restaurant in Berlin.",
             {"city": "Berlin", "cuisine": "Italian"},
             "Trattoria Roma, 4.6 stars, Kastanienallee 12", "Trattoria"),
    Scenario("get_order_status", "Get the shipping status of an order.",
             _schema(order_id="string"), "Where is my order 88412?", {"order_id": "88412"},
             "Shipped on 2026-12-01 with DHL; expected delivery 2026-12-04.", "2026-12-04"),
    Scenario("count_words", "Count the words in a text.", _schema(text="string"),
             "How many words are in 'the quick brown fox jumps over the lazy dog'?",
             {"text": "the quick brown fox jumps over the lazy dog"}, "9", "9"),
    Scenario("get_exchange_hours", "Get the opening hours of a stock exchange.",
             _schema(exchange="string"), "When does the New York Stock Exchange open?",
             {"exchange": "NYSE"}, "Mon-Fri 09:30-16:00 Eastern Time", "09:30"),
    Scenario("check_inventory", "Check how many units of a product are in stock.",
             _schema(product="string"), "Do we have any blue mugs left?",
             {"product": "blue mug"}, "product,units\nblue mug,14", "14"),
    Scenario("get_definition", "Look up a word in the dictionary.", _schema(word="string"),
             "What does 'ephemeral' mean?", {"word": "ephemeral"},
             "ephemeral (adj.): lasting for a very short time.", "short time"),
]  # fmt: skip

STRUCTURED = [
    ("City", "Tell me about Paris.", _schema(name="string", country="string")),
    ("City", "Describe Tokyo.", _schema(name="string", country="string", population="integer")),
    ("Person", "Who wrote Hamlet?", _schema(name="string", born="integer")),
    ("Book", "Name a famous novel by Jane Austen.", _schema(title="string", author="string")),
    ("Recipe", "Give me a pancake recipe.", _schema(name="string", minutes="integer")),
    ("Movie", "Tell me about the movie Titanic.", _schema(title="string", year="integer")),
    ("Country", "What is the capital of Italy?", _schema(country="string", capital="string")),
    ("Planet", "Describe Mars.", _schema(name="string", moons="integer")),
    ("Animal", "Describe an elephant.", _schema(species="string", habitat="string")),
    ("Company", "Tell me about Apple Inc.", _schema(name="string", founded="integer")),
]


def _chat_tool(name: str, description: str, parameters: dict) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def _responses_tool(name: str, description: str, parameters: dict) -> dict:
    return {"type": "function", "name": name, "description": description, "parameters": parameters}


def echoes(text: str | None) -> list[str]:
    return [tag for tag in RESERVED if tag in (text or "")]


def placeholders(arguments: str) -> list[str]:
    return [p for p in PLACEHOLDERS if p in arguments]


@dataclass
class Tally:
    first_turns: int = 0
    calls: int = 0
    answers: int = 0
    echoing: int = 0
    markup: int = 0
    using_result: int = 0  # answers that say the result's key figure or words
    answer_calls: int = 0  # answer turns that called the function again instead
    empty: int = 0  # answer turns with neither text nor a call
    structured: int = 0
    structured_calls: int = 0
    with_placeholders: int = 0
    naming_the_function: int = 0  # arguments holding the function's own name as a value
    bad: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)


async def _chat_scenario(client: openai.AsyncOpenAI, model: str, s: Scenario, t: Tally) -> None:
    tools = [_chat_tool(s.name, s.description, s.parameters)]
    user = {"role": "user", "content": s.question}
    first = await client.chat.completions.create(
        model=model, messages=[user], tools=tools, temperature=0, max_tokens=96
    )
    t.first_turns += 1
    t.calls += bool(first.choices[0].message.tool_calls)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": s.name, "arguments": json.dumps(s.arguments)},
    }
    messages = [
        user,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": s.result},
    ]
    answer = await client.chat.completions.create(
        model=model, messages=messages, tools=tools, temperature=0, max_tokens=48
    )
    message = answer.choices[0].message
    _count_answer(t, f"chat {s.name}", message.content, bool(message.tool_calls), s.key)


async def _responses_scenario(
    client: openai.AsyncOpenAI, model: str, s: Scenario, t: Tally
) -> None:
    tools = [_responses_tool(s.name, s.description, s.parameters)]
    user = {"role": "user", "content": s.question}
    first = await client.responses.create(
        model=model, input=[user], tools=tools, temperature=0, max_output_tokens=96, store=False
    )
    t.first_turns += 1
    t.calls += any(item.type == "function_call" for item in first.output)
    call = {
        "type": "function_call",
        "call_id": "call_1",
        "name": s.name,
        "arguments": json.dumps(s.arguments),
    }
    output = {"type": "function_call_output", "call_id": "call_1", "output": s.result}
    answer = await client.responses.create(
        model=model,
        input=[user, call, output],
        tools=tools,
        temperature=0,
        max_output_tokens=48,
        store=False,
    )
    called = any(item.type == "function_call" for item in answer.output)
    _count_answer(t, f"responses {s.name}", answer.output_text, called, s.key)


def _count_answer(t: Tally, label: str, text: str | None, called: bool, key: str) -> None:
    text = text or ""
    t.answers += 1
    t.answer_calls += called
    t.empty += not called and not text.strip()
    t.shown.append(f"{label}: {text!r}{' (and a call)' if called else ''}")
    markup = bool(MARKUP.search(text))
    t.markup += markup
    t.using_result += not markup and key.lower() in text.lower()
    found = echoes(text)
    if found:
        t.echoing += 1
        t.bad.append(f"{label}: answer holds {found}: {text!r}")


async def _structured(
    client: openai.AsyncOpenAI, model: str, api: str, spec: tuple, t: Tally
) -> None:
    name, question, schema = spec
    description = f"The final response, a {name}."
    user = {"role": "user", "content": question}
    if api == "chat":
        reply = await client.chat.completions.create(
            model=model,
            messages=[user],
            tools=[_chat_tool("final_result", description, schema)],
            tool_choice="required",
            temperature=0,
            max_tokens=96,
        )
        calls = [c.function.arguments for c in reply.choices[0].message.tool_calls or []]
    else:
        reply = await client.responses.create(
            model=model,
            input=[user],
            tools=[_responses_tool("final_result", description, schema)],
            tool_choice="required",
            temperature=0,
            max_output_tokens=96,
            store=False,
        )
        calls = [item.arguments for item in reply.output if item.type == "function_call"]
    t.structured += 1
    t.shown.append(f"{api} {name} ({question}): {calls}")
    t.structured_calls += bool(calls)
    t.naming_the_function += any('"final_result"' in arguments for arguments in calls)
    found = sorted({p for arguments in calls for p in placeholders(arguments)})
    if found:
        t.with_placeholders += 1
        t.bad.append(f"{api} {name} ({question}): arguments hold {found}: {calls}")


async def run(base_url: str, concurrency: int) -> Tally:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=600, max_retries=0)
    model = (await client.models.list()).data[0].id
    tally = Tally()
    jobs = [
        *(_chat_scenario(client, model, s, tally) for s in SCENARIOS),
        *(_responses_scenario(client, model, s, tally) for s in SCENARIOS),
        *(_structured(client, model, api, spec, tally) for api in ("chat", "responses")
          for spec in STRUCTURED),
    ]  # fmt: skip
    gate = asyncio.Semaphore(concurrency)

    async def limited(job):
        async with gate:
            await job

    await asyncio.gather(*(limited(job) for job in jobs))
    return tally


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="a running server's /v1 URL (default: start one)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--show", action="store_true", help="print every answer too")
    args = p.parse_args(argv)
    isa = sorted(
        set(Path("/proc/cpuinfo").read_text().split()) & {"avx2", "avx512_vnni", "avx_vnni"}
    )
    print(
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, ISA "
        f"{'/'.join(isa)}: python benchmarks/tool_echo.py {' '.join(argv or sys.argv[1:])}",
        file=sys.stderr,
    )
    if args.base_url:
        tally = asyncio.run(run(args.base_url, args.concurrency))
    else:
        port = bench_serving.free_port()
        argv_ = bench_serving.serve_argv(port)
        with bench_serving.running_server("tokenmill", argv_, port, args.startup_timeout) as url:
            tally = asyncio.run(run(f"{url}/v1", args.concurrency))
    for line in sorted(tally.bad) + (sorted(tally.shown) if args.show else []):
        print(line)
    totals = {k: v for k, v in vars(tally).items() if k not in ("bad", "shown")}
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
