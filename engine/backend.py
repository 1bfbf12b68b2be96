"""The backend: everything a forward pass consults to run the decoder, as one immutable object.

A model computes the same function on several sets of kernels (engine/model.py's eager blocks
on the `kernels` dispatchers, Inductor's compiled blocks, tokenmill's C++ kernels), and the
compile step (engine/compilation.py) finds the faster set while the engine may already be
serving. So that a step never mixes two sets, the choice is one `Backend`: `CausalLM.forward`
reads `model.backend` once and passes it down, and the compile step builds a whole new one
(weights it packs are new tensors, which the installed backend never reads) and installs it
with a single reference assignment. The modules themselves do not change once the engine
serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

import kernels

if TYPE_CHECKING:
    from engine.model import DenseBlocks

# A linear's int8 weight laid out for the C++ int8 GEMM: (packed, comp, scale), the operands of
# `kernels.int8_packed_linear` (`CpuLinear.pack_int8`).
Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class PackedLayer(NamedTuple):
    """One decoder layer's packed linears; None: that linear runs its own GEMM."""

    qkv: Packed | None = None
    o: Packed | None = None
    gate_up: Packed | None = None
    down: Packed | None = None


UNPACKED = PackedLayer()  # a layer whose linears all run their own GEMM


@dataclass(frozen=True)
class Backend:
    """How a forward runs: the dense blocks (prefill and mixed steps), the decode stack (all
    layers of a pure decode step in one call; None: such steps run the blocks too), the
    paged-cache kernels, and the packed weights that move linears onto the C++ int8 GEMM
    (bit for bit their own GEMM's result)."""

    blocks: DenseBlocks
    packed: tuple[PackedLayer, ...]  # one per layer
    lm_head: Packed | None = None
    decode_layers: Callable | None = None
    store_kv: Callable = kernels.store_kv
    decode_attention: Callable = kernels.paged_decode_attention
    prefill_attention: Callable = kernels.paged_prefill_attention

    @property
    def compiled(self) -> bool:
        """Whether the blocks are the compile step's (C++ or Inductor) rather than eager."""
        return self.blocks.compiled
