"""vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions, through the OpenAI
SDK against the app on a real engine (a tiny random model with the default model's
tokenizer): the choices are the offline `LLM.beam_search`'s beams, best first; width 1 is
greedy; a stream answers at the end, as vLLM's; what beam search cannot answer is a 400
naming it; and every token the search generated is metered and reported."""

from __future__ import annotations

import asyncio

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from engine import LLM, AsyncLLM, BeamSearchParams
from tests.product.test_accounts_api import _account, _rows

ENGINE = dict(device="cpu", compile="off", dtype="float32", quantization="none", num_threads=1)
MODEL = "tiny"
BEAM = {"use_beam_search": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def offline(tiny_chat_model_dir) -> LLM:
    return LLM(tiny_chat_model_dir, **ENGINE)


@pytest.fixture(scope="module")
def engine(tiny_chat_model_dir):
    engine = AsyncLLM(model=tiny_chat_model_dir, **ENGINE)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture
def server(product_server, engine):
    return product_server(engine, served_model_names=[MODEL])


def _client(server, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "unused", max_retries=0)


def _beams(offline: LLM, prompt: list[int], width: int, max_tokens: int, **options):
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, **options)
    [out] = offline.beam_search([prompt], params)
    return [s.tokens[len(prompt) :] for s in out.sequences]


def _text(offline: LLM, tokens: list[int]) -> str:
    return offline.tokenizer.decode(tokens, skip_special_tokens=True)


def test_completions_answer_the_offline_beam_search_and_meter_every_token(server, offline):
    """The `n` best beams, best first, as choices; usage (and the usage row) counts every
    token the search generated: one per live beam a step."""
    key = _account(server, "alice", token_quota=100_000, quota_period="month")
    completion = _client(server, key).completions.create(
        model=MODEL,
        prompt="The sky is",
        n=3,
        max_tokens=5,
        temperature=0,
        extra_body={**BEAM, "ignore_eos": True},
    )
    assert isinstance(completion, Completion)
    prompt = completion.choices[0].model_extra["prompt_token_ids"]
    beams = _beams(offline, prompt, 3, 5, ignore_eos=True)
    assert [c.model_extra["token_ids"] for c in completion.choices] == beams
    assert [c.text for c in completion.choices] == [_text(offline, b) for b in beams]
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.finish_reason for c in completion.choices} == {"length"}
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == 1 + 3 * 4  # the first step has one beam
    [row] = _rows(server, "user_alice", count=1)
    assert (row.input_tokens, row.output_tokens, row.status) == (len(prompt), 13, "completed")


def test_a_beam_one_wide_is_greedy(server):
    client = _client(server)
    options = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    greedy = client.completions.create(**options, extra_body={"ignore_eos": True})
    beam = client.completions.create(**options, extra_body={**BEAM, "ignore_eos": True})
    assert beam.choices[0].text == greedy.choices[0].text
    assert beam.usage.completion_tokens == greedy.usage.completion_tokens == 6


def test_chat_answers_the_offline_beam_search_streamed_or_not(server, offline):
    """Chat's choices are the beams of the rendered prompt; a stream carries the same
    choices, sent once the search has ended (as vLLM streams a beam search)."""
    client = _client(server)
    options = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        n=2,
        max_tokens=4,
        temperature=0,
    )
    chat = client.chat.completions.create(**options, extra_body=BEAM)
    assert isinstance(chat, ChatCompletion)
    beams = _beams(offline, chat.model_extra["prompt_token_ids"], 2, 4)
    assert [c.model_extra["token_ids"] for c in chat.choices] == beams
    assert [c.message.content for c in chat.choices] == [_text(offline, b) for b in beams]
    stream = client.chat.completions.create(
        **options, stream=True, stream_options={"include_usage": True}, extra_body=BEAM
    )
    contents = {0: "", 1: ""}
    reasons = {}
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            contents[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert list(contents.values()) == [c.message.content for c in chat.choices]
    assert reasons == {c.index: c.finish_reason for c in chat.choices}
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


@pytest.mark.parametrize(
    "route,extra,param",
    [
        ("completions", {"logprobs": 2}, "logprobs"),
        ("completions", {"stop": ["."]}, "stop"),
        ("completions", {"seed": 3}, "seed"),
        ("completions", {"top_p": 0.5}, "top_p"),
        ("completions", {"n": 11}, "n"),
        ("completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("completions", {"guided_regex": "a+"}, "guided_regex"),
        ("completions", {"length_penalty": 1e308}, "length_penalty"),
        ("chat", {"logprobs": True}, "logprobs"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"max_tokens": None}, "max_tokens"),
        ("chat", {"presence_penalty": 1.0}, "presence_penalty"),
    ],
)
def test_what_beam_search_cannot_answer_is_a_400_naming_it(server, route, extra, param):
    body = {"model": MODEL, "max_tokens": 3, "use_beam_search": True, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hi"
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.post(f"/{route.replace('chat', 'chat/completions')}", cast_to=object, body=body)
    assert caught.value.body["param"] == param
    assert "use_beam_search" in caught.value.body["message"] or param == "length_penalty"
