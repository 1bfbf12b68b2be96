"""KV pool sizing (`num_kv_blocks`): the budgets on CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.model_runner import kv_bytes_per_block, num_kv_blocks

GIB = 1 << 30
CFG = ModelConfig(
    architecture="llama",
    vocab_size=1000,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
)


def test_cpu_pool_is_the_given_budget():
    per_block = kv_bytes_per_block(CFG, 16, torch.bfloat16)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert num_kv_blocks(CFG, 16, torch.bfloat16, torch.device("cpu"), 1.5, 0.9) == int(
        1.5 * GIB // per_block
    )


def test_cuda_budget_counts_memory_the_caching_allocator_holds_idle(monkeypatch):
    """A dropped engine's pool stays reserved by PyTorch's allocator, and the driver reports
    it as taken; the next engine in the process may use it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 100 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5 * GIB)
    per_block = kv_bytes_per_block(CFG, 16, torch.bfloat16)
    blocks = num_kv_blocks(CFG, 16, torch.bfloat16, torch.device("cuda"), None, 0.9)
    # free 10 + idle 55 GiB, less the 10% left to others and the 2 GiB activation reserve
    assert blocks == int(53 * GIB // per_block)


def test_no_room_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GIB, 100 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    with pytest.raises(MemoryError, match="no room for a KV cache"):
        num_kv_blocks(CFG, 16, torch.bfloat16, torch.device("cuda"), None, 0.9)
