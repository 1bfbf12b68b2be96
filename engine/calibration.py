"""Activation statistics for the w8a8 mode, gathered from one prefill of a fixed text at load.

Rounding activations to int8 per row loses most where a few input channels are far larger
than the rest, as they are in LLMs' hidden states. SmoothQuant's remedy moves that range into
the weights: input channel j is divided by ``s_j`` and weight column j multiplied by it,
with ``s_j = sqrt(max|x_j| / max|W_j|)``; the product is unchanged, and both sides then
round well. The ``max|x_j|`` come from here.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model import AttentionMetadata, CausalLM

# Everyday prose, distinct from the text benchmarks/quality.py scores perplexity on.
CALIBRATION_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. On the "
    "ground floor there is a reading room with newspapers from many countries, a small "
    "cafe, and a desk where visitors can ask for help. Children's books are on the first "
    "floor, next to a room where stories are read aloud every Saturday. The second floor "
    "holds science, history and travel, and a row of computers that anyone may use for an "
    "hour. To borrow a book you need a card, which is free and takes five minutes to make. "
    "Books can be kept for three weeks and renewed twice online. def mean(values):\n"
    "    return sum(values) / len(values)\n"
    "Question: what is 17 times 23? Answer: 391. Der Zug nach Berlin faehrt um acht Uhr. "
    "Le musee est ferme le lundi. Please remember to return everything on time!"
)
_BLOCK = 16


@torch.inference_mode()
def linear_input_absmax(model: CausalLM, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` seen by every `nn.Linear` while the model prefills
    ``token_ids`` (and the LM head reads every position), keyed by module name.

    Runs on temporary KV caches, before the model runner binds its pool.
    """
    cfg = model.config
    device = model.embed_tokens.weight.device
    n = len(token_ids)
    blocks = -(-n // _BLOCK)
    shape = (blocks, _BLOCK, cfg.num_key_value_heads, cfg.head_dim)
    for layer in model.layers:
        layer.self_attn.k_cache = torch.zeros(shape, device=device)
        layer.self_attn.v_cache = torch.zeros(shape, device=device)
    stats: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module, args):
            seen = args[0].detach().abs().amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], seen) if name in stats else seen

        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
            context_lens=torch.tensor([n], dtype=torch.int32, device=device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
            is_decode=n == 1,
        )
        ids = torch.tensor(token_ids, device=device)
        model.compute_logits(model(ids, torch.arange(n, device=device), meta))
    finally:
        for handle in handles:
            handle.remove()
        for layer in model.layers:
            layer.self_attn.k_cache = torch.empty(0)
            layer.self_attn.v_cache = torch.empty(0)
    return stats


def calibration_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """The calibration text's tokens, or a fixed pseudo-random sequence for a model that
    ships without a tokenizer."""
    if tokenizer is not None:
        return tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=True)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (256,), generator=gen).tolist()
