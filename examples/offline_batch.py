"""Offline batch generation with `LLM`: several chats in one call, run as one batch.

python examples/offline_batch.py
"""

from engine import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of Japan?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
]


def main() -> None:
    llm = LLM("smollm2-135m-instruct")  # or a .gguf file, or a Hugging Face folder
    # Greedy, and always a max_tokens: a small model does not always stop by itself.
    params = SamplingParams(temperature=0, max_tokens=24)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outputs = llm.chat(conversations, params)  # results come back in the input order
    for question, output in zip(QUESTIONS, outputs, strict=True):
        print(f"Q: {question}\nA: {output.outputs[0].text.strip()}\n")


if __name__ == "__main__":
    main()
