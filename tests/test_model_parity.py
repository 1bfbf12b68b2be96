"""The engine's forward equals transformers' on tiny random models: logits of a
prefill and of several decode steps through the paged cache (run on CUDA too by
benchmarks/gpu_check.sh with TOKENMILL_TEST_DEVICE=cuda)."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine.config import ModelConfig
from engine.model import AttentionMetadata, build_model
from tests.conftest import TEST_DEVICE, TINY_ARCHS

BLOCK = 16
# fp32 on CPU is exact up to summation order; Triton's fp32 dot uses tf32 on GPUs.
ATOL = 1e-4 if TEST_DEVICE.type == "cpu" else 2e-2


def _engine_model(path: str):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    model = build_model(cfg, weights, TEST_DEVICE, torch.float32)
    shape = (64, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
    for layer in model.layers:
        layer.self_attn.k_cache = torch.zeros(shape, device=TEST_DEVICE)
        layer.self_attn.v_cache = torch.zeros(shape, device=TEST_DEVICE)
    return hf, model


def _meta(table: list[int], start: int, end: int) -> AttentionMetadata:
    dev = TEST_DEVICE
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        block_tables=torch.tensor([table], dtype=torch.int32, device=dev),
        context_lens=torch.tensor([end], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=dev),
        is_decode=end - start == 1,
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
@torch.inference_mode()
def test_prefill_and_decode_logits_match_transformers(tiny_model_dir, arch):
    hf, model = _engine_model(tiny_model_dir(arch))
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, hf.config.vocab_size, (37,), generator=gen)
    extra = torch.randint(0, hf.config.vocab_size, (5,), generator=gen)
    table = [9, 3, 41, 17]  # shuffled, non-contiguous blocks

    ids = torch.cat([prompt, extra])
    expected = hf(ids.unsqueeze(0)).logits[0]

    n = len(prompt)
    pos = torch.arange(n, device=TEST_DEVICE)
    hidden = model(prompt.to(TEST_DEVICE), pos, _meta(table, 0, n))
    got = model.compute_logits(hidden).float().cpu()
    torch.testing.assert_close(got, expected[:n], atol=ATOL, rtol=0)
    for i, tok in enumerate(extra.tolist()):
        p = n + i
        hidden = model(
            torch.tensor([tok], device=TEST_DEVICE),
            torch.tensor([p], device=TEST_DEVICE),
            _meta(table, p, p + 1),
        )
        got = model.compute_logits(hidden).float().cpu()[0]
        torch.testing.assert_close(got, expected[p], atol=ATOL, rtol=0)
