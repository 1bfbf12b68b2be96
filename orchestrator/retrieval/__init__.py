"""Knowledge retrieval: files -> text -> chunks -> embeddings -> index -> hybrid search.

See docs/retrieval.md. The store's repositories call `index.RetrievalIndex` inside their
transactions; ingestion (`ingest.prepare_chunks`) and embedding run off the event loop.
"""
