"""A module whose import records the CPU priority it ran at, for test_prep_process: a
preparation process imports its jobs' modules before it lowers its priority."""

from __future__ import annotations

import os

NICE_AT_IMPORT = os.getpriority(os.PRIO_PROCESS, 0)


def nice_at_import() -> int:
    return NICE_AT_IMPORT
