"""Errors the engine raises to its callers."""


class EngineError(RuntimeError):
    """The engine itself failed (not the request): requests in flight are ended with it."""


class EngineShutdownError(EngineError):
    """The engine was shut down (the server stopping) before the request finished."""


class EngineStoppedError(EngineShutdownError):
    """The engine had shut down when the request was submitted (one admitted while the
    server drains, once its shutdown timeout has ended the others): none of it was
    computed, so none of it is charged."""


class ContextLengthExceededError(ValueError):
    """A prompt plus its requested output does not fit the model's context window."""


class RequestFailedError(EngineError):
    """One request failed inside the engine (a bug its input triggered, not a client
    mistake the checks could name): it alone is ended with this; the engine goes on."""


class NothingToSampleError(RequestFailedError):
    """A request's own constraints (allowed_token_ids, bad_words, a structured output)
    excluded every token at some step of its output, or its structure outgrew what the
    grammar engine can follow: the client's to fix, found only once generation reached it."""


class BatchFailedError(EngineError):
    """A step's batched work (forward pass or sampling) failed. It cannot be pinned on one
    request, so the requests in that batch are ended; the engine state is left as before
    the step, and the others go on."""

    def __init__(self, cause: Exception, request_ids: set[str]) -> None:
        super().__init__(f"engine step failed: {cause!r}")
        self.request_ids = request_ids
