"""The synchronous engine core: requests in, one scheduled step at a time, outputs out.

`LLM` drives it in a loop for offline batches; `AsyncLLM` drives it from a
background thread for streaming. Both see the same `step()`.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import logging
import time
import weakref
from collections.abc import Iterable

import torch

from engine.args import EngineArgs
from engine.block_manager import BlockManager
from engine.calibration import calibration_token_ids, linear_input_absmax
from engine.compilation import BackgroundCompile, compile_model
from engine.cpu_path import cpu_path
from engine.errors import (
    BatchFailedError,
    ContextLengthExceededError,
    NothingToSampleError,
    RequestFailedError,
)
from engine.heap_tuning import keep_freed_memory
from engine.linear import use_cpu_linears
from engine.loader import load_model
from engine.model import build_model
from engine.model_runner import ModelRunner, num_kv_blocks
from engine.output_processor import OutputProcessor
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.sampler import NO_TOKEN, make_generator
from engine.sampling_params import SamplingParams, is_int
from engine.scheduler import Scheduler, max_tokens_for
from engine.sequence import Request, Sequence
from engine.structured_output import GrammarCompiler, GrammarMasks, accept_token
from engine.tokenizer import truncate_prompt

log = logging.getLogger("tokenmill")


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.device = args.resolve_device()
        self.dtype = args.resolve_dtype(self.device)
        self.configure_threads()
        if args.seed is None:
            torch.seed()
        else:
            torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        loaded = load_model(args.model, dtype=self.dtype)
        self.model_config = cfg = loaded.config
        self.max_model_len = args.resolve_max_model_len(cfg.max_position_embeddings)
        self.tokenizer = loaded.tokenizer
        # The CPU's kernel target and the defaults chosen for it, with the reason (/health).
        self.cpu_path = cpu_path() if self.device.type == "cpu" else None
        if self.cpu_path is not None:
            log.info(
                "CPU path: %s kernels%s; defaults quantization=%s compile=%s: %s",
                self.cpu_path.isa,
                f" (forced; the CPU runs {self.cpu_path.detected_isa})"
                if self.cpu_path.forced
                else "",
                self.cpu_path.quantization,
                self.cpu_path.compile,
                self.cpu_path.reason,
            )
            keep_freed_memory()
        self.quantization = args.resolve_quantization(self.device)
        self.kv_cache_dtype = args.resolve_kv_cache_dtype(self.device)
        model = build_model(cfg, loaded.weights, self.device, self.dtype)
        if self.device.type == "cpu":
            absmax = None
            if self.quantization == "w8a8":
                ids = calibration_token_ids(self.tokenizer, cfg.vocab_size)
                absmax = linear_input_absmax(model, ids)
            use_cpu_linears(model, self.quantization, absmax)
        elif self.quantization != "none":
            raise ValueError(f"quantization={self.quantization!r} is only implemented on CPU")
        del loaded
        self.compile_mode = args.resolve_compile(self.device)
        if self.compile_mode != "off" and self.device.type != "cpu":
            raise ValueError(f"compile={self.compile_mode!r} is only implemented on CPU")
        num_blocks = args.num_kv_blocks or num_kv_blocks(
            cfg,
            args.block_size,
            self.kv_cache_dtype,
            self.device,
            args.kv_cache_memory_gib,
            args.gpu_memory_utilization,
        )
        if num_blocks * args.block_size < self.max_model_len:
            # As vLLM refuses it: one sequence could outgrow the pool before its window ends,
            # and then wait for blocks that never come free.
            raise ValueError(
                f"the KV cache holds {num_blocks * args.block_size} tokens ({num_blocks} blocks "
                f"of {args.block_size}), fewer than the context window of {self.max_model_len}: "
                "lower max_model_len (--max-model-len) or give the cache more "
                "(--kv-cache-memory-gib, --num-kv-blocks)"
            )
        self.block_manager = BlockManager(
            num_blocks, args.block_size, enable_prefix_caching=args.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            args.max_num_seqs,
            args.max_num_batched_tokens,
            args.resolve_long_prefill_token_threshold(self.device),
        )
        stop_ids = set(self.tokenizer.stop_token_ids) if self.tokenizer else set(cfg.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, cfg.vocab_size, stop_ids)
        self.runner = ModelRunner(
            model,
            num_blocks,
            args.block_size,
            self.device,
            self.kv_cache_dtype,
            stop_ids,
            GrammarMasks(cfg.vocab_size),
        )
        self.outputs = OutputProcessor(self.tokenizer, stop_ids, self.max_model_len)
        # After the KV pool exists: the compile step picks attention kernels for its dtype.
        self.background_compile: BackgroundCompile | None = None
        if self.compile_mode == "on":
            compile_model(model)
        elif self.compile_mode == "background":
            self.background_compile = BackgroundCompile(model, torch.get_num_threads())
            atexit.register(_finish_compile, weakref.ref(self.background_compile))
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # Sequences ended, by finish reason ("stop", "length", "abort"), as vLLM counts them.
        self.finished_total: collections.Counter[str] = collections.Counter()
        log.info(
            "loaded %s (%s, %s%s%s on %s) in %.1fs; KV cache: %d blocks x %d = %d tokens (%s)",
            args.model,
            cfg.architecture,
            str(self.dtype).removeprefix("torch."),
            "" if self.quantization == "none" else f" + {self.quantization} weights",
            "" if self.compile_mode == "off" else f", compile {self.compile_mode}",
            self.device,
            time.perf_counter() - t0,
            num_blocks,
            args.block_size,
            num_blocks * args.block_size,
            str(self.kv_cache_dtype).removeprefix("torch."),
        )

    def configure_threads(self) -> None:
        """Apply `num_threads`. OpenMP keeps the setting per thread: the engine must be
        built on the thread that runs `step()` (AsyncLLM builds it in its own)."""
        if self.device.type == "cpu" and self.args.num_threads is not None:
            torch.set_num_threads(self.args.num_threads)

    # -- requests -------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not isinstance(prompt, list | tuple):
            raise ValueError(
                f"prompt must be text or a list of token ids, got {type(prompt).__name__}"
            )
        if not prompt:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        if any(not is_int(t) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return list(prompt)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> Request:
        """Validate and queue a request. Raises ValueError for a client's mistake."""
        request = self.make_request(request_id, prompt, params)
        self.enqueue(request)
        return request

    def make_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> Request:
        """Tokenize and validate without touching engine state, so `AsyncLLM` can do
        it on the caller's thread while a step is running."""
        token_ids = truncate_prompt(
            self.tokenize(prompt), params.truncate_prompt_tokens, self.max_model_len
        )
        self._check_fits(token_ids, params)
        params.check_vocabulary(self.model_config.vocab_size)
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise ValueError("stop strings and bad_words need a tokenizer; this model has none")
        request = Request(
            request_id, prompt if isinstance(prompt, str) else None, token_ids, params
        )
        request.bad_words_token_ids = self._bad_words_token_ids(params.bad_words or ())
        if params.structured_outputs is not None:
            request.grammar = self.grammars.compile(params.structured_outputs)
        seq = Sequence(
            request=request,
            index=0,
            token_ids=list(token_ids),
            num_prompt_tokens=len(token_ids),
            generator=make_generator(params.seed),
            pending_forks=params.n - 1,
        )
        request.seqs.append(seq)
        return request

    def _bad_words_token_ids(self, words: Iterable[str]) -> list[list[int]]:
        """Each word's token sequences as it starts a text and after a space: a tokenizer
        like SmolLM2's spells the two differently, and either may appear in an output."""
        found: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text)
                if ids and ids not in found:
                    found.append(ids)
        return found

    def enqueue(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.outputs.start(request.seqs[0])
        self.requests[request.request_id] = request
        self.scheduler.add(request.seqs[0])
        self.prompt_tokens_total += len(request.prompt_token_ids)

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        n, limit = len(token_ids), self.max_model_len
        # As in vLLM's engine, max_tokens past the window is not an error: the output ends
        # with "length" where the window does (OutputProcessor.append). The last token
        # sampled is never fed back, so it takes no position: a prompt that fills the window
        # still gets one token. The server refuses such requests itself, as OpenAI does.
        # The KV pool holds at least the window (checked at start-up), so whatever fits the
        # window fits the pool.
        if n > limit:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n}"
            )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request in any state and free its blocks now."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = seq.finish_reason or "abort"
                self.finished_total[seq.finish_reason] += 1
        return self._request_output(
            request, [s for s in request.seqs if s.finish_reason == "abort"]
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- stepping -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch. Returns a delta output for every request that changed.

        A request whose own processing fails (starting a forked sibling's detokenizer,
        appending a token) is ended alone: its output carries the error. A failure of the
        batched forward pass or sampling raises `BatchFailedError` naming the batch's
        requests, with nothing advanced, so the caller can end those and step on."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        _mark_scheduled(batch.seqs, time.time())
        failures: dict[str, Exception] = {}
        for _parent, child in batch.forks:
            self._guarded(failures, child.request, self.outputs.start, child)
        for child in batch.deferred:
            self._guarded(failures, child.request, self.outputs.start, child)
        tables = [self.block_manager.block_table(s.seq_id) for s in batch.seqs]
        try:
            seqs, tokens, logprobs = self.runner.run(batch, tables)
        except Exception as exc:
            self.scheduler.discard(batch)
            raise BatchFailedError(exc, {s.request.request_id for s in batch.seqs}) from exc
        self.scheduler.advance(batch)
        now = time.time()
        changed: dict[str, list[Sequence]] = {}
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            request = seq.request
            budget = max_tokens_for(request.params, seq.num_prompt_tokens, self.max_model_len)
            if request.params.max_tokens == 0:  # the prompt scored alone: drop the token
                seq.finish_reason = "length"
            elif self._guarded(failures, request, self._append_token, seq, token, lp, budget):
                self.generation_tokens_total += 1
                metrics = request.metrics
                metrics.first_token_time = metrics.first_token_time or now
                metrics.last_token_time = now
            else:
                continue
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                self.finished_total[seq.finish_reason] += 1
            changed.setdefault(request.request_id, []).append(seq)
        results = [self._fail_request(request_id, exc) for request_id, exc in failures.items()]
        for request_id, changed_seqs in changed.items():
            if request_id in failures:
                continue
            request = self.requests[request_id]
            results.append(self._request_output(request, changed_seqs))
            if request.finished:
                del self.requests[request_id]
        return results

    @staticmethod
    def _guarded(failures: dict[str, Exception], request: Request, work, *args) -> bool:
        """Run one request's share of a step; on failure record it against that request
        (and skip the request's later work this step). Returns whether it succeeded."""
        if request.request_id in failures:
            return False
        try:
            work(*args)
        except NothingToSampleError as exc:  # the client's constraints: no traceback
            log.info("request %s ended: %s", request.request_id, exc)
            failures[request.request_id] = exc
            return False
        except Exception as exc:
            log.exception("request %s failed in the engine", request.request_id)
            failures[request.request_id] = exc
            return False
        return True

    def _append_token(self, seq: Sequence, token: int, lp, budget: int) -> None:
        """Check the sampled token, advance the sequence's grammar (if any) by it, then
        record it. A token outside the vocabulary (sampled from NaN logits, say) would fail
        the next forward pass for the whole batch; it fails its own request here instead."""
        if token == NO_TOKEN:
            raise NothingToSampleError(
                f"no token was left to sample after {seq.num_output_tokens} output token(s): "
                "the request's constraints (allowed_token_ids, bad_words, a structured output, "
                "min_tokens holding back its end) exclude every token"
            )
        if not 0 <= token < self.model_config.vocab_size:
            raise ValueError(f"sampled token {token} is outside the vocabulary")
        complete = seq.grammar is not None and accept_token(seq.grammar, token)
        self.outputs.append(seq, token, lp, budget, grammar_complete=complete)

    def _fail_request(self, request_id: str, cause: Exception) -> RequestOutput:
        """End a request that failed in the engine, freeing its blocks; its final output
        carries the error."""
        out = self.abort_request(request_id)
        assert out is not None, "only requests in the engine fail in it"
        out.finished = True
        if isinstance(cause, RequestFailedError):  # already says how the request failed
            out.error = cause
        else:
            out.error = RequestFailedError(f"request {request_id} failed in the engine: {cause!r}")
        return out

    def _request_output(self, request: Request, seqs: list[Sequence]) -> RequestOutput:
        outputs = []
        for seq in seqs:
            text, token_ids, logprobs = self.outputs.take_delta(seq)
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=token_ids,
                    finish_reason=seq.finish_reason,
                    logprobs=logprobs if request.params.logprobs is not None else None,
                    stop_reason=seq.stop_reason,
                )
            )
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
            for entry in prompt_logprobs[1:] if request.params.detokenize else ():
                entry.decode = self.outputs.token_text
        finished = request.finished or all(s.finished for s in request.seqs)
        if finished and request.metrics.finished_time is None:
            request.metrics.finished_time = time.time()
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            num_cached_tokens=request.num_cached_tokens,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            metrics=dataclasses.replace(request.metrics),
        )

    def stats(self) -> EngineStats:
        cache = self.block_manager.prefix_cache
        return EngineStats(
            num_running=len({s.request.request_id for s in self.scheduler.running}),
            num_waiting=len({s.request.request_id for s in self.scheduler.waiting}),
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_queries=cache.num_query_tokens if cache else 0,
            prefix_cache_hits=cache.num_hit_tokens if cache else 0,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            finished_total=dict(self.finished_total),
            compile_state=self.compile_state,
            cpu=self.cpu_info,
        )

    def wait_for_compile(self, timeout: float | None = None) -> str:
        """Block until a background compile has finished (benchmarks measure the steady
        state); returns `compile_state`."""
        if self.background_compile is not None:
            self.background_compile.wait(timeout)
        return self.compile_state

    @functools.cached_property
    def cpu_info(self) -> dict[str, object]:
        """The CPU path and the modes in use (empty off CPU), for /health."""
        if self.cpu_path is None:
            return {}
        return {
            **self.cpu_path.as_dict(),
            "quantization_in_use": self.quantization,
            "compile_in_use": self.compile_mode,
        }

    @property
    def compile_state(self) -> str:
        if self.background_compile is not None:
            return self.background_compile.state
        return "ready" if self.compile_mode == "on" else "off"


def _mark_scheduled(seqs: list[Sequence], now: float) -> None:
    """Record when each request of a step first ran (vLLM's `first_scheduled_time`) and
    how long it waited before."""
    for seq in seqs:
        metrics = seq.request.metrics
        if metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = now
            metrics.time_in_queue = now - metrics.arrival_time


def _finish_compile(ref: weakref.ref[BackgroundCompile]) -> None:
    """At interpreter exit, let a background compile still running finish first: a thread
    that is in the C++ build or warm-up when the interpreter finalizes aborts the process
    ("terminate called without an active exception"), as a short `LLM` script would."""
    background_compile = ref()
    if background_compile is not None:
        background_compile.wait()
