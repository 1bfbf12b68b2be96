"""Load time of a GGUF model: tokenmill's loader vs transformers, same process, same file.

    python benchmarks/bench_load.py                      # the default SmolLM2-135M Q4_1
    python benchmarks/bench_load.py --model path.gguf --repeats 3 --dtype bfloat16

tokenmill's time includes building the tokenizer; transformers' is the model only
(`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`, which needs `accelerate`).
Runs alternate between the two so page-cache warmth and background load hit both alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from engine.loader import DEFAULT_MODEL, load_model, resolve_model


def _time_ours(model: str, dtype: torch.dtype) -> float:
    start = time.perf_counter()
    loaded = load_model(model, dtype=dtype)
    elapsed = time.perf_counter() - start
    del loaded
    gc.collect()
    return elapsed


def _time_transformers(path: Path, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    elapsed = time.perf_counter() - start
    del model
    gc.collect()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name or .gguf path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    resolved = resolve_model(args.model)
    if resolved.kind != "gguf":
        parser.error("this benchmark compares GGUF loading; pass a .gguf model")
    path = Path(resolved.path)
    print(
        f"model: {path} ({path.stat().st_size / 2**20:.0f} MiB), dtype {args.dtype}, "
        f"torch threads {torch.get_num_threads()}"
    )

    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(args.repeats):
        ours.append(_time_ours(args.model, dtype))
        if not args.skip_transformers:
            theirs.append(_time_transformers(path, dtype))

    def row(name: str, times: list[float]) -> str:
        return (
            f"{name:<14} min {min(times):7.2f} s   median {statistics.median(times):7.2f} s"
            f"   runs {', '.join(f'{t:.2f}' for t in times)}"
        )

    print(row("tokenmill", ours))
    if theirs:
        print(row("transformers", theirs))
        print(f"speed-up (median): {statistics.median(theirs) / statistics.median(ours):.1f}x")


if __name__ == "__main__":
    main()
