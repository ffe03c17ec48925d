"""Fail fast on a configuration error instead of spending the restart budget.

A rank that exits the same way before its first step in two consecutive
attempts (an ImportError, a SyntaxError, a bad argument: the same exit code
and the same last lines of stderr, no step ever reported) will fail the same
way in every attempt: restarting cannot fix the command. The job stops after
the second such failure and says so.

Only ``exited`` failures count: a kill, a frozen or hung rank, or a rank that
reported a step may well succeed next time. A rank whose stderr is empty has
nothing to compare, so it never counts either.
"""

from __future__ import annotations

from typing import NamedTuple

from rankwarden.events import Failure, FailureCause

__all__ = ["TAIL_LINES", "EarlyFailure", "configuration_error", "early_failure", "may_be_early"]

#: Lines of stderr compared; enough for a traceback's last frame and its exception.
TAIL_LINES = 5


class EarlyFailure(NamedTuple):
    exit_code: int | None
    stderr_tail: tuple[str, ...]

    def describe(self) -> str:
        return self.stderr_tail[-1] if self.stderr_tail else f"exit code {self.exit_code}"


def may_be_early(failure: Failure, step: int | None) -> bool:
    """Whether ``failure`` can be an early one (so its stderr is worth reading)."""
    return failure.cause == FailureCause.EXITED and step is None


def early_failure(failure: Failure, step: int | None, stderr_tail: list[str]) -> EarlyFailure | None:
    """What identifies ``failure`` as a failure before the first step, or None if it is not one."""
    if not may_be_early(failure, step) or not stderr_tail:
        return None
    return EarlyFailure(failure.exit_code, tuple(stderr_tail[-TAIL_LINES:]))


def configuration_error(previous: dict[EarlyFailure, int], current: dict[EarlyFailure, int], attempt: int,
                        unused: int) -> str:
    """The job's failure message if a failure of this attempt (each mapped to its
    rank) repeats one of the previous attempt's, else "". In scope ``group``
    which rank fails first is a race, so the rank is not compared."""
    for failure, rank in current.items():
        if failure in previous:
            return (f"configuration error: rank {rank} failed the same way before its first step in attempts "
                    f"{attempt - 1} and {attempt} (exit code {failure.exit_code}: {failure.describe()}); restarting "
                    f"cannot fix that, so the job stops with {unused} restart(s) unused. Fix the command and run it "
                    "again")
    return ""
