"""Llama-family decoder (Llama, Qwen2, Qwen3) over the paged KV cache.

One implementation serves every device: all the heavy per-token work goes through
the `kernels` dispatchers, which pick Triton on CUDA and the PyTorch references on
CPU. Projections that read the same input are fused (q/k/v, gate/up) at load time
so a layer is four matmuls instead of seven.

How a forward runs (which blocks, attention kernels and GEMMs) is the model's `backend`
(engine/backend.py), read once per step and passed down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from engine.backend import UNPACKED, Backend, PackedLayer
from engine.config import ModelConfig
from engine.linear import apply_linear


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch reads and writes the paged cache.

    The model runner fills this once per step; every layer reuses it.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot each new token's K/V goes to
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32: tokens in cache after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    is_decode: bool  # every sequence has exactly one query token
    # A step that mixes decodes with prefill chunks, split into its leading one-token
    # sequences and the rest: decode rows then take the decode kernel whatever shares their
    # step, so a token's result does not depend on its batch-mates.
    parts: tuple[AttentionMetadata, AttentionMetadata] | None = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # Bound by the model runner once the KV pool is allocated.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def project(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope_cache: torch.Tensor,
        packed: PackedLayer = UNPACKED,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads of q, k (both rotated) and v for normalised hidden states."""
        n = x.shape[0]
        q, k, v = apply_linear(self.qkv_proj, x, packed.qkv).split(
            [self.q_size, self.kv_size, self.kv_size], dim=-1
        )
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = kernels.apply_rotary(q, k, positions, rope_cache)
        return q, k, v

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        backend: Backend,
    ) -> torch.Tensor:
        """Store the new K/V and attend, on the backend's kernels: the part of a layer that
        touches the paged cache (see `DenseBlocks` for the rest). Returns the heads
        flattened, before `o_proj`."""
        backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self._attend(q, meta, backend).reshape(q.shape[0], self.q_size)

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata, backend: Backend) -> torch.Tensor:
        if meta.parts is not None:
            decodes, rest = meta.parts
            split = decodes.context_lens.shape[0]
            return torch.cat(
                [self._attend(q[:split], decodes, backend), self._attend(q[split:], rest, backend)]
            )
        if meta.is_decode:
            return backend.decode_attention(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale
            )
        return backend.prefill_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            self.scale,
        )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, packed: PackedLayer = UNPACKED) -> torch.Tensor:
        act = kernels.silu_and_mul(apply_linear(self.gate_up_proj, x, packed.gate_up))
        return apply_linear(self.down_proj, act, packed.down)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, positions, meta, rope_cache, backend: Backend, packed):
        blocks = backend.blocks
        q, k, v, residual = blocks.attention_input(self, x, residual, positions, rope_cache, packed)
        attn = self.self_attn(q, k, v, meta, backend)
        return blocks.attention_output_and_mlp(self, attn, residual, packed)


def attention_input(
    layer: DecoderLayer,
    x: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    rope_cache: torch.Tensor,
    packed: PackedLayer,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the residual, normalise, project to heads, rotate. Returns (q, k, v, residual)."""
    x, residual = layer.input_layernorm(x, residual)
    return *layer.self_attn.project(x, positions, rope_cache, packed), residual


def attention_output_and_mlp(
    layer: DecoderLayer, attn: torch.Tensor, residual: torch.Tensor, packed: PackedLayer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output projection, residual add and norm, then the MLP. Returns (out, new residual)."""
    o = apply_linear(layer.self_attn.o_proj, attn, packed.o)
    x, residual = layer.post_attention_layernorm(o, residual)
    return layer.mlp(x, packed), residual


@dataclass(frozen=True)
class DenseBlocks:
    """The two stretches of a decoder layer that never touch the paged cache, as functions of
    (layer, activations, residual, ..., the layer's `PackedLayer`): everything but attention
    itself.

    On CPU they are where eager mode's per-op overhead goes (quantize, GEMM, dequantize,
    norms, activation), so engine/compilation.py builds a `Backend` with compiled or C++
    versions.
    """

    attention_input: Callable = attention_input
    attention_output_and_mlp: Callable = attention_output_and_mlp
    compiled: bool = False


class CausalLM(nn.Module):
    """Decoder stack plus LM head. `forward` returns hidden states of every token;
    `compute_logits` is applied only to the rows that are sampled, which saves a
    vocabulary-sized matmul per prompt token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # Passing the (meta) weight skips the random init, whose meta-device path
        # imports torch._dynamo: a second of start-up for nothing.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cache", torch.empty(0), persistent=False)
        # The eager backend; the compile step (engine/compilation.py) replaces it as a whole,
        # the only change to the model once it serves.
        self.backend = Backend(DenseBlocks(), packed=(UNPACKED,) * cfg.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        backend: Backend | None = None,
    ) -> torch.Tensor:
        """Hidden states of every token, on `backend` (default: the model's, read once here,
        so that a backend installed meanwhile takes effect from the next step)."""
        if backend is None:
            backend = self.backend
        x = self.embed_tokens(input_ids)
        # A zero residual lets the first layer take the same fused add-and-norm as the others
        # (x + 0 is exact), so one compiled block serves every layer.
        residual = torch.zeros_like(x)
        if backend.decode_layers is not None and meta.is_decode and meta.parts is None:
            x, residual = backend.decode_layers(self, x, residual, positions, meta)
        else:
            x, residual = run_layers(self, x, residual, positions, meta, backend)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        """Logits of the given hidden states, on `backend` (default: the model's) as the
        forward that produced them."""
        if backend is None:
            backend = self.backend
        return apply_linear(self.lm_head, hidden, backend.lm_head)


def run_layers(
    model: CausalLM,
    x: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder stack, layer by layer on `backend`: (hidden states, residual) after every
    layer."""
    for layer, packed in zip(model.layers, backend.packed, strict=True):
        x, residual = layer(x, residual, positions, meta, model.rope_cache, backend, packed)
    return x, residual


def _fused_state_dict(
    cfg: ModelConfig, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map Hugging Face parameter names onto this module's fused layout."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name.startswith("model."):
            name = name[len("model.") :]
        out[name] = tensor
    for i in range(cfg.num_hidden_layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{attn}{p}_proj.{kind}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"{attn}qkv_proj.{kind}"] = torch.cat(parts)
        out[f"{mlp}gate_up_proj.weight"] = torch.cat(
            [out.pop(f"{mlp}gate_proj.weight"), out.pop(f"{mlp}up_proj.weight")]
        )
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def build_model(
    cfg: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> CausalLM:
    """Instantiate on the meta device and adopt the loaded tensors, so no memory
    is spent on random initialisation that would be overwritten anyway.

    The projections are plain `nn.Linear`s; the engine swaps them for `CpuLinear`s on CPU
    (engine.linear), after calibrating if the quantization needs it."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    state = {
        k: v.to(device=device, dtype=dtype) for k, v in _fused_state_dict(cfg, weights).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the {cfg.architecture} layout: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.rope_cache = kernels.build_rope_cache(
        cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device=device
    )
    return model.eval()
