"""The openai SDK against tokenmill's server: a chat completion, a stream, and tools.

python -m engine.serve            # in another terminal
python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
"""

import argparse
import json

from openai import OpenAI

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


def get_weather(city: str) -> str:
    return f"18 degrees and sunny in {city}"


def chat(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of Japan?"}],
        temperature=0,
        max_tokens=24,  # always set one: a small model does not always stop by itself
    )
    choice = reply.choices[0]
    print(
        f"chat: {choice.message.content!r} ({choice.finish_reason}, "
        f"{reply.usage.completion_tokens} tokens)"
    )


def stream(client: OpenAI, model: str) -> None:
    chunks = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=24,
        stream=True,
    )
    print("stream: ", end="")
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


def tools(client: OpenAI, model: str) -> None:
    """The tool loop: offer the tool, run the calls the model makes, send the results
    back, and print the final answer. (A 135M model often answers without calling.)"""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=32
    )
    message = reply.choices[0].message
    if message.tool_calls:
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            city = json.loads(call.function.arguments).get("city", "")
            print(f"tool call: {call.function.name}(city={city!r})")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": get_weather(city)})
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=32
        )
        message = reply.choices[0].message
    print(f"answer: {message.content!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description="tokenmill's server through the openai SDK")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the key given to --api-key, if any")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    chat(client, model)
    stream(client, model)
    tools(client, model)


if __name__ == "__main__":
    main()
