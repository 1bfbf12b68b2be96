"""Retrieval with the openai SDK: upload a document, index it in a vector store, search it.

    python -m engine.serve            # in another terminal
    python examples/rag_upload.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
                                  [--file notes.md] [--query "what does the starter need"]

Without --file it uploads a short built-in guide. Supported: text and code files, Markdown,
HTML and PDF.
"""

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description="upload, index and search a document")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="unused", help="the key given to --api-key, if any")
    parser.add_argument("--file", type=Path, help="the document to upload")
    parser.add_argument("--query", default="how often should I feed a starter in the fridge")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    document = (args.file.name, args.file.read_bytes()) if args.file else ("starter.md", GUIDE)
    store = client.vector_stores.create(name="rag example")
    # Uploads the file, adds it to the store, and polls until it is indexed.
    indexed = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=document, poll_interval_ms=200
    )
    print(f"indexed: {document[0]} as {indexed.id} ({indexed.status})")
    if indexed.status != "completed":
        raise SystemExit(f"indexing failed: {indexed.last_error.message}")

    results = client.vector_stores.search(store.id, query=args.query, max_num_results=3)
    for hit in results.data:
        text = " ".join(part.text for part in hit.content).replace("\n", " ")
        print(f"hit: {hit.score:.3f} {hit.filename}: {text[:200]}")

    client.vector_stores.delete(store.id)
    client.files.delete(indexed.id)


if __name__ == "__main__":
    main()
