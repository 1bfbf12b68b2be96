"""Lazily imported public names for a package's `__init__` (PEP 562's module `__getattr__`).

`engine`, `server` and `orchestrator` each name their public objects in one place but import
the module that holds one only when it is first used, so that a light module of theirs
(a config, the admin CLI, a preparation process) can be imported without torch or the whole
app.
"""

from collections.abc import Callable
from importlib import import_module


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """The `__getattr__` of `package`: each name of `exports` from its module, on first use."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
