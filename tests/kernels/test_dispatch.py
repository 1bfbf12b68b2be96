"""Routing of the public ``kernels.*`` functions between Triton and the references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import cpu_ops, reference, triton_attention, triton_ops

REPO_ROOT = Path(__file__).resolve().parents[2]


def _spy(monkeypatch, module, name: str, calls: list[str], tag: str) -> None:
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(tag)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _call_everything(device: torch.device) -> None:
    """One small call of every dispatching function."""
    x = torch.randn(3, 64, device=device)
    kernels.rms_norm(x, torch.ones(64, device=device), 1e-6)
    kernels.silu_and_mul(x)
    q, k = torch.randn(3, 4, 32, device=device), torch.randn(3, 2, 32, device=device)
    cache = kernels.build_rope_cache(32, 16, 10000.0, device=device)
    kernels.apply_rotary(q, k, torch.arange(3, device=device), cache)
    k_cache = torch.randn(2, 16, 2, 32, device=device)
    v_cache = torch.randn(2, 16, 2, 32, device=device)
    kernels.store_kv(k, k, k_cache, v_cache, torch.arange(3, device=device))
    table = torch.tensor([[1, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([20], dtype=torch.int32, device=device)
    kernels.paged_decode_attention(q[:1], k_cache, v_cache, table, lens, 0.1)
    starts = torch.tensor([0, 3], dtype=torch.int32, device=device)
    kernels.paged_prefill_attention(q, k_cache, v_cache, table, starts, lens, 0.1)


KERNEL_NAMES = {
    triton_ops: ["rms_norm", "silu_and_mul", "apply_rotary", "store_kv"],
    triton_attention: ["paged_decode_attention", "paged_prefill_attention"],
}


def _record_routes(monkeypatch) -> list[str]:
    calls: list[str] = []
    for module, names in KERNEL_NAMES.items():
        for name in names:
            _spy(monkeypatch, module, name, calls, "triton")
            _spy(monkeypatch, reference, name, calls, "reference")
            if hasattr(cpu_ops, name):
                _spy(monkeypatch, cpu_ops, name, calls, "cpu")
    return calls


def _without_triton(device: torch.device) -> list[str]:
    """The routes `_call_everything` takes when Triton is not used: the CPU versions where
    they exist, the reference otherwise."""
    if device.type != "cpu":
        return ["reference"] * 6
    # rms_norm, silu_and_mul, apply_rotary, store_kv, decode, prefill
    return ["cpu", "reference", "cpu", "cpu", "cpu", "cpu"]


@pytest.mark.parametrize("interpret", [False, True])
def test_routing_follows_device_and_interpret_flag(device, monkeypatch, interpret):
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = _record_routes(monkeypatch)
    _call_everything(device)
    if device.type == "cuda" or interpret:
        assert calls == ["triton"] * 6
    else:
        assert calls == _without_triton(device)


def test_without_triton_everything_uses_the_reference(device, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    calls = _record_routes(monkeypatch)
    _call_everything(device)
    assert calls == _without_triton(device)


def test_import_and_run_without_triton_installed():
    """``import kernels`` must not need triton (e.g. on macOS): block it and use the API."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels.triton_available()\n"
        "x = torch.randn(2, 8)\n"
        "out = kernels.rms_norm(x, torch.ones(8), 1e-6)\n"
        "assert torch.equal(out, kernels.reference.rms_norm(x, torch.ones(8), 1e-6))\n"
        "assert 'triton' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
