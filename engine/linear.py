"""Linear layers for the CPU forward pass, and the load-time swap that installs them.

Measured on this project's 2-core AVX-512 machine (no AMX), with every layer's weights
cold in cache as they are in a real step (benchmarks/bench_linear.py, docs/performance.md):

* A decode step of a few sequences mostly streams weights from memory, so bytes per weight
  decide: the 30 layers of SmolLM2-135M take about 5 ms at one row in int4, 11 ms in int8
  and 20 ms in float32 (bfloat16 is no faster than float32 without AMX).
* Beyond 12 (int8) or 20 (int4) rows the matmul is compute-bound and MKL's float32 GEMM
  wins. It is also faster on a weight stored ``[in, out]`` than on PyTorch's
  ``[out, in]``, so the float32 weight is kept pre-transposed.

Quantized weights are rounded once at load time and the float32 copy holds exactly the
rounded values: whichever path a step's size picks, a token is computed with the same
weights.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels

# Steps with at most this many token rows take the quantized path: where it stops beating
# the float32 GEMM (benchmarks/bench_linear.py on the development machine).
QUANT_MAX_ROWS = {"int8": 12, "int4": 20}
QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= qweight * scale[:, None]``.

    The scale is rounded to bfloat16 before quantizing, because that is the precision the
    int8 kernel applies it in; an all-zero row gets scale 1 instead of a division by zero.
    """
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight, scale.to(torch.bfloat16)


def quantize_int4(
    weight: torch.Tensor, group_size: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group_size` inputs, like GGUF's Q4_1:
    ``weight ~= (q - 8) * scale + zero`` with ``q`` in [0, 15].

    Returns ``q`` as ``[out, in]`` uint8 and ``scales_zeros`` as ``[in / group, out, 2]``
    bfloat16 (the layout `kernels.int4_linear` reads). A Q4_1 group whose codes span 0..15
    comes back with its own scale, so re-quantizing a Q4_1 checkpoint loses almost nothing.
    """
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).to(torch.bfloat16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q.view(out_features, in_features).to(torch.uint8), scales_zeros.to(torch.bfloat16)


def _int4_fits(weight: torch.Tensor) -> bool:
    """ATen's CPU int4 layout needs whole groups and a multiple of 16 outputs."""
    out_features, in_features = weight.shape
    return out_features % 16 == 0 and in_features % INT4_GROUP == 0


class CpuLinear(nn.Module):
    """``y = x @ W.T + b`` with W stored ``[in, out]``, and optionally a quantized copy of W
    for steps of at most `QUANT_MAX_ROWS` rows.

    ``int4`` falls back to ``int8`` for a weight whose shape the int4 layout cannot hold.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, quantization: str = "none"
    ) -> None:
        super().__init__()
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        if quantization == "int4" and not _int4_fits(weight):
            quantization = "int8"
        self.quantization = quantization
        self.max_quantized_rows = QUANT_MAX_ROWS.get(quantization, 0)
        dtype = weight.dtype
        self.quantized: tuple[torch.Tensor, ...] = ()
        if quantization == "int8":
            qweight, scale = quantize_int8(weight)
            self.quantized = (qweight, scale)
            weight = qweight.float() * scale.float()[:, None]
        elif quantization == "int4":
            q, scales_zeros = quantize_int4(weight)
            self.quantized = (kernels.pack_int4(q), scales_zeros)
            weight = kernels.reference.dequantize_int4(q, scales_zeros, INT4_GROUP)
        # The dense copy holds the quantized values, so both paths use the same weights.
        self.weight_t = weight.to(dtype).t().contiguous()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.max_quantized_rows:
            if self.quantization == "int4":
                y = kernels.int4_linear(x, *self.quantized, INT4_GROUP)
            else:
                y = kernels.int8_linear(x, *self.quantized)
        else:
            y = torch.mm(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def use_cpu_linears(model: nn.Module, quantization: str) -> None:
    """Replace every `nn.Linear` of a 2-D-input model on CPU by a `CpuLinear` in place.

    The LM head is never taken below int8: logits are where 4-bit rounding shows most, and a
    tied head gets its own copy, so the embedding table keeps its exact values for lookups.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else child.bias.detach()
                mode = "int8" if quantization == "int4" and name == "lm_head" else quantization
                setattr(module, name, CpuLinear(child.weight.detach(), bias, mode))
