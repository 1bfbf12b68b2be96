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

from orchestrator.sandbox import Sandbox, SandboxLimits, SandboxResult
from orchestrator.store.repository import output_bytes
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
        # The bytes the owner's storage quota leaves (None: no quota); None when nothing
        # of the run is kept (a `store: false` response)
        self.storage_room: Callable[[], Awaitable[int | None]] | None = None
        reason = self.sandbox.unavailable_reason()
        if reason is not None:
            raise ToolUnavailable(reason)

    def for_owner(
        self, owner: str, storage_room: Callable[[], Awaitable[int | None]] | None = None
    ) -> CodeInterpreter:
        """This tool for one owner's calls, on the same sandbox: its slots go to owners in
        turn; `storage_room` tells what their storage quota leaves for a run's images."""
        bound = copy.copy(self)
        bound.owner, bound.storage_room = owner, storage_room
        return bound

    async def execute(self, arguments: dict, call_id: str) -> ToolOutput:
        code = string_argument(arguments, "code", MAX_CODE_CHARS)
        result = await self.sandbox.run(code, label=call_id, owner=self.owner)
        text = logs(result, self.sandbox.limits)
        if result.files:  # in the logs, which are what the model reads of a run
            listing = ", ".join(f"{f.path} ({f.size} bytes)" for f in result.files)
            text = f"{text}\n[files written: {listing}]".lstrip("\n")
        images = _images(result)
        await self._check_storage(output_bytes(images), text)
        outputs = [{"type": "logs", "logs": text}, *images]
        return ToolOutput(text or "[no output]", outputs)

    async def _check_storage(self, size: int, text: str) -> None:
        """Fail the run (a ToolError the model and the client read, with the run's logs)
        when its images, `size` bytes as kept, do not fit the owner's storage quota."""
        if not size or self.storage_room is None:
            return
        room = await self.storage_room()
        if room is not None and size > room:
            raise ToolError(
                f"the run's images take {size} bytes, more than the {room} bytes left of "
                "your storage quota, so none of them is kept. Delete files, or responses "
                "that keep images, to make room, or write smaller images. What the run "
                f"printed:\n{text or '[no output]'}"
            )
