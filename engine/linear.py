"""Linear layers for the CPU forward pass, and the load-time swap that installs them.

Measured on a 2-core AVX-512 VNNI machine (no AMX), with every layer's weights cold in
cache as they are in a real step (benchmarks/bench_linear.py, docs/performance.md):

* A decode step of a few sequences mostly streams weights from memory, so bytes per weight
  decide: the 30 layers of SmolLM2-135M take about 5 ms at one row in int4, 11 ms in int8
  and 20 ms in float32 (bfloat16 is no faster than float32 without AMX).
* From about ten rows on the matmul is compute-bound, and an int8 x int8 GEMM on
  activations rounded per row is the fastest by far: 21 ms at 16 rows and 220 ms at 512
  with ATen's `_int_mm` (VNNI), less on tokenmill's own kernel, against 34 and 364 ms for
  MKL's float32 GEMM. The float32 GEMM is faster on a weight stored ``[in, out]`` than on
  PyTorch's ``[out, in]``, so that copy is kept pre-transposed.
* Without AVX-512 VNNI, `_int_mm` runs at a few GOP/s, slower than float32; tokenmill's
  AVX2 GEMM (`CpuLinear.pack_int8`) is 2-3x faster than float32 at 16 rows. engine/cpu_path.py
  picks the default mode per instruction set from such measurements.

Quantized weights are rounded once at load time, and both paths of a layer compute with
the same rounded weights; they differ only in how activations are rounded.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
import kernels.native
from engine.backend import Packed

# Row counts up to which the weight-only kernels (activations in bfloat16) beat the float32
# GEMM (benchmarks/bench_linear.py). w8a8 never takes them, to stay batch-invariant.
WEIGHT_ONLY_MAX_ROWS = {"int8": 12, "int4": 20}
QUANTIZATIONS = ("none", "int8", "w8a8", "int4")
INT4_GROUP = 32


def quantize_int8(weight: torch.Tensor, limit: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= qweight * scale[:, None]`` with codes in
    [-limit, limit], and the scale in bfloat16, the precision the weight-only kernel applies
    it in."""
    qweight, scale = kernels.reference.quantize_rows_int8(weight, torch.bfloat16, limit)
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
    """``y = x @ W.T + b`` on CPU, by one of two kernels chosen per step by its row count.

    * ``none``: float32 GEMM on W stored ``[in, out]``.
    * ``int8``: W in int8 per output channel. Up to 12 rows the weight-only kernel on
      bfloat16 activations (memory-bound: fewest bytes wins); beyond, a float32 GEMM on
      the dequantized weights.
    * ``w8a8``: the same int8 W, with activations rounded to int8 per row for an int8 x int8
      GEMM at every row count: compute-bound steps run several times faster than in
      float32, and since each row's rounding and integer sums are its own, a token's
      result does not depend on what else is in the batch. Given calibration statistics
      (``input_absmax``), outlier channels are first moved from the activations into the
      weights (SmoothQuant), which brings its perplexity cost from 2.7% to under 1% on
      SmolLM2-135M (docs/performance.md). The GEMM is ATen's ``_int_mm``, or tokenmill's C++
      kernel, with the same results, where the forward is given `pack_int8`'s weights.
    * ``int4``: W in 4 bits per group of 32 (as GGUF's Q4_1). Up to 20 rows the int4
      weight-only kernel; beyond, a float32 GEMM on the dequantized weights. Falls back to
      ``int8`` for a weight whose shape the int4 layout cannot hold.

    Both paths of a layer read the same rounded weights.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quantization: str = "none",
        input_absmax: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        if quantization == "int4" and not _int4_fits(weight):
            quantization = "int8"
        self.quantization = quantization
        self.max_weight_only_rows = WEIGHT_ONLY_MAX_ROWS.get(quantization, 0)
        self.bias = bias
        self.weight_t: torch.Tensor | None = None  # [in, out]; not kept for w8a8
        self.quantized: tuple[torch.Tensor, ...] = ()
        # w8a8 with calibration: inputs are divided by s (multiplied by this), weights' columns
        # multiplied by it; see engine/calibration.py.
        self.input_scale: torch.Tensor | None = None
        if quantization == "w8a8" and input_absmax is not None:
            smooth = smoothing_factors(input_absmax, weight)
            self.input_scale = (1 / smooth).to(weight.dtype)
            weight = weight * smooth.to(weight.dtype)
        if quantization == "w8a8":
            # codes the C++ GEMM multiplies exactly, scales in float32 as its kernels apply them
            limit = kernels.native.int8_weight_range(kernels.native.cpu_isa())[1]
            qweight, scale = quantize_int8(weight, limit)
            self.quantized = (qweight, scale.float())
            return
        if quantization == "int8":
            self.quantized = quantize_int8(weight)
            weight = kernels.reference.dequantize_int8(*self.quantized).to(weight.dtype)
        elif quantization == "int4":
            q, scales_zeros = quantize_int4(weight)
            self.quantized = (kernels.pack_int4(q), scales_zeros)
            weight = kernels.reference.dequantize_int4(q, scales_zeros, INT4_GROUP).to(weight.dtype)
        self.weight_t = weight.t().contiguous()

    def forward(self, x: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """``x @ W.T + b``; with ``packed`` (this layer's `pack_int8`), on the C++ int8 GEMM."""
        if self.input_scale is not None:
            x = x * self.input_scale
        return self.project(x, packed)

    def project(self, x: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
        """`forward` for an input the SmoothQuant input scale already multiplies (a C++ pass
        before it can apply the scale on the way, engine/native_layers.py)."""
        if packed is not None:
            y = kernels.int8_packed_linear(x, *packed)
        elif x.shape[0] <= self.max_weight_only_rows:
            if self.quantization == "int4":
                y = kernels.int4_linear(x, *self.quantized, INT4_GROUP)
            else:
                y = kernels.int8_linear(x, *self.quantized)
        elif self.quantization == "w8a8":
            y = kernels.int8_dynamic_linear(x, *self.quantized)
        else:
            y = torch.mm(x, self.weight_t)
        return y if self.bias is None else y + self.bias

    def pack_int8(self) -> Packed | None:
        """The w8a8 weight laid out for tokenmill's C++ int8 GEMM (`kernels.pack_int8_vnni`;
        the layout is named for VNNI's operand), as new tensors for a `Backend` to pass to
        `forward`: the layer itself does not change, so a forward on another thread keeps
        running on its own weights meanwhile. The C++ GEMM gives the same outputs bit for
        bit, about 1.5x faster than `_int_mm` at decode's row counts on AVX-512 VNNI and many
        times faster on AVX2 (it runs float32 activations only). The layer keeps its plain
        copy for the eager backend, so a compiled model holds its w8a8 weights twice. None
        where the layer cannot take it: not w8a8, or a shape the layout cannot hold."""
        if self.quantization != "w8a8":
            return None
        qweight, scale = self.quantized
        if not kernels.reference.int8_vnni_fits(qweight):
            return None
        return (*kernels.pack_int8_vnni(qweight), scale)


def apply_linear(module: nn.Module, x: torch.Tensor, packed: Packed | None) -> torch.Tensor:
    """``module(x)``, on the packed weights where a backend has them for it (a `CpuLinear`;
    other devices' plain `nn.Linear`s never have any)."""
    return module(x) if packed is None else module(x, packed)


def smoothing_factors(input_absmax: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s = sqrt(max|x| / max|W|)`` (migration strength
    0.5), clamped so that channels never seen active or all-zero columns stay finite."""
    x_max = input_absmax.float().clamp(min=1e-5)
    w_max = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    return (x_max / w_max).sqrt()


def use_cpu_linears(
    model: nn.Module, quantization: str, input_absmax: dict[str, torch.Tensor] | None = None
) -> None:
    """Replace every `nn.Linear` of a 2-D-input model on CPU by a `CpuLinear` in place.

    ``input_absmax`` (module name -> per-channel max |input|, from engine.calibration)
    enables w8a8's smoothing. The LM head is never taken below int8: logits are where 4-bit
    rounding shows most, and a tied head gets its own copy, so the embedding table keeps its
    exact values for lookups.
    """
    stats = input_absmax or {}
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else child.bias.detach()
                mode = "int8" if quantization == "int4" and name == "lm_head" else quantization
                absmax = stats.get(f"{prefix}.{name}" if prefix else name)
                setattr(module, name, CpuLinear(child.weight.detach(), bias, mode, absmax))
