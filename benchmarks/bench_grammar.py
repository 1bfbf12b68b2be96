"""llguidance against xgrammar on the default model's tokenizer: schema compile time and
per-step token-mask time at batch 1 and 16.

    python benchmarks/bench_grammar.py [--model smollm2-135m-instruct] [--threads 2]

Each engine compiles the same JSON schemas from scratch (xgrammar's cache is off, and
llguidance builds a fresh matcher). Mask time is measured along a valid JSON document for
each schema: at every token the engine computes the mask, then consumes the token, and only
the mask computation is timed. At batch 16, sixteen matchers walk their documents together
and one call fills the masks for all of them, with each library's own parallel batch API.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCHEMAS: list[dict] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        },
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 7},
        },
        "required": ["city", "unit"],
    },
    {
        "type": "object",
        "properties": {
            "order_id": {"type": "string"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "quantity": {"type": "integer", "minimum": 1},
                        "price": {"type": "number", "minimum": 0},
                    },
                    "required": ["sku", "quantity", "price"],
                },
            },
            "gift": {"type": "boolean"},
        },
        "required": ["order_id", "items"],
    },
]

DOCUMENTS: list[dict] = [
    {"name": "Ada Lovelace", "age": 36, "email": "ada@math.org"},
    {"city": "Paris", "unit": "celsius", "days": [1, 2, 3, 4, 5]},
    {
        "order_id": "A-1042",
        "items": [
            {"sku": "pen-blue", "quantity": 3, "price": 1.25},
            {"sku": "notebook", "quantity": 1, "price": 4.5},
        ],
        "gift": False,
    },
]


@dataclass
class Figures:
    compile_ms: list[float]
    mask_ms_b1: list[float]
    mask_ms_b16: list[float]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def bench_llguidance(tokenizer, vocab: int, token_docs: list[list[int]], threads: int) -> Figures:
    import llguidance
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(
        tokenizer.backend.to_str(), n_vocab=vocab, eos_token=tokenizer.eos_token_id
    )
    print(f"  llguidance tokenizer build: {_ms(t0):.0f} ms")
    executor = llguidance.LLExecutor(num_threads=threads)

    def compile_one(schema: dict):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        matcher = llguidance.LLMatcher(lltok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    compile_ms = []
    for schema in SCHEMAS:
        t0 = time.perf_counter()
        compile_one(schema)
        compile_ms.append(_ms(t0))

    def walk(batch: int) -> list[float]:
        matchers = [compile_one(SCHEMAS[i % len(SCHEMAS)]) for i in range(batch)]
        docs = [token_docs[i % len(token_docs)] for i in range(batch)]
        mask = llt.allocate_token_bitmask(batch, vocab)
        times = []
        for step in range(max(len(d) for d in docs)):
            live = [(m, i) for i, m in enumerate(matchers) if step < len(docs[i])]
            t0 = time.perf_counter()
            if batch == 1:
                llt.fill_next_token_bitmask(live[0][0], mask, 0)
            else:
                llt.fill_next_token_bitmask_par(executor, live, mask)
            times.append(_ms(t0))
            for m, i in live:
                assert m.consume_token(docs[i][step]), m.get_error()
        return times

    return Figures(compile_ms, walk(1), walk(16))


def bench_xgrammar(tokenizer, vocab: int, token_docs: list[list[int]], threads: int) -> Figures:
    import transformers
    import xgrammar

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token
    )
    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    print(f"  xgrammar tokenizer build: {_ms(t0):.0f} ms")
    compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
    batch_matcher = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile_one(schema: dict):
        return compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    compile_ms = []
    for schema in SCHEMAS:
        t0 = time.perf_counter()
        compile_one(schema)
        compile_ms.append(_ms(t0))
    compiled = [compile_one(s) for s in SCHEMAS]

    def walk(batch: int) -> list[float]:
        matchers = [xgrammar.GrammarMatcher(compiled[i % len(SCHEMAS)]) for i in range(batch)]
        docs = [token_docs[i % len(token_docs)] for i in range(batch)]
        mask = xgrammar.allocate_token_bitmask(batch, vocab)
        times = []
        for step in range(max(len(d) for d in docs)):
            live = [i for i in range(batch) if step < len(docs[i])]
            t0 = time.perf_counter()
            if batch == 1:
                matchers[0].fill_next_token_bitmask(mask, 0)
            else:
                batch_matcher.batch_fill_next_token_bitmask([matchers[i] for i in live], mask, live)
            times.append(_ms(t0))
            for i in live:
                assert matchers[i].accept_token(docs[i][step])
        return times

    return Figures(compile_ms, walk(1), walk(16))


def _summary(name: str, f: Figures) -> str:
    def p(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]

    return (
        f"| {name} | {statistics.mean(f.compile_ms):.1f} ({max(f.compile_ms):.1f}) "
        f"| {statistics.mean(f.mask_ms_b1):.3f} ({p(f.mask_ms_b1, 99):.3f}) "
        f"| {statistics.mean(f.mask_ms_b16):.3f} ({p(f.mask_ms_b16, 99):.3f}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for batch mask filling and compilation"
    )
    args = parser.parse_args()
    from engine.loader import resolve_model
    from engine.loader.gguf import config_from_gguf, read_gguf
    from engine.tokenizer import Tokenizer

    resolved = resolve_model(args.model)
    gguf = read_gguf(resolved.path)
    tokenizer = Tokenizer.from_gguf(gguf.metadata)
    vocab = config_from_gguf(gguf).vocab_size
    token_docs = [tokenizer.encode(json.dumps(d, separators=(",", ":"))) for d in DOCUMENTS]
    torch.set_num_threads(1)
    runs: list[tuple[str, Callable]] = [
        ("llguidance", bench_llguidance),
        ("xgrammar", bench_xgrammar),
    ]
    print(
        f"vocabulary {vocab}; {len(SCHEMAS)} schemas; documents of "
        f"{[len(d) for d in token_docs]} tokens"
    )
    rows = []
    for name, run in runs:
        print(name)
        rows.append(_summary(name, run(tokenizer, vocab, token_docs, args.threads)))
    print(
        "| engine | compile ms mean (max) | mask ms/step b=1 mean (p99) "
        "| mask ms/step b=16 mean (p99) |"
    )
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
