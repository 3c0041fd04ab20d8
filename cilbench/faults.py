"""Crash injection for the reliability tests: SIGKILL this process at a named point.

``CILBENCH_KILL_AT="train:5"`` kills the process at the 5th training batch it reads; the points are
``train`` (a training batch), ``test`` (an evaluation batch) and ``write:<file name>`` (half-way
through writing the bytes of an atomic write, e.g. ``write:state.pt``, so a torn temporary file is
left behind). Counts are per process. Unset (always, outside tests) the check is one dict lookup.
A real SIGKILL, not an exception: nothing in the process gets to clean up, as after a power cut.
"""
from __future__ import annotations

import os
import signal

ENV = "CILBENCH_KILL_AT"


def _plan() -> tuple[str, int] | None:
    raw = os.environ.get(ENV, "")
    if not raw:
        return None
    name, _, count = raw.rpartition(":")
    return name, int(count)


_PLAN = _plan()
_seen: dict[str, int] = {}


def point(name: str) -> None:
    if _PLAN is None or name != _PLAN[0]:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _PLAN[1]:
        os.kill(os.getpid(), signal.SIGKILL)
