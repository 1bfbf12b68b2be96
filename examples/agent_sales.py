"""A question the server answers with its built-in sql_query tool (the demo sales database,
or the one given to the server with --tool-database): the server runs the query between
two model turns, and the response holds the call, its result and the answer. The call is
decoded under an SQL grammar the server derives from the database (its tables, columns and
values), so even the default 135M model writes a query that runs and names real values;
the description lists periods latest first, so "last quarter" reads as the latest one.

    python -m engine.serve            # in another terminal
    python examples/agent_sales.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
"""

import argparse

from openai import OpenAI

QUESTION = "What were our East China sales last quarter?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    response = client.responses.create(
        model=model,
        input=QUESTION,
        # Declared by name only: a built-in the server runs (it fills in the schema).
        tools=[{"type": "function", "name": "sql_query"}],
        tool_choice={"type": "function", "name": "sql_query"},  # a small model needs the push
        parallel_tool_calls=False,  # one call, then the answer
        temperature=0,
        max_output_tokens=200,  # for the whole response, every model turn together
    )
    for item in response.output:
        if item.type == "function_call":
            print(f"call: {item.name} {item.arguments}")
        elif item.type == "function_call_output":
            print(f"result: {item.output!r}")
    print(f"answer: {response.output_text!r}")
    print(f"status: {response.status}")


if __name__ == "__main__":
    main()
