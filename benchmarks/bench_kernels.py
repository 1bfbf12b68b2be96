"""Time every kernel against the device's own measured roofline.

    python benchmarks/bench_kernels.py              # full run on CUDA (~3 minutes on an H100)
    python benchmarks/bench_kernels.py --quick      # a few rows per kernel
    python benchmarks/bench_kernels.py --only decode prefill --sweep   # also try tile configs
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --quick      # CPU: tiny shapes

The run first measures the device's copy bandwidth (large device-to-device copy, bytes read +
written) and bf16 matmul rate, then prints, per row, the time and the achieved GB/s or TFLOP/s
as a percentage of those measurements. Attention is compared with the PyTorch reference, with
``scaled_dot_product_attention`` pinned to its flash backend, and with ``flash_attn`` when it is
installed. Each row runs in isolation: a failing provider prints ERROR and the rest go on. The
last lines (``TARGET ...``) are the two performance targets, in a form scripts can grep.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

import kernels
from kernels import reference

# (name, num_heads, num_kv_heads, head_dim)
MODELS = {
    "smollm2-135m": (9, 3, 64),
    "llama3-8b": (32, 8, 128),
}
BLOCK_SIZE = 16


@dataclass
class Roofline:
    bandwidth: float  # bytes / s
    flops: float  # matmul FLOP / s


@dataclass
class Row:
    kernel: str
    config: str
    shape: str
    provider: str
    ms: float
    bytes: float = 0.0
    flops: float = 0.0


class Bench:
    """Runs and reports rows; remembers failures so the exit code can reflect them."""

    def __init__(self, device: torch.device, dtype: torch.dtype, quick: bool):
        self.device, self.dtype, self.quick = device, dtype, quick
        self.rows: list[Row] = []
        self.errors = 0
        self.roof = Roofline(1.0, 1.0)
        self.use_triton = device.type == "cuda" or kernels.interpret_requested()
        self.max_kv_bytes = 5e9 if device.type == "cuda" else 1e7
        self.max_len = 1 << 20 if device.type == "cuda" else 256

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def run(self, kernel, config, shape, provider, fn, nbytes=0.0, flops=0.0) -> Row | None:
        try:
            ms = self.time_ms(fn)
        except Exception as exc:  # one broken provider must not hide the other measurements
            self.errors += 1
            print(f"{kernel:<10} {config:<13} {shape:<26} {provider:<10} ERROR {exc!r}"[:300])
            traceback.print_exc(limit=3, file=sys.stderr)
            return None
        row = Row(kernel, config, shape, provider, ms, nbytes, flops)
        self.rows.append(row)
        self.print_row(row)
        return row

    def print_row(self, row: Row) -> None:
        secs = row.ms / 1e3
        parts = [f"{row.kernel:<10} {row.config:<13} {row.shape:<26} {row.provider:<10}"]
        parts.append(f"{row.ms * 1e3:10.1f} us")
        if row.bytes:
            gbs = row.bytes / secs / 1e9
            parts.append(f"{gbs:8.0f} GB/s {100 * gbs * 1e9 / self.roof.bandwidth:5.1f}% bw")
        if row.flops:
            tfs = row.flops / secs / 1e12
            parts.append(f"{tfs:8.1f} TFLOP/s {100 * tfs * 1e12 / self.roof.flops:5.1f}% mm")
        print("  ".join(parts), flush=True)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, device=self.device, dtype=self.dtype)


def measure_roofline(bench: Bench) -> Roofline:
    """Copy bandwidth (read + write) and matmul throughput, measured on this device."""
    cuda = bench.device.type == "cuda"
    numel = (1 << 28) if cuda else (1 << 22)
    src = torch.randn(numel, device=bench.device).to(bench.dtype)
    dst = torch.empty_like(src)
    copy_ms = bench.time_ms(partial(dst.copy_, src))
    bandwidth = 2 * src.numel() * src.element_size() / (copy_ms / 1e3)
    n = 8192 if cuda else 512
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=bench.device, dtype=mm_dtype)
    b = torch.randn(n, n, device=bench.device, dtype=mm_dtype)
    mm_ms = bench.time_ms(partial(torch.matmul, a, b))
    flops = 2 * n**3 / (mm_ms / 1e3)
    print(
        f"roofline: copy {bandwidth / 1e9:.0f} GB/s, {mm_dtype} matmul {flops / 1e12:.1f} TFLOP/s"
    )
    return Roofline(bandwidth, flops)


def paged_kv(bench: Bench, context_lens: list[int], num_kv_heads: int, head_dim: int):
    """K/V caches holding the batch in shuffled blocks, and the matching block table."""
    blocks_per_seq = [math.ceil(n / BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(blocks_per_seq)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache, v_cache = bench.randn(*shape), bench.randn(*shape)
    order = torch.randperm(num_blocks, device=bench.device).to(torch.int32)
    table = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int32)
    table = table.to(bench.device)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = order[used : used + n]
        used += n
    lens = torch.tensor(context_lens, dtype=torch.int32, device=bench.device)
    return k_cache, v_cache, table, lens


def sdpa_flash(q, k, v, causal: bool):
    """SDPA restricted to the flash backend, GQA via ``enable_gqa`` (no K/V copies) where this
    torch build's flash kernel accepts it, else with K/V repeated up to the query heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(k=k, v=v, gqa=True):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    try:
        call()
        return call
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return partial(call, k=k, v=v, gqa=False)


def flash_attn_fn():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def attention_flops(num_heads, head_dim, query_len, context_len) -> float:
    """QK^T and PV FLOPs of causal attention where queries are the last tokens of the context."""
    prefix = context_len - query_len
    pairs = query_len * prefix + query_len * (query_len + 1) / 2
    return 4.0 * num_heads * head_dim * pairs


def bench_decode(bench: Bench, sweep: bool) -> None:
    batches = [1, 64] if bench.quick else [1, 16, 64, 256]
    contexts = [4096] if bench.quick else [512, 4096, 32768]
    if bench.device.type != "cuda":
        batches, contexts = [1, 4], [64, 256]
    el = torch.tensor([], dtype=bench.dtype).element_size()
    fa = flash_attn_fn()
    for model, (num_heads, num_kv_heads, head_dim) in MODELS.items():
        for batch in batches:
            for ctx in contexts:
                kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * el
                if kv_bytes > bench.max_kv_bytes:
                    continue
                nbytes = kv_bytes + 2 * batch * num_heads * head_dim * el
                flops = 4.0 * batch * num_heads * head_dim * ctx
                shape = f"b={batch} ctx={ctx}"
                k_cache, v_cache, table, lens = paged_kv(
                    bench, [ctx] * batch, num_kv_heads, head_dim
                )
                q = bench.randn(batch, num_heads, head_dim)
                scale = head_dim**-0.5
                args = (q, k_cache, v_cache, table, lens, scale)
                if bench.use_triton:
                    from kernels import triton_attention

                    bench.run(
                        "decode",
                        model,
                        shape,
                        "triton",
                        partial(triton_attention.paged_decode_attention, *args),
                        nbytes,
                        flops,
                    )
                    if sweep and batch == 64 and ctx == 4096:
                        sweep_decode(bench, model, shape, args, nbytes)
                if kv_bytes <= bench.max_kv_bytes / 4:
                    bench.run(
                        "decode",
                        model,
                        shape,
                        "reference",
                        partial(reference.paged_decode_attention, *args),
                        nbytes,
                        flops,
                    )
                if bench.device.type == "cuda":
                    kc = bench.randn(batch, num_kv_heads, ctx, head_dim)
                    vc = bench.randn(batch, num_kv_heads, ctx, head_dim)
                    bench.run(
                        "decode",
                        model,
                        shape,
                        "sdpa-flash",
                        sdpa_flash(q[:, :, None], kc, vc, False),
                        nbytes,
                        flops,
                    )
                    if fa is not None:
                        kf, vf = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
                        del kc, vc
                        bench.run(
                            "decode",
                            model,
                            shape,
                            "flash-attn",
                            partial(
                                fa.flash_attn_with_kvcache, q[:, None], kf, vf, cache_seqlens=lens
                            ),
                            nbytes,
                            flops,
                        )
                        del kf, vf
                    else:
                        del kc, vc
                del k_cache, v_cache


def sweep_decode(bench: Bench, model: str, shape: str, args, nbytes: float) -> None:
    from kernels import triton_attention as ta

    for block_n in (32, 64, 128, 256):
        for warps in (2, 4, 8):
            for stages in (2, 3):
                cfg = ta.TileConfig(16, block_n, warps, stages)
                bench.run(
                    "decode",
                    model,
                    shape,
                    f"n{block_n}w{warps}s{stages}",
                    partial(ta.paged_decode_attention, *args, config=cfg),
                    nbytes,
                )
    for splits in (1, 2, 4, 8, 16):
        bench.run(
            "decode",
            model,
            shape,
            f"splits={splits}",
            partial(ta.paged_decode_attention, *args, num_splits=splits),
            nbytes,
        )


def bench_prefill(bench: Bench, sweep: bool) -> None:
    # (num_seqs, query_len, context_len): fresh prefills, a batch, and a chunk after a prefix.
    cases = (
        [(1, 4096, 4096)]
        if bench.quick
        else [
            (1, 512, 512),
            (1, 2048, 2048),
            (1, 4096, 4096),
            (1, 8192, 8192),
            (4, 1024, 1024),
            (1, 512, 8192),
        ]
    )
    if bench.device.type != "cuda":
        cases = [(1, 64, 64), (2, 32, 128)]
    fa = flash_attn_fn()
    for model, (num_heads, num_kv_heads, head_dim) in MODELS.items():
        for num_seqs, q_len, ctx in cases:
            shape = f"seqs={num_seqs} q={q_len} ctx={ctx}"
            flops = num_seqs * attention_flops(num_heads, head_dim, q_len, ctx)
            k_cache, v_cache, table, lens = paged_kv(
                bench, [ctx] * num_seqs, num_kv_heads, head_dim
            )
            q = bench.randn(num_seqs * q_len, num_heads, head_dim)
            starts = torch.arange(0, num_seqs + 1, device=bench.device, dtype=torch.int32) * q_len
            args = (q, k_cache, v_cache, table, starts, lens, head_dim**-0.5)
            if bench.use_triton:
                from kernels import triton_attention

                bench.run(
                    "prefill",
                    model,
                    shape,
                    "triton",
                    partial(triton_attention.paged_prefill_attention, *args),
                    flops=flops,
                )
                if sweep and (model, q_len, ctx) == ("llama3-8b", 4096, 4096):
                    sweep_prefill(bench, model, shape, args, flops)
            if num_seqs * q_len <= 4096:
                bench.run(
                    "prefill",
                    model,
                    shape,
                    "reference",
                    partial(reference.paged_prefill_attention, *args),
                    flops=flops,
                )
            if bench.device.type == "cuda" and q_len == ctx:
                qd = q.view(num_seqs, q_len, num_heads, head_dim)
                kd = bench.randn(num_seqs, ctx, num_kv_heads, head_dim)
                vd = bench.randn(num_seqs, ctx, num_kv_heads, head_dim)
                bench.run(
                    "prefill",
                    model,
                    shape,
                    "sdpa-flash",
                    sdpa_flash(qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2), True),
                    flops=flops,
                )
                if fa is not None:
                    bench.run(
                        "prefill",
                        model,
                        shape,
                        "flash-attn",
                        partial(fa.flash_attn_func, qd, kd, vd, causal=True),
                        flops=flops,
                    )
            del k_cache, v_cache


def sweep_prefill(bench: Bench, model: str, shape: str, args, flops: float) -> None:
    from kernels import triton_attention as ta

    for block_m, block_n in ((64, 64), (128, 32), (128, 64), (128, 128)):
        for warps in (4, 8):
            for stages in (2, 3):
                cfg = ta.TileConfig(block_m, block_n, warps, stages)
                bench.run(
                    "prefill",
                    model,
                    shape,
                    f"m{block_m}n{block_n}w{warps}s{stages}",
                    partial(ta.paged_prefill_attention, *args, config=cfg),
                    flops=flops,
                )


def bench_pointwise(bench: Bench) -> None:
    """Memory-bound kernels; bytes are the tensors read plus the tensors written."""
    token_counts = [4096] if bench.quick else [1, 256, 4096, 16384]
    if bench.device.type != "cuda":
        token_counts = [1, 64]
    el = torch.tensor([], dtype=bench.dtype).element_size()
    # model -> (hidden, intermediate)
    widths = {"smollm2-135m": (576, 1536), "llama3-8b": (4096, 14336)}
    providers = [("reference", kernels.reference)]
    if bench.use_triton:
        from kernels import triton_ops

        providers.insert(0, ("triton", triton_ops))
    for model, (num_heads, num_kv_heads, head_dim) in MODELS.items():
        hidden, inter = widths[model]
        for tokens in token_counts:
            shape = f"tokens={tokens}"
            x, res, w = (
                bench.randn(tokens, hidden),
                bench.randn(tokens, hidden),
                bench.randn(hidden),
            )
            gate_up = bench.randn(tokens, 2 * inter)
            q, k = (
                bench.randn(tokens, num_heads, head_dim),
                bench.randn(tokens, num_kv_heads, head_dim),
            )
            v = bench.randn(tokens, num_kv_heads, head_dim)
            cache = reference.build_rope_cache(head_dim, 32768, 500000.0, device=bench.device)
            positions = torch.randint(0, 32768, (tokens,), device=bench.device)
            num_blocks = math.ceil(tokens / BLOCK_SIZE) + 1
            kc = bench.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
            vc = torch.empty_like(kc)
            slots = torch.randperm(num_blocks * BLOCK_SIZE, device=bench.device)[:tokens]
            qk_bytes = (q.numel() + k.numel()) * el
            for name, impl in providers:
                bench.run(
                    "rms_norm",
                    model,
                    shape,
                    name,
                    partial(impl.rms_norm, x, w, 1e-5, res),
                    4 * x.numel() * el,
                )
                bench.run(
                    "silu_mul",
                    model,
                    shape,
                    name,
                    partial(impl.silu_and_mul, gate_up),
                    1.5 * gate_up.numel() * el,
                )
                bench.run(
                    "rotary",
                    model,
                    shape,
                    name,
                    partial(impl.apply_rotary, q, k, positions, cache),
                    2 * qk_bytes + tokens * head_dim * 4,
                )
                bench.run(
                    "store_kv",
                    model,
                    shape,
                    name,
                    partial(impl.store_kv, k, v, kc, vc, slots),
                    4 * k.numel() * el,
                )


def best(bench: Bench, kernel: str, config: str, shape: str, providers: set[str]) -> Row | None:
    rows = [
        r
        for r in bench.rows
        if (r.kernel, r.config, r.shape) == (kernel, config, shape) and r.provider in providers
    ]
    return min(rows, key=lambda r: r.ms, default=None)


def print_targets(bench: Bench, sections: list[str]) -> None:
    """The acceptance targets of the sections that ran, as greppable lines (-1: not measured)."""
    decode = best(bench, "decode", "llama3-8b", "b=64 ctx=4096", {"triton"})
    pct_bw = -1.0
    if decode is not None:
        pct_bw = 100 * decode.bytes / (decode.ms / 1e3) / bench.roof.bandwidth
    shape = "seqs=1 q=4096 ctx=4096"
    prefill = best(bench, "prefill", "llama3-8b", shape, {"triton"})
    flash = best(bench, "prefill", "llama3-8b", shape, {"sdpa-flash"})
    pct_flash = -1.0
    if prefill is not None and flash is not None:
        pct_flash = 100 * flash.ms / prefill.ms
    if "decode" in sections:
        print(f"TARGET decode_llama3-8b_b64_ctx4096 pct_of_bandwidth={pct_bw:.1f} (goal >= 70)")
    if "prefill" in sections:
        print(f"TARGET prefill_llama3-8b_4096 pct_of_flash_sdpa={pct_flash:.1f} (goal >= 70)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rows per kernel")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["decode", "prefill", "pointwise"],
        default=["decode", "prefill", "pointwise"],
    )
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    bench = Bench(device, getattr(torch, dtype_name), args.quick)
    torch.manual_seed(0)
    if device.type == "cuda":
        import triton

        print(
            f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
            f"triton {triton.__version__}, dtype {dtype_name}"
        )
    bench.roof = measure_roofline(bench)
    sections = {
        "decode": lambda: bench_decode(bench, args.sweep),
        "prefill": lambda: bench_prefill(bench, args.sweep),
        "pointwise": lambda: bench_pointwise(bench),
    }
    for name in args.only:
        try:
            sections[name]()
        except Exception:  # e.g. out of memory while building inputs: keep the other sections
            bench.errors += 1
            print(f"{name}: ERROR while setting up", flush=True)
            traceback.print_exc(file=sys.stdout)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_targets(bench, args.only)
    print(f"rows={len(bench.rows)} errors={bench.errors}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
