"""Calibration for w8a8: the statistics are the real per-channel input maxima, and the
engine's default CPU mode uses them."""

from __future__ import annotations

import torch
from torch import nn

from engine import LLM
from engine.calibration import calibration_token_ids, linear_input_absmax
from engine.config import ModelConfig
from engine.linear import CpuLinear
from engine.model import build_model


def _tiny_model(path: str):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    return build_model(cfg, weights, torch.device("cpu"), torch.float32)


def test_absmax_covers_every_linear_with_its_true_input_maximum(tiny_model_dir):
    model = _tiny_model(tiny_model_dir("llama"))
    ids = calibration_token_ids(None, model.config.vocab_size)
    seen: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(
                lambda _m, args, name=name: seen.setdefault(name, args[0].clone())
            )
    stats = linear_input_absmax(model, ids)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(stats) == linears
    for name in linears:
        assert stats[name].shape == (seen[name].shape[1],)
        torch.testing.assert_close(stats[name], seen[name].abs().amax(dim=0))
    assert all(layer.self_attn.k_cache.numel() == 0 for layer in model.layers)


def test_default_cpu_engine_is_calibrated_w8a8(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), device="cpu", compile="off")
    assert llm.engine.quantization == "w8a8"
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, CpuLinear)]
    assert layers and all(m.input_scale is not None for m in layers)
    assert llm.generate([1, 2, 3, 4], use_tqdm=False)[0].outputs[0].token_ids
