"""Runs one scheduled batch through the model on the paged KV cache.

Owns the KV pool (one K and one V tensor per layer, `[num_blocks, block_size,
num_kv_heads, head_dim]`) and turns a `ScheduledBatch` into the flat tensors the
kernels read: token ids, positions, slot mapping, block tables, context lengths and
query start offsets. Only the last position of each sampling sequence goes through
the LM head.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.model import AttentionMetadata, CausalLM
from engine.sampler import Sampler, SamplingRow, TokenLogprobs, token_logprobs
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence, TokenSlice
from engine.structured_output import GrammarMasks

_GIB = 1 << 30
DEFAULT_CPU_KV_GIB = 2.0
# Prompt positions put through the LM head at once for prompt logprobs (float32 logits
# of 256 rows and a 49k vocabulary: 50 MB).
_PROMPT_LOGPROB_ROWS = 256
# Room left on the GPU for activations, the sampler and allocator slack.
_CUDA_ACTIVATION_RESERVE = 2 * _GIB


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def num_kv_blocks(
    cfg: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    cpu_gib: float | None,
    gpu_memory_utilization: float,
) -> int:
    """Size the pool from a memory budget: a fixed size on CPU, and on CUDA the
    given share of the device minus what is already taken (weights) and a reserve."""
    per_block = kv_bytes_per_block(cfg, block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Memory PyTorch's caching allocator holds but no tensor uses (the pool of an engine
        # this process has dropped, say) is free to us, though the driver counts it as taken.
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = free - total * (1 - gpu_memory_utilization) - _CUDA_ACTIVATION_RESERVE
    else:
        budget = (cpu_gib if cpu_gib is not None else DEFAULT_CPU_KV_GIB) * _GIB
    blocks = int(budget // per_block)
    if blocks < 1:
        raise MemoryError(
            f"no room for a KV cache: a block needs {per_block / 2**20:.1f} MiB; "
            "raise kv_cache_memory_gib / gpu_memory_utilization or use a smaller model"
        )
    return blocks


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_cache_dtype: torch.dtype,
        stop_token_ids: set[int],
        grammar_masks: GrammarMasks | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.grammar_masks = grammar_masks or GrammarMasks(cfg.vocab_size)
        self.device = device
        self.block_size = block_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.sampler = Sampler()
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # The kernels never read a slot before it is written, so the CPU pool is left
        # uninitialised: zero-filling 2 GiB would cost seconds of start-up. On CUDA the
        # memset is nearly free and keeps a stray read finite.
        alloc = torch.zeros if device.type == "cuda" else torch.empty
        self.k_caches = [alloc(shape, dtype=kv_cache_dtype, device=device) for _ in model.layers]
        self.v_caches = [alloc(shape, dtype=kv_cache_dtype, device=device) for _ in model.layers]
        for layer, k, v in zip(model.layers, self.k_caches, self.v_caches, strict=True):
            layer.self_attn.k_cache = k
            layer.self_attn.v_cache = v

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, block_tables: list[list[int]]
    ) -> tuple[list[Sequence], list[int], list[TokenLogprobs | None]]:
        """Compute the batch and sample. Returns the sequences that got a new token
        (forked siblings included), their tokens, and their logprobs."""
        self._copy_blocks(batch.block_copies)
        # One-token sequences go first, so a mixed step splits into decode and prefill parts.
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_query_tokens[i] != 1)
        input_ids, positions, meta, sample_rows = self._prepare(batch, block_tables, order)
        # Siblings forked this step sample from their parent's row, after the others.
        parents = [batch.seqs[i] for i in order if batch.samples(i)]
        sampling_seqs = parents + [child for _, child in batch.forks]
        # Grammar masks are computed on a worker thread while the forward pass runs.
        masks = self.grammar_masks.submit([s.grammar_matcher() for s in sampling_seqs])
        # One backend for the whole step, though the compile thread may install another.
        backend = self.model.backend
        hidden = self.model(input_ids, positions, meta, backend)
        self._prompt_logprobs(batch, order, hidden, backend)
        if not sampling_seqs:
            return [], [], []
        rows = torch.tensor(sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows], backend)
        row_of = {id(s): r for r, s in enumerate(parents)}
        for parent, _child in batch.forks:
            logits = torch.cat([logits, logits[row_of[id(parent)]].unsqueeze(0)])
        allowed = masks.result() or [None] * len(sampling_seqs)
        sampling_rows = [
            self._sampling_row(s, a) for s, a in zip(sampling_seqs, allowed, strict=True)
        ]
        tokens, logprobs = self.sampler(logits, sampling_rows)
        return sampling_seqs, tokens, logprobs

    def _prompt_logprobs(
        self, batch: ScheduledBatch, order: list[int], hidden: torch.Tensor, backend
    ) -> None:
        """Append to each asking request's `prompt_logprobs` what this step's chunk of its
        prompt gives: position p's logits score prompt token p + 1."""
        row = 0
        for i in order:
            seq, n = batch.seqs[i], batch.num_query_tokens[i]
            request = seq.request
            if request.needs_prompt_logprobs:
                done = request.prompt_logprobs
                start = seq.num_computed_tokens
                first = max(start, len(done) - 1)  # a recomputed chunk scores nothing twice
                last = min(start + n, seq.num_prompt_tokens - 1)
                k = request.params.prompt_logprobs
                for at in range(first, last, _PROMPT_LOGPROB_ROWS):
                    upto = min(at + _PROMPT_LOGPROB_ROWS, last)
                    logits = self.model.compute_logits(
                        hidden[row + at - start : row + upto - start], backend
                    )
                    targets = torch.tensor(seq.token_ids[at + 1 : upto + 1], device=self.device)
                    done += token_logprobs(logits, targets, [k] * (upto - at))
            row += n

    def _sampling_row(self, seq: Sequence, allowed: torch.Tensor | None) -> SamplingRow:
        # The sampler adds params.stop_token_ids itself and honours ignore_eos.
        return SamplingRow(
            params=seq.params,
            prompt_token_ids=TokenSlice(seq.token_ids, 0, seq.num_prompt_tokens),
            output_token_ids=TokenSlice(seq.token_ids, seq.num_prompt_tokens),
            generator=seq.generator,
            eos_token_ids=self.stop_token_ids,
            allowed=allowed,
            banned=seq.banned_tokens(),
        )

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache[dst] = cache[src]

    def _prepare(
        self, batch: ScheduledBatch, block_tables: list[list[int]], order: list[int] | None = None
    ):
        """Flat inputs and attention metadata for the batch's sequences in `order` (default:
        as scheduled); block_tables[i] belongs to batch.seqs[i]."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        query_start = [0]
        sample_rows: list[int] = []
        order = range(len(batch.seqs)) if order is None else order
        tables = [block_tables[i] for i in order]
        for i in order:
            seq, n = batch.seqs[i], batch.num_query_tokens[i]
            start = seq.num_computed_tokens
            end = start + n
            table = block_tables[i]
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            context_lens.append(end)
            query_start.append(query_start[-1] + n)
            if end == seq.num_tokens:
                sample_rows.append(query_start[-1] - 1)
        meta = self._metadata(slots, tables, context_lens, query_start)
        decodes = next(
            (j for j in range(len(tables)) if query_start[j + 1] - query_start[j] != 1), len(tables)
        )
        if 0 < decodes < len(tables):
            rest = query_start[decodes:]
            meta.parts = (
                self._metadata(
                    slots[:decodes],
                    tables[:decodes],
                    context_lens[:decodes],
                    query_start[: decodes + 1],
                ),
                self._metadata(
                    slots[decodes:],
                    tables[decodes:],
                    context_lens[decodes:],
                    [q - rest[0] for q in rest],
                ),
            )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return ids, pos, meta, sample_rows

    def _metadata(
        self,
        slots: list[int],
        tables: list[list[int]],
        context_lens: list[int],
        query_start: list[int],
    ) -> AttentionMetadata:
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            is_decode=query_start[-1] == len(tables),
        )
