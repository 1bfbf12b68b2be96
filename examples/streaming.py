"""Streaming with `AsyncLLM`: print replies as the engine produces them, two at once.

    python examples/streaming.py

`AsyncLLM` steps the engine on a thread of its own; with `RequestOutputKind.DELTA` each
`generate` yields deltas (the text produced since the previous one; by default, as in
vLLM, it yields everything so far), and concurrent requests share every step.
"""

import asyncio

from engine import AsyncLLM, SamplingParams
from engine.sampling_params import RequestOutputKind

QUESTIONS = ["What is the capital of Japan?", "Write a haiku about the sea."]


async def ask(llm: AsyncLLM, request_id: str, question: str) -> str:
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": question}])
    params = SamplingParams(
        temperature=0.7, seed=0, max_tokens=24, output_kind=RequestOutputKind.DELTA
    )
    text = ""
    async for delta in llm.generate(prompt, params, request_id):
        piece = delta.outputs[0].text
        print(f"[{request_id}] {piece!r}", flush=True)
        text += piece
    return text


async def main() -> None:
    llm = AsyncLLM(model="smollm2-135m-instruct")
    try:
        replies = await asyncio.gather(*(ask(llm, str(i), q) for i, q in enumerate(QUESTIONS)))
    finally:
        await llm.shutdown()
    for question, reply in zip(QUESTIONS, replies, strict=True):
        print(f"\nQ: {question}\nA: {reply.strip()}")


if __name__ == "__main__":
    asyncio.run(main())
