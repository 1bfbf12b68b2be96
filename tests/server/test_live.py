"""The real `openai` SDK against `python -m engine.serve` with the default model, and two
agent frameworks on the same API, unchanged: the OpenAI Agents SDK and LangChain's
`ChatOpenAI`.

One server for the module (model loading dominates the cost); outputs are kept short.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pydantic
import pytest

import kernels.native
from engine.linear import QUANTIZATIONS
from engine.loader import resolve_model
from engine.loader.gguf import read_gguf
from engine.tokenizer import Tokenizer
from server.state import INLINE_PROMPT_CHARS
from tests.server.live_server import API_KEY, LiveServer, start_server
from tests.server.responses_conformance import resume_background_stream, stream_response

MODEL = "smollm2-135m-instruct"
# A question the model answers with a wide first-token margin (2.5 nats) in every mode;
# "the capital of France" hangs on 0.08 nats and flips between float32 and w8a8.
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module")
def live():
    """The default server, once it has switched to its compiled blocks (it answers while it
    compiles, but some tests compare answers across requests, and the switch can change a
    close greedy choice)."""
    server = start_server("--api-key", API_KEY, "--max-request-body-bytes", "100000")
    try:
        health = _health(server)
        wanted = "off" if health["cpu"]["compile"] == "off" else "ready"  # cpu_path's default
        assert health["compile"] in ("compiling", wanted)
        deadline = time.monotonic() + 300
        while (state := _health(server)["compile"]) == "compiling":
            assert time.monotonic() < deadline, "the background compile did not finish"
            time.sleep(1)
        assert state == wanted
    except BaseException:
        server.stop()
        raise
    yield server
    assert server.stop() == 0


def _health(server: LiveServer) -> dict:
    response = httpx.get(f"{server.url}/health", timeout=10)
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)


def aclient(live: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)


def greedy(client: openai.OpenAI, messages=QUESTION, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def test_models_health_and_metrics_routes(live, client):
    chat_models = [m.id for m in client.models.list().data if m.task == "generate"]
    assert chat_models == [MODEL]
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "ok"
    assert health["compile"] == ("off" if health["cpu"]["compile"] == "off" else "ready")
    # the kernels this CPU runs, and the defaults chosen for them with the reason
    assert health["cpu"]["isa"] == kernels.native.cpu_isa()
    assert health["cpu"]["quantization"] in QUANTIZATIONS and health["cpu"]["reason"]
    # Idle: nothing running, so no KV block is held (the prefix cache's are evictable).
    assert live.metric("num_requests_running") == 0
    assert live.metric("kv_cache_usage_perc") == 0


def test_non_streaming_chat(client):
    response = greedy(client)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert "Tokyo" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 10
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_stream_with_usage_matches_non_stream(client):
    whole = greedy(client, max_tokens=16)
    chunks = list(
        greedy(client, max_tokens=16, stream=True, stream_options={"include_usage": True})
    )
    assert len({c.id for c in chunks}) == 1
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_string_ends_the_answer_before_it(client):
    text = greedy(client).choices[0].message.content
    stop = text.split()[2]  # a word from the middle of the greedy answer
    stopped = greedy(client, stop=[stop, "zzz-unused"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


def test_echo_of_token_ids_keeps_special_tokens(client):
    """A prompt of token ids echoes as the same prompt written as text does, its special
    tokens included."""
    text = "<|im_start|>user\nhi"
    ids = [1, 4093, 198, 6004]  # that text in SmolLM2's vocabulary
    for prompt in (text, ids):
        echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True)
        assert echoed.usage.prompt_tokens == len(ids)
        assert echoed.choices[0].text.startswith(text)


def test_returned_token_ids_decode_to_the_prompt_and_the_answer(client):
    """vLLM's return_token_ids, as RL trainers read them: the prompt's ids decode to the
    rendered prompt, a choice's to its text and the end token; streamed ids add up to
    the same; logprobs named by id name the same tokens."""
    tokenizer = Tokenizer.from_gguf(read_gguf(resolve_model(MODEL).path).metadata)
    extra = {"return_token_ids": True, "return_tokens_as_token_ids": True}
    response = greedy(client, max_tokens=24, logprobs=True, extra_body=extra).model_dump()
    prompt = tokenizer.decode(response["prompt_token_ids"], skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert QUESTION[0]["content"] in prompt
    (choice,) = response["choices"]
    answer = tokenizer.decode(choice["token_ids"], skip_special_tokens=False)
    assert answer.removesuffix("<|im_end|>") == choice["message"]["content"]
    named = [int(t["token"].removeprefix("token_id:")) for t in choice["logprobs"]["content"]]
    assert named == choice["token_ids"]
    chunks = [c.model_dump() for c in greedy(client, max_tokens=24, stream=True, extra_body=extra)]
    assert chunks[0]["prompt_token_ids"] == response["prompt_token_ids"]
    streamed = [t for c in chunks for t in c["choices"][0].get("token_ids") or []]
    assert streamed == choice["token_ids"]
    completion = client.completions.create(
        model=MODEL,
        prompt=response["prompt_token_ids"],
        max_tokens=8,
        temperature=0,
        extra_body=extra,
    ).model_dump()
    (choice,) = completion["choices"]
    assert choice["prompt_token_ids"] == response["prompt_token_ids"]
    text = tokenizer.decode(choice["token_ids"], skip_special_tokens=False)
    assert text.removesuffix("<|im_end|>") == choice["text"]


def test_max_tokens_gives_finish_reason_length(client):
    response = greedy(client, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3
    legacy = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3, temperature=0)
    assert legacy.choices[0].finish_reason == "length"
    assert legacy.usage.prompt_tokens == 3


def test_n_choices(client):
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, n=2, temperature=1.0, max_tokens=6, seed=5
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.message.content for c in response.choices)
    assert all(c.finish_reason in ("stop", "length") for c in response.choices)
    assert 2 <= response.usage.completion_tokens <= 12


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell me a story."}],
                temperature=1.0,
                max_tokens=12,
                seed=seed,
            )
            .choices[0]
            .message.content
        )

    assert sample(1234) == sample(1234)
    assert len({sample(1), sample(2), sample(3)}) >= 2


def test_logprobs(client):
    response = greedy(client, max_tokens=4, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy picks the top token
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_read_it(client):
    """The legacy API's echo + logprobs (lm-evaluation-harness's loglikelihood request):
    the prompt's tokens come first, the first unscored, then the generated one; a prompt
    token scores as that token scored when it was generated."""
    prompt = "The capital of Japan is"
    first = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1
    )
    generated = first.choices[0].logprobs
    text = prompt + first.choices[0].text
    for stream in (False, True):
        chunks = client.completions.create(
            model=MODEL,
            prompt=text,
            max_tokens=1,
            temperature=0,
            logprobs=1,
            echo=True,
            stream=stream,
        )
        choice = next(iter(chunks)).choices[0] if stream else chunks.choices[0]
        logprobs = choice.logprobs
        assert choice.text.startswith(text) and "".join(logprobs.tokens) == choice.text
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
        scored = logprobs.token_logprobs[1:]
        assert all(lp <= 0 for lp in scored)
        # the likeliest token, and the prompt's own (OpenAI's "up to logprobs + 1")
        assert all(
            len(top) in (1, 2) and top[token] == lp and max(top.values()) >= lp
            for top, token, lp in zip(
                logprobs.top_logprobs[1:], logprobs.tokens[1:], scored, strict=True
            )
        )
        # the answer's token, second to last now, scores as it did when generated
        assert logprobs.tokens[-2] == generated.tokens[0]
        assert logprobs.token_logprobs[-2] == pytest.approx(generated.token_logprobs[0], abs=0.05)


def test_max_tokens_zero_with_echo_scores_the_prompt_alone(live, client):
    """The legacy API's scoring request, max_tokens=0 with echo: the prompt and its
    logprobs, no completion and no completion tokens billed or counted as generated;
    without echo it is refused."""
    prompt = "The capital of Japan is Tokyo"
    generated = live.metric("generation_tokens_total")
    with_one = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True
    )
    prompt_part = len(with_one.choices[0].logprobs.tokens) - 1
    for stream in (False, True):
        options = {"stream_options": {"include_usage": True}} if stream else {}
        result = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=0,
            logprobs=2,
            echo=True,
            stream=stream,
            **options,
        )
        chunks = list(result) if stream else [result]
        choice = chunks[0].choices[0]
        assert choice.text == prompt and choice.finish_reason == "length"
        logprobs = choice.logprobs
        assert logprobs.tokens == with_one.choices[0].logprobs.tokens[:prompt_part]
        assert (
            logprobs.token_logprobs == (with_one.choices[0].logprobs.token_logprobs[:prompt_part])
        )
        assert chunks[-1].usage.completion_tokens == 0
        assert chunks[-1].usage.prompt_tokens == with_one.usage.prompt_tokens
    assert live.metric("generation_tokens_total") == generated + 1  # with_one's token alone
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)


def test_prompt_logprobs_score_the_whole_prompt_as_echo_does(client):
    """vLLM's `prompt_logprobs` (sent as the SDK's extra_body): the engine computes the
    whole prompt for them, so a prompt just cached is scored in full; they agree with
    echo's scores of the same tokens, and follow truncate_prompt_tokens' cut."""
    prompt = "The capital of Japan is Tokyo, and the capital of France is Paris"
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)  # now cached
    scored = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=1,
        logprobs=0,
        echo=True,
        extra_body={"prompt_logprobs": 2},
    )
    assert scored.usage.prompt_tokens_details.cached_tokens == 0
    entries = scored.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == scored.usage.prompt_tokens and entries[0] is None
    echoed = scored.choices[0].logprobs
    for entry, token, logprob in zip(
        entries[1:], echoed.tokens[1:], echoed.token_logprobs[1:], strict=False
    ):
        own = next(iter(entry.values()))  # the prompt's token first, then the 2 likeliest
        assert (own["decoded_token"], own["logprob"]) == (token, logprob)
        ranks = {e["rank"]: e["logprob"] for e in entry.values()}
        assert len(entry) in (2, 3) and {1, 2} <= set(ranks) and ranks[1] >= own["logprob"]
    chat = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    entries = chat.model_extra["prompt_logprobs"]
    assert len(entries) == chat.usage.prompt_tokens and all(len(e) == 1 for e in entries[1:])
    cut = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=1,
        extra_body={"prompt_logprobs": 0, "truncate_prompt_tokens": 3},
    )
    assert len(cut.choices[0].model_extra["prompt_logprobs"]) == 3


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_tool_result_round_trip_gets_a_final_answer(client):
    """SmolLM2-135M is too small to decide to call tools itself (the call leg is tested
    on the scripted engine in test_app.py); here the real model gets a conversation
    holding a call and its result, rendered in the default tool format, and answers."""
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    without_tools = greedy(client, messages=messages, max_tokens=1)
    response = greedy(client, messages=messages, tools=[WEATHER_TOOL], max_tokens=24)
    choice = response.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    # The tool list went into the prompt (SmolLM2's template has no tool section).
    assert response.usage.prompt_tokens > without_tools.usage.prompt_tokens + 50


def test_cached_tokens_on_a_repeated_long_system_prompt(client):
    system = {"role": "system", "content": f"Session {uuid.uuid4()}. " + "Answer briefly. " * 40}
    first = greedy(client, messages=[system, QUESTION[0]], max_tokens=1)
    second = greedy(
        client, messages=[system, {"role": "user", "content": "And Spain?"}], max_tokens=1
    )
    assert first.usage.prompt_tokens_details.cached_tokens < 16
    assert second.usage.prompt_tokens_details.cached_tokens >= 0.8 * first.usage.prompt_tokens


def test_client_errors(live, client):
    def error_of(call, *args, **kwargs) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as info:
            call(*args, **kwargs)
        return info.value

    create = client.chat.completions.create
    err = error_of(create, model=MODEL, messages=QUESTION, temperature="hot")
    assert (err.status_code, err.param) == (400, "temperature")
    err = error_of(create, model=MODEL, messages=QUESTION, top_p=1.5)
    assert (err.status_code, err.param) == (400, "top_p")
    err = error_of(create, model="gpt-4o", messages=QUESTION)
    assert isinstance(err, openai.NotFoundError) and err.code == "model_not_found"
    err = error_of(create, model=MODEL, messages=QUESTION, max_tokens=1_000_000)
    assert (err.status_code, err.code) == (400, "context_length_exceeded")
    err = error_of(create, model=MODEL, messages=[{"role": "user", "content": "x" * 200_000}])
    assert err.status_code == 413
    bad_key = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    assert isinstance(error_of(bad_key.models.list), openai.AuthenticationError)
    raw = httpx.post(
        f"{live.url}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"


def test_large_prompts_are_prepared_in_a_child_without_the_engine(live, client):
    """A prompt past the event loop's inline size is rendered and tokenized in the
    preparation process, which holds the tokenizer and the prompt code only: spawn's
    re-import of the server's main module would bring torch and the whole engine in."""
    text = "-" * (INLINE_PROMPT_CHARS + 1)  # ~140 tokens: a long prompt, a short prefill
    chat = greedy(client, [{"role": "user", "content": text}], max_tokens=1)
    completion = client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens > 100 and completion.usage.prompt_tokens > 100
    (child,) = [
        pid
        for pid in _children(live.process.pid)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert "libtorch" not in Path(f"/proc/{child}/maps").read_text()


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_first_chunk_arrives_while_generation_is_still_running(live, client):
    stream = greedy(client, max_tokens=48, stream=True, extra_body={"ignore_eos": True})
    arrivals = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if not arrivals:
                # 47 more tokens are still to come: the request must still be running.
                assert live.metric("num_requests_running") >= 1
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 24  # (tokens that decode to no text send no chunk)
    assert arrivals[-1] - arrivals[0] > 0.05  # spread out, not flushed at the end


def test_dropped_streams_free_their_kv_blocks(live):
    all_streaming = asyncio.Event()
    sampled = asyncio.Event()
    streaming = 0

    async def open_and_drop(client: openai.AsyncOpenAI, i: int) -> None:
        nonlocal streaming
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {1000 + i}."}],
            max_tokens=2000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        received = 0
        async for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 2:
                break
        streaming += 1
        if streaming == 20:
            all_streaming.set()
        await sampled.wait()  # hold the stream open until its blocks have been seen in use
        await stream.close()

    async def main() -> float:
        async with aclient(live) as client:
            streams = [asyncio.create_task(open_and_drop(client, i)) for i in range(20)]
            await asyncio.wait_for(all_streaming.wait(), timeout=120)
            usage = live.metric("kv_cache_usage_perc")
            sampled.set()
            await asyncio.gather(*streams)
            return usage

    assert asyncio.run(main()) > 0
    deadline = time.monotonic() + 10
    while live.metric("kv_cache_usage_perc") > 0 or live.metric("num_requests_running") > 0:
        assert time.monotonic() < deadline, "aborted requests still hold KV blocks"
        time.sleep(0.1)


def test_32_parallel_streams_complete_with_the_right_outputs(live):
    prompts = [f"Write one sentence about the number {i}." for i in range(32)]

    async def ask(client: openai.AsyncOpenAI, prompt: str, stream: bool) -> tuple[str, str]:
        kwargs = dict(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=8
        )
        if not stream:
            response = await client.chat.completions.create(**kwargs)
            return response.choices[0].message.content, response.choices[0].finish_reason
        text, reason = "", None
        async for chunk in await client.chat.completions.create(**kwargs, stream=True):
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main():
        async with aclient(live) as client:
            streamed = await asyncio.gather(*(ask(client, p, True) for p in prompts))
            reference = await asyncio.gather(*(ask(client, p, False) for p in prompts))
        return streamed, reference

    streamed, reference = asyncio.run(main())
    assert all(reason in ("stop", "length") for _, reason in streamed)
    assert streamed == reference
    assert len({text for text, _ in streamed}) > 16  # each stream got its own answer


def test_seeded_sampling_is_reproducible_under_concurrent_load(live):
    """The default mode (w8a8) is batch-invariant, so a seeded request samples the same
    tokens alone and among identical and unrelated concurrent requests."""
    body = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=1.0,
        max_tokens=16,
        seed=42,
    )

    async def main() -> tuple[str, list[str]]:
        async with aclient(live) as client:
            alone = (await client.chat.completions.create(**body)).choices[0].message.content
            noise = [
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Count to {i}."}],
                    max_tokens=24,
                    temperature=0.7,
                )
                for i in range(6)
            ]
            seeded = [client.chat.completions.create(**body) for _ in range(6)]
            replies = await asyncio.gather(*seeded, *noise)
        return alone, [r.choices[0].message.content for r in replies[:6]]

    alone, together = asyncio.run(main())
    assert together == [alone] * 6


# -- structured outputs --------------------------------------------------------------------

_VALIDITY = Path(__file__).resolve().parents[2] / "benchmarks" / "structured_validity.py"


def _validity_module():
    spec = importlib.util.spec_from_file_location("structured_validity", _VALIDITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def test_json_schema_answers_and_forced_tool_calls_are_all_valid(live):
    """A CI-sized run of benchmarks/structured_validity.py (docs/server.md has larger
    runs): every answer parses and validates, every forced call validates."""
    validity = _validity_module()
    report = asyncio.run(validity.run(f"{live.url}/v1", API_KEY, requests=6, concurrency=12))
    assert report.failures == []
    assert (report.json_valid, report.tools_valid) == (6, 6)


def test_forced_tool_call_streams_its_arguments_in_pieces(client):
    tools = _validity_module().TOOLS
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo, please."}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    fragments, reasons = [], []
    for chunk in stream:
        fragments += chunk.choices[0].delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
    assert fragments[0].function.name == "get_weather" and fragments[0].id
    pieces = [f.function.arguments for f in fragments[1:]]
    assert len(pieces) > 2  # sent as generated, not in one piece at the end
    arguments = json.loads("".join(pieces))
    assert set(arguments) == {"city", "unit"} and reasons[-1] == "tool_calls"


def test_a_forced_call_the_model_repeats_is_made_once(client):
    """Forced to call its one function with parallel calls on, the default model calls
    get_weather for Paris, then again: the chat completion had the call twice, and the
    Responses turn wrote it until max_output_tokens cut the response (incomplete). The
    repeat ends the turn: one call, a completed response."""
    weather = {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
    question = "What is the weather in Paris?"
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        tools=[{"type": "function", "function": weather}],
        tool_choice="required",
        temperature=0,
        max_tokens=64,
    )
    calls = [(c.function.name, c.function.arguments) for c in chat.choices[0].message.tool_calls]
    assert len(calls) == len(set(calls)) and chat.choices[0].finish_reason == "tool_calls"
    events = list(
        client.responses.create(
            model=MODEL,
            input=question,
            tools=[{"type": "function", **weather}],
            tool_choice="required",
            temperature=0,
            max_output_tokens=64,
            stream=True,
        )
    )
    final = events[-1].response
    assert final.status == "completed" and final.output
    calls = [(item.type, item.name, item.arguments) for item in final.output]
    assert len(calls) == len(set(calls))
    assert all(c[:2] == ("function_call", "get_weather") for c in calls)


def test_unsupported_schema_is_a_400_naming_the_keyword(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=8,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "not": {"required": ["a"]}},
                },
            },
        )
    assert "not" in err.value.body["message"] and err.value.body["param"] == "response_format"


def test_responses_conform_to_the_open_responses_spec(live):
    """The conformance checker (tests/server/responses_conformance.py) on the real model,
    whose tokenizer splits the deltas and whose tool-call parser and grammar make the
    call: a text answer, one cut by max_output_tokens, a forced function call and a
    background stream picked up with `starting_after` (json_schema and the rest on the
    scripted engine: tests/product/test_responses_api.py)."""
    url, headers = f"{live.url}/v1", {"Authorization": f"Bearer {API_KEY}"}
    base = {"model": MODEL, "temperature": 0}
    text = stream_response(url, {**base, "input": QUESTION[0]["content"]}, headers).final
    assert "Tokyo" in text["output"][0]["content"][0]["text"]
    story = {**base, "input": "Write a long story about a dragon.", "max_output_tokens": 4}
    cut = stream_response(url, story, headers).final
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["usage"]["output_tokens"] == 4
    city = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    }
    weather = {"type": "function", "name": "get_weather", "parameters": city}
    call = stream_response(
        url,
        {
            **base,
            "input": "What's the weather in Paris?",
            "tools": [{**weather, "description": "Weather in a city"}],
            "tool_choice": {"type": "function", "name": "get_weather"},
        },
        headers,
    ).final
    assert [item["type"] for item in call["output"]] == ["function_call"]
    assert isinstance(json.loads(call["output"][0]["arguments"])["city"], str)
    count = {**base, "input": "Count to three.", "max_output_tokens": 6}
    assert resume_background_stream(url, count, split=4, headers=headers).final["output"]


# Agent frameworks, unchanged, on the same server. Their outputs are bounded by the schema
# (maxLength) or the token limit, so that what the small model writes never decides
# whether a run ends: the Agents SDK fails a run whose response is `incomplete`.


@pytest.fixture(scope="module")
def agents():
    """The OpenAI Agents SDK, imported where it is used rather than at collection (seconds
    of every test worker), with tracing off: its exporter would post to api.openai.com."""
    import agents

    agents.set_tracing_disabled(True)
    return agents


class Word(pydantic.BaseModel):
    word: str = pydantic.Field(max_length=24)


def agents_model(agents, live: LiveServer, kind: str):
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)
    if kind == "responses":
        return agents.OpenAIResponsesModel(model=MODEL, openai_client=client)
    return agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client)


@pytest.mark.parametrize("kind", ["responses", "chat_completions"])
def test_the_agents_sdk_calls_a_function_tool(agents, live, kind):
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        calls.append(city)
        return f"Sunny in {city}."

    agent = agents.Agent(
        name="weather",
        instructions="Use the tool to answer questions about the weather.",
        model=agents_model(agents, live, kind),
        tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model_settings=agents.ModelSettings(
            temperature=0, max_tokens=64, tool_choice="required", parallel_tool_calls=False
        ),
    )
    result = agents.Runner.run_sync(agent, "What's the weather in Paris?", max_turns=2)
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert result.final_output == f"Sunny in {calls[0]}."
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds == ["ToolCallItem", "ToolCallOutputItem"]


def test_the_agents_sdk_streams_a_structured_output_into_a_conversation(agents, live, client):
    agent = agents.Agent(
        name="one-word",
        instructions="Answer with one word.",
        model=agents_model(agents, live, "responses"),
        output_type=Word,
        model_settings=agents.ModelSettings(temperature=0, max_tokens=64),
    )
    conversation = client.conversations.create()

    async def two_turns():
        run = agents.Runner.run_streamed(agent, "Name a color.", conversation_id=conversation.id)
        kinds = [event.type async for event in run.stream_events()]
        second = await agents.Runner.run(
            agent, "Name another one.", conversation_id=conversation.id
        )
        return run, kinds, second

    first, kinds, second = asyncio.run(two_turns())
    assert isinstance(first.final_output, Word) and first.final_output.word
    assert kinds.count("raw_response_event") > 3  # the response's own events, streamed
    assert isinstance(second.final_output, Word)
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [(item.type, item.role) for item in items] == [
        ("message", "user"),
        ("message", "assistant"),
    ] * 2
    assert json.loads(items[1].content[0].text) == first.final_output.model_dump()


@pytest.mark.parametrize("use_responses_api", [False, True])
def test_langchain_chat_openai_structured_output_tools_and_streaming(live, use_responses_api):
    import langchain_core.tools
    import langchain_openai

    llm = langchain_openai.ChatOpenAI(
        base_url=f"{live.url}/v1",
        api_key=API_KEY,
        model=MODEL,
        temperature=0,
        max_tokens=48,
        max_retries=0,
        use_responses_api=use_responses_api,
    )
    word = llm.with_structured_output(Word).invoke("Name a fruit.")
    assert isinstance(word, Word) and word.word

    @langchain_core.tools.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    message = llm.bind_tools([add], tool_choice="add").invoke("What is 2 plus 3?")
    (call,) = message.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())
    chunks = list(llm.stream("Count to three."))
    text = "".join(chunk.text for chunk in chunks)
    assert len(chunks) > 3 and text.strip()
