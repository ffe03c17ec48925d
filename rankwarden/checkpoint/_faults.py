"""Named points in the commit protocol where tests can crash a writer.

Production code calls ``fault_point(name)`` at each step of the protocol; it
does nothing unless a hook is installed. The crash-consistency tests install
one that SIGKILLs the writer process exactly there.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["POINTS", "fault_point", "set_fault_hook"]

POINTS = (
    "mid_payload",  # half of a payload file written
    "after_payloads",  # every payload durable, no manifest yet
    "mid_manifest",  # half of the manifest written
    "before_rename",  # manifest durable inside the temp dir, not yet renamed
    "after_rename",  # step committed, LATEST not yet moved
    "mid_latest",  # half of the new LATEST written to its temp file
    "after_latest",  # everything done
)

_hook: Callable[[str], None] | None = None


def set_fault_hook(hook: Callable[[str], None] | None) -> None:
    global _hook
    _hook = hook


def fault_point(name: str) -> None:
    if _hook is not None:
        _hook(name)
