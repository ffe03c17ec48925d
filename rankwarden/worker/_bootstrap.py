"""How every rank starts: ``python -m rankwarden.worker._bootstrap MODE TARGET [ARGS...]``.

1. ``PR_SET_PDEATHSIG``: if the coordinator dies, the kernel kills this rank.
2. For ``script`` and ``module``: open the heartbeat connection (a daemon
   thread), then run the target exactly as ``python script.py`` or
   ``python -m module`` would (same ``sys.argv``, ``sys.path[0]`` and
   ``__main__``), so an unmodified torchrun script runs unchanged and still
   gets frozen-process detection. An uncaught exception is printed as
   ``python script.py`` prints it: without this module's and runpy's frames.
   When it finishes, say goodbye with its exit status.
3. For ``exec``: replace this process with the command. The heartbeat socket
   would not survive ``exec``, so such a rank connects itself (through
   ``rankwarden.worker``), or runs unwatched if the job says hello is optional.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

USAGE = "usage: python -m rankwarden.worker._bootstrap {script|module|exec} TARGET [ARGS...]"


def _set_parent_death_signal(expected_parent: int | None = None) -> None:
    """SIGKILL this process when its parent (thread) ends; exit now if it already has.

    ``expected_parent``: the pid the parent must have (a fresh rank: the
    coordinator, from RANKWARDEN_COORDINATOR_PID; a warm rank: its zygote)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The coordinator may have died between fork and prctl: then nobody sends it.
    if expected_parent is None:
        expected = os.environ.get("RANKWARDEN_COORDINATOR_PID")
        expected_parent = int(expected) if expected and expected.isdigit() else None
    if expected_parent is not None and os.getppid() != expected_parent:
        sys.stderr.write("rankwarden: the parent of this rank exited before it started; exiting\n")
        os._exit(1)


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1  # sys.exit("message") prints the message and exits 1


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("script", "module", "exec"):
        sys.stderr.write(USAGE + "\n")
        return 2
    mode, target, args = argv[0], argv[1], argv[2:]
    _set_parent_death_signal()
    if mode == "exec":
        try:
            os.execvp(target, [target, *args])
        except OSError as exc:
            sys.stderr.write(f"rankwarden: cannot execute {target!r}: {exc.strerror or exc}\n")
            return 127

    return run_python(mode, target, args)


def run_python(mode: str, target: str, args: list[str]) -> int:
    """Connect, then run ``target`` as ``__main__``; a fresh rank and a warm one both end here."""
    import rankwarden.worker as worker
    from rankwarden.errors import ProtocolError

    try:
        worker.connect()
    except (OSError, ProtocolError) as exc:
        sys.stderr.write(f"rankwarden: cannot reach the coordinator: {exc}\n")
        return worker.EXIT_COORDINATOR_LOST

    code = 1
    try:
        if mode == "script":
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            # Absolute, as ``python script.py`` makes ``__main__.__file__`` (and tracebacks).
            runpy.run_path(os.path.abspath(target), run_name="__main__")
        else:
            sys.argv = [target, *args]
            sys.path[0] = os.getcwd()
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
        raise
    except Exception as exc:
        # What the interpreter does with an uncaught exception (print it with
        # sys.excepthook, exit 1), before the goodbye: the traceback is in the
        # rank's stderr before the coordinator hears of the failure.
        tb = _user_frames(exc.__traceback__)
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)  # the default hook prints __traceback__
        return 1
    finally:
        worker._goodbye(code)
    return 0


def _user_frames(tb):
    """``tb`` from the first frame that is neither this module nor runpy (None: all were)."""
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}
    while tb is not None and (tb.tb_frame.f_code.co_filename in ours
                              or os.path.abspath(tb.tb_frame.f_code.co_filename) in ours):
        tb = tb.tb_next
    return tb


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
