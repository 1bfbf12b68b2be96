"""Aggregate output tokens/s of the engine against transformers, in one run.

For each concurrency c, c different chat prompts each generate `--tokens` tokens
(greedy, ignore_eos) through:
  * tokenmill `LLM.generate` (continuous batching on the paged KV cache),
  * transformers `generate`, one prompt at a time (sequential baseline),
  * transformers `generate` on all c prompts in one left-padded batch.
Ratios are taken against the baselines measured in the same process.

    python benchmarks/bench_engine.py                    # default model, 1/8/32
    python benchmarks/bench_engine.py --concurrency 1 8 --tokens 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers

from engine import LLM, SamplingParams
from engine.loader import resolve_model

TOPICS = [
    "the water cycle",
    "volcanoes",
    "the Roman empire",
    "photosynthesis",
    "black holes",
    "the printing press",
    "honey bees",
    "the moon landing",
    "earthquakes",
    "coral reefs",
    "the internet",
    "electric cars",
    "the Silk Road",
    "glaciers",
    "vaccines",
    "jazz music",
]


def chats(n: int) -> list[list[dict]]:
    return [
        [
            {
                "role": "user",
                "content": f"Write a short essay about {TOPICS[i % len(TOPICS)]}"
                f" (part {i // len(TOPICS) + 1}).",
            }
        ]
        for i in range(n)
    ]


def time_tokenmill(llm: LLM, prompts: list[list[int]], tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
    return len(prompts) * tokens / dt


def time_hf_sequential(hf, prompts: list[list[int]], tokens: int) -> float:
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
        )
    return len(prompts) * tokens / (time.perf_counter() - t0)


def time_hf_batched(hf, prompts: list[list[int]], tokens: int, pad_id: int) -> float:
    """One left-padded batch through `generate`, on the model's device (synchronised, so a
    GPU's queued work is inside the timing)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    t0 = time.perf_counter()
    hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    if hf.device.type == "cuda":
        torch.cuda.synchronize(hf.device)
    return len(prompts) * tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="tokenmill dtype; auto is its CPU default")
    ap.add_argument(
        "--hf-sequential-prompts",
        type=int,
        default=2,
        help="prompts timed for the sequential baseline (its rate does not depend on c)",
    )
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype)
    llm.engine.wait_for_compile()
    tok = llm.tokenizer
    all_prompts = [tok.encode_chat(c) for c in chats(max(args.concurrency))]
    hf = None
    if not args.skip_hf:
        folder, name = os.path.split(resolve_model(args.model).path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        ).eval()
        seq_rate = time_hf_sequential(hf, all_prompts[: args.hf_sequential_prompts], args.tokens)

    print(
        f"\nmodel {args.model}, tokenmill dtype {args.dtype}, transformers float32, "
        f"{args.tokens} output tokens per request, torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'concurrency':>11} | {'tokenmill tok/s':>15} | {'HF sequential':>13} | "
        f"{'HF padded batch':>15} | {'vs seq':>6} | {'vs batch':>8}"
    )
    for c in args.concurrency:
        prompts = all_prompts[:c]
        ours = time_tokenmill(llm, prompts, args.tokens)
        if hf is None:
            print(f"{c:>11} | {ours:>15.1f} |")
            continue
        batched = time_hf_batched(hf, prompts, args.tokens, tok.eos_token_id or 0)
        print(
            f"{c:>11} | {ours:>15.1f} | {seq_rate:>13.1f} | {batched:>15.1f} | "
            f"{ours / seq_rate:>5.1f}x | {ours / batched:>7.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
