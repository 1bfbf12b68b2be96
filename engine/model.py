"""Llama-family decoder (Llama, Qwen2, Qwen3) over the paged KV cache.

One implementation serves every device: all the heavy per-token work goes through
the `kernels` dispatchers, which pick Triton on CUDA and the PyTorch references on
CPU. Projections that read the same input are fused (q/k/v, gate/up) at load time
so a layer is four matmuls instead of seven.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from engine.config import ModelConfig


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
        # The paged-cache kernels; engine.compilation swaps in C++ ones where they apply.
        self.store_kv = kernels.store_kv
        self.decode_attention = kernels.paged_decode_attention
        self.prefill_attention = kernels.paged_prefill_attention

    def project(
        self, x: torch.Tensor, positions: torch.Tensor, rope_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads of q, k (both rotated) and v for normalised hidden states."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = kernels.apply_rotary(q, k, positions, rope_cache)
        return q, k, v

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Store the new K/V and attend: the part of a layer that touches the paged cache
        (see `DenseBlocks` for the rest). Returns the heads flattened, before `o_proj`."""
        self.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self._attend(q, meta).reshape(q.shape[0], self.q_size)

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.parts is not None:
            decodes, rest = meta.parts
            split = decodes.context_lens.shape[0]
            return torch.cat([self._attend(q[:split], decodes), self._attend(q[split:], rest)])
        if meta.is_decode:
            return self.decode_attention(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale
            )
        return self.prefill_attention(
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, positions, meta, rope_cache, blocks: DenseBlocks):
        q, k, v, residual = blocks.attention_input(self, x, residual, positions, rope_cache)
        attn = self.self_attn(q, k, v, meta)
        return blocks.attention_output_and_mlp(self, attn, residual)


def attention_input(
    layer: DecoderLayer,
    x: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    rope_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add the residual, normalise, project to heads, rotate. Returns (q, k, v, residual)."""
    x, residual = layer.input_layernorm(x, residual)
    return *layer.self_attn.project(x, positions, rope_cache), residual


def attention_output_and_mlp(
    layer: DecoderLayer, attn: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output projection, residual add and norm, then the MLP. Returns (out, new residual)."""
    x, residual = layer.post_attention_layernorm(layer.self_attn.o_proj(attn), residual)
    return layer.mlp(x), residual


@dataclass(frozen=True)
class DenseBlocks:
    """The two stretches of a decoder layer that never touch the paged cache, as swappable
    functions of (layer, activations, residual, ...): everything but attention itself.

    On CPU they are where eager mode's per-op overhead goes (quantize, GEMM, dequantize,
    norms, activation), so engine/compilation.py can replace them with compiled versions;
    the model reads them once per forward, so a step never mixes the two.
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
        self.dense_blocks = DenseBlocks()
        # All layers of a pure decode step as one compiled graph (engine/compilation.py);
        # None: every step runs `run_layers`.
        self.decode_layers: Callable | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # A zero residual lets the first layer take the same fused add-and-norm as the others
        # (x + 0 is exact), so one compiled block serves every layer.
        residual = torch.zeros_like(x)
        decode_layers = self.decode_layers
        if decode_layers is not None and meta.is_decode and meta.parts is None:
            x, residual = decode_layers(self, x, residual, positions, meta)
        else:
            x, residual = run_layers(self, x, residual, positions, meta, self.dense_blocks)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def run_layers(
    model: CausalLM,
    x: torch.Tensor,
    residual: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    blocks: DenseBlocks,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder stack: (hidden states, residual) after every layer."""
    for layer in model.layers:
        x, residual = layer(x, residual, positions, meta, model.rope_cache, blocks)
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
