"""`code_interpreter`: Python in the bubblewrap sandbox (orchestrator/sandbox.py).

The result has OpenAI's `code_interpreter_call` output shape: one `logs` output with
what the code printed (stdout, then stderr) and how it ended, and an `image` output (a
data URL) for each PNG, JPEG or GIF it wrote to its working directory. The model reads
the same logs plus the list of files written. A stored response keeps the images, which
count in the owner's storage quota: a run whose images do not fit what it leaves fails,
saying so, and keeps none.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Awaitable, Callable
from typing import ClassVar

from orchestrator.errors import StorageQuotaExceededError
from orchestrator.sandbox import Sandbox, SandboxLimits, SandboxResult
from orchestrator.store.storage_quota import output_bytes
from orchestrator.tools.base import ToolError, ToolOutput, ToolUnavailable, string_argument

MAX_CODE_CHARS = 100_000
_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
}


def _ending(result: SandboxResult, limits: SandboxLimits) -> str:
    if result.timed_out:
        return f"[stopped: the run took longer than {limits.wall_seconds:g} s]"
    if result.output_truncated:
        return f"[stopped: the output passed {limits.output_bytes} bytes]"
    if result.exit_code is not None and result.exit_code < 0:
        return f"[killed by signal {-result.exit_code} (CPU or memory limit?)]"
    if result.exit_code:
        return f"[exit status {result.exit_code}]"
    return ""


def logs(result: SandboxResult, limits: SandboxLimits) -> str:
    """stdout, stderr and how the run ended, as one text."""
    parts = [result.stdout, result.stderr, _ending(result, limits)]
    return "\n".join(p.rstrip("\n") for p in parts if p)


def _images(result: SandboxResult) -> list[dict]:
    images = []
    for f in result.files:
        kind = _IMAGE_TYPES.get(f.path[f.path.rfind(".") :].lower())
        if kind and f.content is not None:
            url = f"data:{kind};base64,{base64.b64encode(f.content).decode()}"
            images.append({"type": "image", "url": url})
    return images


class CodeInterpreter:
    name = "code_interpreter"
    description = (
        "Run Python 3 code in a fresh sandbox (no network; the system Python's "
        "packages) and get what it prints, then the value of a last bare expression, "
        "as in a notebook. Files written to the working directory are listed."
    )
    parameters: ClassVar[dict] = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
        "required": ["code"],
        "additionalProperties": False,
    }

    def __init__(self, sandbox: Sandbox | None = None) -> None:
        self.sandbox = sandbox or Sandbox()
        self.owner = ""  # whose turn a run waits for among the sandbox's slots
        # Holds the storage a run's images take (its call item's id, their bytes), or
        # raises StorageQuotaExceededError; None where nothing of a run is kept
        self.keep: Callable[[str, int], Awaitable[None]] | None = None
        reason = self.sandbox.unavailable_reason()
        if reason is not None:
            raise ToolUnavailable(reason)

    def for_owner(self, owner: str) -> CodeInterpreter:
        """This tool for one owner's calls, on the same sandbox: its slots go to owners in
        turn."""
        bound = copy.copy(self)
        bound.owner = owner
        return bound

    def keeping(self, keep: Callable[[str, int], Awaitable[None]]) -> CodeInterpreter:
        """This tool for a stored response, which keeps its runs' images: `keep` holds
        the storage they take (`knowledge.hold_storage`)."""
        bound = copy.copy(self)
        bound.keep = keep
        return bound

    async def execute(self, arguments: dict, call_id: str) -> ToolOutput:
        code = string_argument(arguments, "code", MAX_CODE_CHARS)
        result = await self.sandbox.run(code, label=call_id, owner=self.owner)
        text = logs(result, self.sandbox.limits)
        if result.files:  # in the logs, which are what the model reads of a run
            listing = ", ".join(f"{f.path} ({f.size} bytes)" for f in result.files)
            text = f"{text}\n[files written: {listing}]".lstrip("\n")
        images = _images(result)
        await self._keep(call_id, output_bytes(images), text)
        outputs = [{"type": "logs", "logs": text}, *images]
        return ToolOutput(text or "[no output]", outputs)

    async def _keep(self, call_id: str, size: int, text: str) -> None:
        """Hold the storage the run's images take, `size` bytes as kept; when they do not
        fit the owner's storage quota, fail the run (a ToolError the model and the client
        read, with what the run printed), keeping none of them."""
        if not size or self.keep is None:
            return
        try:
            await self.keep(call_id, size)
        except StorageQuotaExceededError as exc:
            printed = text or "[no output]"
            raise ToolError(f"{exc.message} What the run printed:\n{printed}") from None
