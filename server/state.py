"""What every handler needs: the engine, the settings, metrics, admission control, and the
preparation process and worker threads that keep heavy request preparation off the event
loop."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from engine.client import EngineClient
from orchestrator.chat_prompt import template_supports_tools
from orchestrator.context import PROMPT_CHARS_PER_TOKEN
from orchestrator.logprobs import TokenNames
from server.disconnect import unless_disconnected
from server.errors import APIError, shutting_down
from server.metrics import ServerMetrics
from server.prep_process import PrepProcess, PromptContext

T = TypeVar("T")

# Threads that turn a large body's parsed JSON into a request (the parsing itself, and
# rendering and tokenizing large prompts, run in the preparation process,
# server/prep_process.py). Few on purpose: admission bounds the requests queued for them.
WORKER_THREADS = 2
# Prompts up to this many characters are rendered and tokenized on the event loop (well
# under a millisecond); larger ones go to the preparation process, so small requests
# never queue behind large ones.
INLINE_PROMPT_CHARS = 8192
# The modules of the prompt functions `prepare` sends to the preparation process.
PREPARATION_MODULES = ("server.prompt_prep",)
# Names echoed back in errors are cut to this length.
MAX_ECHOED_CHARS = 64


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    # Requests in flight beyond the engine's batch wait in its queue; past
    # max_running_requests + max_waiting_requests the server answers 429.
    max_running_requests: int = 64
    max_waiting_requests: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    # Chat completions that name no max_tokens stop here; None: at the context window.
    max_tokens_default: int | None = None
    retry_after_s: int = 1
    # Characters of prompt text (messages, tools, prompts) one request may send;
    # None: PROMPT_CHARS_PER_TOKEN per token of the context window.
    max_prompt_chars: int | None = None
    # Origins a browser may call the API from (CORS); none by default.
    allowed_origins: list[str] = field(default_factory=list)
    # The largest file `POST /v1/files` accepts (larger: 413).
    max_upload_bytes: int = 512 * 1024 * 1024
    # Sequences one user (an account; not the local user) may have in the engine at once;
    # more wait in the server's queue, so one user's flood cannot crowd out the others.
    # None: no cap.
    max_sequences_per_user: int | None = None

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if self.max_running_requests < 1 or self.max_waiting_requests < 0:
            raise ValueError("max_running_requests must be >= 1, max_waiting_requests >= 0")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1")
        if self.max_sequences_per_user is not None and self.max_sequences_per_user < 1:
            raise ValueError("max_sequences_per_user must be >= 1")


class Admission:
    """A bounded count of sequences in flight, per-user fair share, and the draining
    switch for shutdown.

    It counts sequences, the engine's unit of work, not requests: a completions batch of
    P prompts with n choices each is P x n sequences, so neither a batch nor a large `n`
    slips past the bound. Counting here, at the door, rather than reading the engine's
    queue length keeps the bound exact under a burst: requests admitted in the same
    instant have not reached the engine yet, so its queue would not show them.

    Fair share: a user (`owner` given) may have at most `per_user` sequences in the
    engine; their further requests wait here, first come first served, and go on as the
    user's own requests end. Waiting requests count against the capacity like running
    ones, so a flood still meets the 429 at the same bound. The engine never learns of
    users: it just never sees more than `per_user` sequences of one.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.capacity = config.max_running_requests + config.max_waiting_requests
        self.retry_after_s = config.retry_after_s
        self.per_user = config.max_sequences_per_user
        self.active = 0
        self.draining = False
        self.running: dict[str, int] = {}
        self.waiting: dict[str, deque[Ticket]] = {}

    def enter(
        self,
        sequences: int = 1,
        param: str = "n",
        owner: str | None = None,
        bounded: bool = False,
    ) -> Ticket:
        """Take a place at once for a request of `sequences` sequences of `owner` (None:
        no fair-share cap): the ticket is admitted, or `queued` behind the owner's share
        until `Ticket.wait` says it is admitted. A request takes its place as it arrives
        (the bound holds the preparation of the requests in flight too) and waits for it
        only once its own checks have passed, so a client's mistake is answered at once
        however long the queue. `param` is the field to blame when the request alone is
        larger than the server could ever hold. `bounded`: the request waits nowhere but
        in the queue (a background response), so it is a 429 when the owner already has
        `per_user` sequences queued: one user cannot fill the server's queue with work no
        connection holds."""
        if self.draining:
            raise shutting_down()
        if sequences > self.capacity:
            raise APIError(
                400,
                f"this request asks for {sequences} sequences (prompts x n); the server "
                f"holds at most {self.capacity} at once",
                param=param,
                code="too_many_sequences",
            )
        if self.active + sequences > self.capacity:
            raise self._full(f"the server is at capacity ({self.capacity} sequences in flight)")
        owner = owner if self.per_user is not None else None
        fits = owner is None or self._fits(owner, sequences)
        if bounded and not fits:
            assert owner is not None and self.per_user is not None
            queued = sum(t.sequences for t in self.waiting.get(owner, ()))
            if queued + sequences > self.per_user:
                raise self._full(
                    f"you have {queued} sequences queued behind the {self.per_user} you may "
                    "run at once, and no more may wait"
                )
        self.active += sequences
        ticket = Ticket(self, sequences, owner)
        if fits and owner is not None:
            self.running[owner] = self.running.get(owner, 0) + sequences
        elif not fits:
            assert owner is not None
            ticket.granted = asyncio.get_running_loop().create_future()
            ticket.queued = True
            self.waiting.setdefault(owner, deque()).append(ticket)
        return ticket

    def _full(self, why: str) -> APIError:
        return APIError(
            429,
            f"{why}; retry later",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def _fits(self, owner: str, sequences: int) -> bool:
        """Within the share, or the owner has nothing running (a request larger than the
        share runs alone) and nobody of theirs queued first."""
        running = self.running.get(owner, 0)
        if self.waiting.get(owner):
            return False
        assert self.per_user is not None
        return running == 0 or running + sequences <= self.per_user

    def _release(self, ticket: Ticket) -> None:
        self.active -= ticket.sequences
        owner = ticket.owner
        if owner is None:
            return
        if ticket.queued:  # it never ran: it leaves the queue
            assert ticket.granted is not None
            self.waiting[owner].remove(ticket)
            ticket.queued = False
            ticket.granted.cancel()
        else:
            self.running[owner] -= ticket.sequences
        self._wake(owner)

    def _wake(self, owner: str) -> None:
        """Admit the owner's queued requests that now fit their share, in order."""
        running = self.running.get(owner, 0)
        queue = self.waiting.get(owner)
        while queue and (running == 0 or running + queue[0].sequences <= (self.per_user or 0)):
            ticket = queue.popleft()
            ticket.queued = False
            running += ticket.sequences
            assert ticket.granted is not None
            if not ticket.granted.done():  # done: its waiter gave up, and releases it
                ticket.granted.set_result(None)
        if running:
            self.running[owner] = running
        else:
            self.running.pop(owner, None)
        if queue is not None and not queue:
            del self.waiting[owner]


class Ticket:
    """One request's place; `release` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission, sequences: int, owner: str | None) -> None:
        self._admission: Admission | None = admission
        self.sequences = sequences
        self.owner = owner  # whose share it takes (None: no fair-share cap)
        # Set when it had to queue: done once admitted (cancelled if it left the queue).
        self.granted: asyncio.Future[None] | None = None
        self.queued = False  # in the owner's queue, not admitted yet

    async def wait(self) -> None:
        """Until admitted. A caller that gives up meanwhile leaves the queue (and gives
        its place back if admitted as it gave up)."""
        if self.granted is None:
            return
        try:
            await self.granted
        except BaseException:
            self.release()
            raise

    async def wait_while_connected(self, receive: Receive) -> None:
        """`wait`, given up if the client goes away meanwhile (ClientDisconnect, which
        leaves the queue): once admitted, a request whose client left would otherwise run
        for nobody and be charged its prompt, and hold the user's place until then, with
        the client's retry queued behind it."""
        if self.queued and await unless_disconnected(receive, self._admitted) is None:
            raise ClientDisconnect

    async def _admitted(self) -> bool:
        await self.wait()
        return True

    def release(self) -> None:
        if self._admission is not None:
            admission, self._admission = self._admission, None
            admission._release(self)


class ServerState:
    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(engine.stats)
        self.admission = Admission(config)
        max_prompt_chars = config.max_prompt_chars or (
            PROMPT_CHARS_PER_TOKEN * engine.max_model_len
        )
        self.prompt_context = PromptContext(
            engine.tokenizer,
            engine.max_model_len,
            engine.vocab_size,
            max_prompt_chars,
            template_supports_tools(engine.tokenizer.chat_template),
        )
        self.prep = PrepProcess(self.prompt_context, PREPARATION_MODULES)
        self.workers = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="tokenmill-parse")
        self.created = int(time.time())
        self.token_names = TokenNames.cached(engine.tokenizer)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread: for turning a large parsed body into a request,
        which would otherwise stall every stream while it runs."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, partial(fn, *args))

    async def parse_json(self, body: bytes | bytearray) -> Any:
        """A large body's JSON, parsed (and checked) in the preparation process."""
        return await self.prep.parse_json(body)

    async def prepare(self, prompt_chars: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(prompt_context, *args)`, a prompt's preparation: at once for a small
        prompt, else in the preparation process."""
        if prompt_chars <= INLINE_PROMPT_CHARS:
            return fn(self.prompt_context, *args)
        return await self.prep.run_with_context(fn, *args)

    def resolve_model(self, requested: str | None) -> str:
        """The model name to report back; unknown names are a 404 like OpenAI's."""
        names = self.config.served_model_names
        if requested is None:
            return names[0]
        if requested not in names:
            shown = (
                requested
                if len(requested) <= MAX_ECHOED_CHARS
                else (requested[:MAX_ECHOED_CHARS] + "...")
            )
            raise APIError(
                404,
                f"the model {shown!r} does not exist; this server serves "
                + ", ".join(repr(n) for n in names),
                param="model",
                code="model_not_found",
            )
        return requested
