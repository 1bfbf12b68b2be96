"""Errors the engine raises to its callers."""


class EngineError(RuntimeError):
    """The engine itself failed (not the request): requests in flight are ended with it."""


class ContextLengthExceededError(ValueError):
    """A prompt plus its requested output does not fit the model's context window."""
