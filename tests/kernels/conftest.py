"""Device selection for the kernel tests, and the Triton interpreter on CPU.

``TOKENMILL_TEST_DEVICE`` (default ``cpu``) picks where tensors live. On CPU the Triton kernels run
through Triton's interpreter, which ``triton.jit`` selects when a kernel module is *imported*. So
we set ``TRITON_INTERPRET=1`` only while importing the kernel modules and then restore the
environment. An autouse fixture sets it again around each kernel test, because Triton also
consults it lazily at launch time. The kernel tests call the Triton implementations directly, and
the rest of the test session (the engine tests) keeps dispatching to the fast PyTorch references.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

DEVICE = os.environ.get("TOKENMILL_TEST_DEVICE", "cpu")
TRITON_MODULES = ("kernels.triton_ops", "kernels.triton_attention")


def _import_interpreted_kernels() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in TRITON_MODULES:
            module = sys.modules.get(name)
            if module is None:
                importlib.import_module(name)
            elif not module.INTERPRETED:
                importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


if DEVICE == "cpu":
    _import_interpreted_kernels()


@pytest.fixture
def device() -> torch.device:
    if DEVICE != "cpu" and not torch.cuda.is_available():
        pytest.fail(f"TOKENMILL_TEST_DEVICE={DEVICE} but CUDA is not available")
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
