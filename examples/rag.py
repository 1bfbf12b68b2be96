"""Answers grounded in a document, with citations: upload, index, ask with file_search.

    python examples/rag.py                      # starts a server of its own (default model)
    python examples/rag.py --base-url http://127.0.0.1:8000/v1 [--api-key KEY]
                           [--file notes.md] [--question "how often should I feed it"]

The server searches the vector store (the model's query and the question itself), shows
the model the best chunks as numbered, untrusted sources, and the answer carries
`file_citation` annotations naming the files it used. Without --file it uploads a short
built-in guide.
"""

import argparse
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from openai import OpenAI

GUIDE = b"""# Caring for a sourdough starter

A starter is flour and water fermented by wild yeast and lactic acid bacteria.

## Feeding
Feed it once a day at room temperature: discard half, then add equal weights of flour
and water. A starter kept in the fridge needs feeding only once a week.

## Baking
Use the starter when it has doubled and smells pleasantly sour, four to eight hours
after a feeding.
"""


@contextmanager
def own_server() -> Iterator[str]:
    """`python -m engine.serve` on a free port with a scratch data directory; its URL."""
    with tempfile.TemporaryDirectory(prefix="tokenmill-rag-") as data_dir:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.serve",
                "--port",
                "0",
                "--data-dir",
                data_dir,
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                found = re.search(r"serving on (http://\S+)", line)
                if found:
                    yield f"{found.group(1)}/v1"
                    break
            else:
                raise SystemExit(f"the server did not start (exit {process.wait()})")
        finally:
            process.send_signal(signal.SIGTERM)  # it finishes what it serves, then exits
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def ask(client: OpenAI, document: tuple[str, bytes], question: str) -> None:
    store = client.vector_stores.create(name="rag example")
    indexed = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=document, poll_interval_ms=200
    )
    print(f"indexed: {document[0]} as {indexed.id} ({indexed.status})")
    try:
        if indexed.status != "completed":
            raise SystemExit(f"indexing failed: {indexed.last_error.message}")
        response = client.responses.create(
            model=client.models.list().data[0].id,
            input=question,
            tools=[{"type": "file_search", "vector_store_ids": [store.id], "max_num_results": 3}],
            tool_choice={"type": "file_search"},  # a small model needs the push to search
            include=["file_search_call.results"],
            temperature=0,
            max_output_tokens=120,  # for the whole response, the search call included
        )
        search = next(item for item in response.output if item.type == "file_search_call")
        print(f"searched: {search.queries}")
        for result in search.results or []:
            print(f"result: {result.score:.3f} {result.filename}")
        print(f"answer: {response.output_text.strip()}")
        cited = [
            a
            for item in response.output
            if item.type == "message"
            for part in item.content
            for a in part.annotations
        ]
        for citation in cited:
            print(f"citation: {citation.filename} ({citation.file_id}) at {citation.index}")
        if not cited:
            print("citation: none (the answer used no words of the document)")
    finally:
        client.vector_stores.delete(store.id)
        client.files.delete(indexed.id)


def main() -> None:
    parser = argparse.ArgumentParser(description="ask a question about a document")
    parser.add_argument("--base-url", help="a running server's /v1 URL (default: start one)")
    parser.add_argument("--api-key", default="unused", help="the key given to --api-key, if any")
    parser.add_argument("--file", type=Path, help="the document to upload")
    parser.add_argument(
        "--question", default="How often does a starter kept in the fridge need feeding?"
    )
    args = parser.parse_args()
    document = (args.file.name, args.file.read_bytes()) if args.file else ("starter.md", GUIDE)
    if args.base_url:
        with OpenAI(base_url=args.base_url, api_key=args.api_key) as client:
            ask(client, document, args.question)
        return
    with own_server() as url, OpenAI(base_url=url, api_key=args.api_key) as client:
        ask(client, document, args.question)


if __name__ == "__main__":
    main()
