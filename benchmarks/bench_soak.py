"""A soak: a churning mix of requests against a running server for a while, then whether
everything a request holds came back once it is idle again (docs/server.md, "Soak").

The mix, from `--concurrency` clients back to back: chat completions (streamed and not,
n > 1, json_schema, function tools), Responses (streamed and not, chained with
previous_response_id, in conversations, background ones cancelled, polled or resumed
and dropped, the calculator and, with `--sandbox`, code_interpreter), clients that
disconnect mid-stream, bodies over the 64 KiB that go to the preparation process,
uploads cut off halfway, and invalid requests (which must get a 4xx). Every 30 s, and
idle before (after `--warmup` seconds of the mix) and after (each `--idle-wait` seconds
after the last request), it records the
server's KV usage and running/waiting counts (/metrics), its RSS, open file
descriptors, threads and child processes (/proc/PID), and its SQLite database: responses
by status, usage rows, storage holds, quota reservations and usage checkpoints.
Loopback only; it stops by itself after `--duration` seconds.

    python -m engine.serve --data-dir /tmp/soak --port 8718 --no-access-log &
    python benchmarks/bench_soak.py --pid $! --data-dir /tmp/soak --duration 300 --sandbox
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

import httpx

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of Japan?",
    "Write a haiku about rain.",
    "Explain what a prime number is.",
    "List three fruits.",
    "What is 17 times 23?",
    "Tell me a fun fact about octopuses.",
    "Summarize the plot of Hamlet in one sentence.",
]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
counts: collections.Counter = collections.Counter()
response_ids: list[str] = []
conversations: list[str] = []


def proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().split("\n")
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    children = [c for c in os.listdir("/proc") if c.isdigit() and _ppid(c) == pid]
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "children": sorted(int(c) for c in children),
    }


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def db_stats(path: str) -> dict:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    q = lambda s: con.execute(s).fetchall()  # noqa: E731
    out = {
        "responses_by_status": dict(q("select status, count(*) from responses group by status")),
        "usage_rows": q("select count(*) from usage_records")[0][0],
        "usage_by_endpoint_status": {
            f"{e}/{s}": n
            for e, s, n in q(
                "select endpoint, status, count(*) from usage_records group by endpoint, status"
            )
        },
        "storage_holds": q("select count(*) from storage_holds")[0][0],
        "quota_reservations": q("select count(*) from quota_reservations")[0][0],
        "usage_checkpoints": q("select count(*) from usage_checkpoints")[0][0],
        "quota_reserved": q("select coalesce(sum(reserved), 0) from quota_periods")[0][0],
    }
    con.close()
    return out


async def snapshot(client: httpx.AsyncClient, args, label: str) -> dict:
    metrics = (await client.get(f"{args.base}/metrics")).text
    health = (await client.get(f"{args.base}/health")).json()["status"]
    gauges = {
        line.split()[0].removeprefix("tokenmill:"): float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("tokenmill:num_requests", "tokenmill:kv_cache_usage"))
    }
    snap = {
        "label": label,
        "t": round(time.monotonic() - START, 1),
        "health": health,
        "proc": proc_stats(args.pid),
        "engine": gauges,
        "db": db_stats(args.db),
    }
    print(json.dumps(snap), flush=True)
    return snap


def checks(before: dict, after: dict) -> dict[str, bool]:
    """What must hold once the server is idle again."""
    db, gauges = after["db"], after["engine"]
    settled = sum(
        n for s, n in db["responses_by_status"].items() if s not in ("queued", "in_progress")
    )
    return {
        "no KV block in use": gauges["kv_cache_usage_perc"] == 0,
        "nothing running or waiting": gauges["num_requests_running"] == 0
        and gauges["num_requests_waiting"] == 0,
        "no response queued or in progress": settled == sum(db["responses_by_status"].values()),
        "one usage row per response": sum(
            n for k, n in db["usage_by_endpoint_status"].items() if k.startswith("responses/")
        )
        == sum(db["responses_by_status"].values()),
        "no storage hold, reservation or checkpoint left": db["storage_holds"]
        == db["quota_reservations"]
        == db["usage_checkpoints"]
        == db["quota_reserved"]
        == 0,
        "open files as before": after["proc"]["fds"] <= before["proc"]["fds"],
        "child processes as before": after["proc"]["children"] == before["proc"]["children"],
        "no invalid request got a 2xx or 5xx": not any(k.startswith("invalid-") for k in counts),
    }


def headers(args) -> dict:
    return {"Authorization": f"Bearer {args.key}"} if args.key else {}


async def sse_lines(resp, stop_after: int | None):
    n = 0
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            n += 1
            yield line[5:].strip()
            if stop_after is not None and n >= stop_after:
                return


async def post(client, args, path, body, stream=False, stop_after=None, raw=None):
    url = f"{args.base}/v1{path}"
    if not stream:
        r = await client.post(
            url,
            json=body if raw is None else None,
            content=raw,
            headers={**headers(args), "Content-Type": "application/json"},
        )
        return r.status_code, (
            r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        )
    async with client.stream("POST", url, json=body, headers=headers(args)) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json()
        last = None
        async for data in sse_lines(r, stop_after):
            last = data
        return 200, last


def chat_body(**extra):
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        "max_tokens": random.randint(8, 40),
        **extra,
    }


def resp_body(**extra):
    return {
        "model": MODEL,
        "input": random.choice(PROMPTS),
        "max_output_tokens": random.randint(8, 40),
        **extra,
    }


async def op_chat(client, args):
    return await post(client, args, "/chat/completions", chat_body())


async def op_chat_stream(client, args):
    return await post(
        client,
        args,
        "/chat/completions",
        chat_body(stream=True, stream_options={"include_usage": True}),
        stream=True,
    )


async def op_chat_disconnect(client, args):
    return await post(
        client,
        args,
        "/chat/completions",
        chat_body(stream=True, max_tokens=64),
        stream=True,
        stop_after=random.randint(1, 10),
    )


async def op_chat_n(client, args):
    stream = random.random() < 0.5
    return await post(
        client,
        args,
        "/chat/completions",
        chat_body(n=random.randint(2, 3), stream=stream),
        stream=stream,
    )


async def op_chat_json(client, args):
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
    }
    return await post(
        client, args, "/chat/completions", chat_body(response_format=fmt, max_tokens=48)
    )


async def op_chat_function(client, args):
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    return await post(
        client,
        args,
        "/chat/completions",
        chat_body(tools=[tool], tool_choice=random.choice(["auto", "required"])),
    )


async def op_resp_chain(client, args):
    extra = {}
    if response_ids and random.random() < 0.7:
        extra["previous_response_id"] = random.choice(response_ids[-20:])
    stream = random.random() < 0.5
    status, body = await post(client, args, "/responses", resp_body(**extra), stream=stream)
    rid = None
    if status == 200 and not stream:
        rid = body.get("id")
    elif status == 200 and body:
        with contextlib.suppress(ValueError):
            rid = json.loads(body).get("response", {}).get("id")
    if rid:
        response_ids.append(rid)
    return status, body


async def op_resp_conversation(client, args):
    if not conversations or random.random() < 0.1:
        status, body = await post(client, args, "/conversations", {"metadata": {"soak": "1"}})
        if status == 200:
            conversations.append(body["id"])
        return status, body
    stream = random.random() < 0.5
    stop = random.randint(1, 12) if stream and random.random() < 0.3 else None
    return await post(
        client,
        args,
        "/responses",
        resp_body(conversation=random.choice(conversations), stream=stream),
        stream=stream,
        stop_after=stop,
    )


async def op_resp_disconnect(client, args):
    return await post(
        client,
        args,
        "/responses",
        resp_body(stream=True, max_output_tokens=64),
        stream=True,
        stop_after=random.randint(1, 15),
    )


async def op_background_cancel(client, args):
    status, body = await post(
        client, args, "/responses", resp_body(background=True, max_output_tokens=64)
    )
    if status != 200:
        return status, body
    await asyncio.sleep(random.uniform(0, 1.5))
    if random.random() < 0.7:
        return await post(client, args, f"/responses/{body['id']}/cancel", {})
    if random.random() < 0.5:  # resume its stream, then drop it
        url = f"{args.base}/v1/responses/{body['id']}"
        async with client.stream(
            "GET", url, params={"stream": "true", "starting_after": 0}, headers=headers(args)
        ) as r:
            async for _ in sse_lines(r, random.randint(1, 8)):
                pass
        return r.status_code, None
    for _ in range(60):
        r = await client.get(f"{args.base}/v1/responses/{body['id']}", headers=headers(args))
        if r.json().get("status") not in ("queued", "in_progress"):
            break
        await asyncio.sleep(0.5)
    return r.status_code, r.json()


async def op_tools(client, args):
    if args.sandbox and random.random() < 0.4:
        tools = [{"type": "code_interpreter", "container": {"type": "auto"}}]
        prompt = "Use Python to compute 2**20 and print it."
        choice = {"type": "code_interpreter"}
    else:
        tools = [{"type": "function", "name": "calculator"}]
        prompt = "What is 1234 * 5678? Use the calculator."
        choice = "required"
    stream = random.random() < 0.5
    stop = random.randint(1, 20) if stream and random.random() < 0.3 else None
    body = {
        "model": MODEL,
        "input": prompt,
        "tools": tools,
        "tool_choice": choice,
        "max_output_tokens": 64,
        "stream": stream,
    }
    return await post(client, args, "/responses", body, stream=stream, stop_after=stop)


async def op_resp_json(client, args):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}}
    return await post(client, args, "/responses", resp_body(text=fmt, max_output_tokens=48))


INVALID = [
    ("/chat/completions", {"model": MODEL}),
    ("/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}),
    (
        "/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
    ),
    ("/responses", {"model": MODEL, "input": "x", "previous_response_id": "resp_doesnotexist"}),
    ("/responses", {"model": MODEL, "input": "x", "conversation": "conv_doesnotexist"}),
    (
        "/responses",
        {
            "model": MODEL,
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}},
        },
    ),
    (
        "/responses",
        {
            "model": MODEL,
            "input": "x",
            "tools": [{"type": "code_interpreter"}],
            "tool_choice": {"type": "function", "name": "nope"},
        },
    ),
]


async def op_invalid(client, args):
    if random.random() < 0.15:
        return await post(client, args, "/chat/completions", None, raw=b"{not json")
    path, body = random.choice(INVALID)
    status, out = await post(client, args, path, body)
    if status == 200 or status >= 500:
        counts[f"invalid-{status}-{path}"] += 1
    return status, out


async def op_large_body(client, args):
    """A body over the server's 64 KiB offload threshold (its text written as \\u escapes,
    six bytes a character, so that the prompt still fits the context): parsed and
    tokenized in the preparation process; half of them dropped after the first chunk."""
    text = " ".join(random.choice(PROMPTS) for _ in range(300))[:11_500] + " Reply in one word."
    content = "".join(f"\\u{ord(c):04x}" for c in text)
    stream = random.random() < 0.5
    raw = (
        f'{{"model": "{MODEL}", "max_tokens": 4, "stream": {str(stream).lower()}, '
        f'"messages": [{{"role": "user", "content": "{content}"}}]}}'
    ).encode()
    url = f"{args.base}/v1/chat/completions"
    hdrs = {**headers(args), "Content-Type": "application/json"}
    async with client.stream("POST", url, content=raw, headers=hdrs) as r:
        if stream and r.status_code == 200:
            async for _ in sse_lines(r, 1):
                pass
        else:
            await r.aread()
        return r.status_code, None


async def op_upload_abort(client, args):
    """Headers promising a large body, half of it, then the connection closed."""
    host, port = args.base.split("//")[1].split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    auth = f"Authorization: Bearer {args.key}\r\n" if args.key else ""
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: 400000\r\n\r\n".encode()
        + b'{"model": "'
        + b"x" * 150_000
    )
    await writer.drain()
    await asyncio.sleep(random.uniform(0, 0.3))
    writer.close()
    return 0, None


OPS = [
    (op_chat, 3),
    (op_chat_stream, 3),
    (op_chat_disconnect, 3),
    (op_chat_n, 2),
    (op_chat_json, 1),
    (op_chat_function, 1),
    (op_resp_chain, 3),
    (op_resp_conversation, 3),
    (op_resp_disconnect, 2),
    (op_background_cancel, 2),
    (op_tools, 2),
    (op_resp_json, 1),
    (op_invalid, 2),
    (op_large_body, 1),
    (op_upload_abort, 1),
]


async def worker(client, args, deadline):
    fns, weights = zip(*OPS, strict=True)
    while time.monotonic() < deadline:
        op = random.choices(fns, weights)[0]
        try:
            status, _ = await asyncio.wait_for(op(client, args), 120)
            counts[f"{op.__name__}:{status}"] += 1
        except Exception as exc:  # a broken connection counts, and the soak goes on
            counts[f"{op.__name__}:exc:{type(exc).__name__}"] += 1


async def run_mix(client: httpx.AsyncClient, args, duration: float, snaps: list) -> None:
    """The mix for `duration` seconds (a snapshot every 30 s into `snaps`), then idle."""
    deadline = time.monotonic() + duration
    workers = [asyncio.create_task(worker(client, args, deadline)) for _ in range(args.concurrency)]
    while time.monotonic() < deadline:
        await asyncio.sleep(min(30, max(0.1, deadline - time.monotonic())))
        snaps.append(await snapshot(client, args, "during"))
    await asyncio.gather(*workers)
    await asyncio.sleep(args.idle_wait)


async def main() -> bool:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="http://127.0.0.1:8718")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--data-dir", type=Path, required=True, help="the server's --data-dir")
    p.add_argument("--key")
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--sandbox", action="store_true")
    p.add_argument("--idle-wait", type=float, default=20)
    p.add_argument(
        "--warmup",
        type=float,
        default=30,
        help="seconds of the mix before the first snapshot, so that what a server sets up "
        "on first use (worker threads, connections, imports) is there before",
    )
    p.add_argument("--json", type=Path, help="write the snapshots and counts here")
    args = p.parse_args()
    args.db = str(args.data_dir / "tokenmill.db")
    random.seed(1)
    snaps = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
        if args.warmup > 0:
            await run_mix(client, args, args.warmup, [])
            counts.clear()
        snaps.append(await snapshot(client, args, "before"))
        await run_mix(client, args, args.duration, snaps)
        snaps.append(await snapshot(client, args, "after"))
    print(json.dumps(dict(sorted(counts.items())), indent=1))
    held = checks(snaps[0], snaps[-1])
    for name, ok in held.items():
        print(f"{'held' if ok else 'FAILED'}: {name}")
    if args.json:
        args.json.write_text(
            json.dumps({"snapshots": snaps, "counts": counts, "checks": held}, indent=1)
        )
    return all(held.values())


START = time.monotonic()
if __name__ == "__main__":
    sys.exit(0 if asyncio.run(main()) else 1)
