"""The whole engine on a GPU: output tok/s of `LLM.generate` against transformers' padded
batch, in one process, on a randomly initialised model of SmolLM2-135M's shape.

Random weights because a GPU machine may have no copy of the real checkpoint (and none is
ever downloaded); speed does not depend on the values. Prompts are random token ids of
`--prompt-len` tokens; every request generates exactly `--tokens` tokens (greedy, EOS
ignored), so both systems do the same work. Both run in bfloat16.

    python benchmarks/bench_gpu_engine.py                      # on CUDA
    python benchmarks/bench_gpu_engine.py --device cpu --layers 2 --concurrency 1 4 --tokens 8
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers
from bench_engine import time_hf_batched, time_tokenmill  # a sibling script

from engine import LLM

# SmolLM2-135M-Instruct's architecture (config.json of the released model).
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def random_model(path: str, layers: int) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, **SMOLLM2_135M)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    args = ap.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as path:
        random_model(path, args.layers)
        # Room for every request at once, as transformers' single batch has.
        llm = LLM(path, device=args.device, dtype="bfloat16", max_num_seqs=max(args.concurrency))
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
        hf = hf.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 49000, (max(args.concurrency), args.prompt_len), generator=gen)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, {args.layers} layers of SmolLM2-135M "
        f"(random weights), bfloat16, prompts of {args.prompt_len} tokens, "
        f"{args.tokens} output tokens each"
    )
    print("| concurrency | tokenmill tok/s | transformers padded batch tok/s | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for c in args.concurrency:
        batch = prompts[:c].tolist()
        ours = time_tokenmill(llm, batch, args.tokens)
        time_hf_batched(hf, batch[:1], 4, pad_id=0)  # warm-up (CUDA's first launches)
        theirs = time_hf_batched(hf, batch, args.tokens, pad_id=0)
        print(f"| {c} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
