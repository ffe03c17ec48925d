"""The zygote: one pre-imported interpreter per job that forks warm ranks on demand.

``python -m rankwarden.worker._zygote FD`` is started by the process launcher
(on the coordinator's loop thread, like every rank) with the job's rank
environment less the variables that differ per rank and attempt. It sets
``PR_SET_PDEATHSIG``, imports torch, ``torch.distributed``, DDP and what DDP
imports lazily (``torch._dynamo``), says ``Ready`` on socket FD, and then only
answers ``Spawn`` and ``Reap`` (``rankwarden._warm_protocol``). It never runs
a torch operation, so it never starts a thread pool or initialises CUDA.

A ``Spawn`` forks. Before each fork the zygote checks that it is still
single-threaded and that CUDA is not initialised, and refuses otherwise (the
launcher then starts that rank fresh). The child returns out of the serve loop
and becomes what a fresh rank is after ``python -m rankwarden.worker._bootstrap``:

- its own session and process group (``setsid``), ``PR_SET_PDEATHSIG`` to its
  parent the zygote (whose own is to the coordinator: a chain), stdin
  /dev/null, stdout/stderr appended to the rank's log files;
- the rank's cwd and exact environment (``os.environ`` is replaced, which
  also sets the C environment);
- the signal handlers Python starts with (as recorded before any import);
- fresh global RNGs: Python's ``random`` reseeds itself in a forked child;
  NumPy's and torch's default generators are reseeded from the OS here;
- then the shared bootstrap path (``run_python``): heartbeat connection,
  ``sys.argv``, ``sys.path[0]``, the target run as ``__main__``, and the
  interpreter's own shutdown (atexit, non-daemon threads, exit status).

What a pre-imported interpreter cannot change: anything read during the
imports. Those read the zygote's environment, which equals the rank's except
for the per-rank variables (``RANK``, ``MASTER_PORT``, ...; none is read at
import), and the launcher forks a rank only when that holds. The hash seed of
``str`` (``PYTHONHASHSEED`` unset) is the zygote's, shared by its ranks.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import time

from rankwarden import _warm_protocol as wire
from rankwarden.worker._bootstrap import _set_parent_death_signal, run_python

#: Imported before the zygote says Ready: what every DDP script pays on its
#: first run (``DDP()`` imports torch._dynamo lazily). Optional ones may be missing.
PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "torch.optim")
OPTIONAL = ("numpy",)


def unsafe_to_fork() -> str:
    """Why this process must not fork a rank now ('' when it may)."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        threads = threading.active_count()
    if threads != 1:
        return (
            f"the zygote has {threads} threads (a library started one at import; with NumPy's OpenBLAS "
            "set OMP_NUM_THREADS or OPENBLAS_NUM_THREADS); a fork would copy locks held by them"
        )
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised in the zygote; a forked child cannot use it"
    return ""


class _Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = wire.FrameDecoder(wire.ToZygote)

    def send(self, message) -> None:
        self.sock.sendall(wire.encode(message))


def _serve(channel: _Channel) -> wire.Spawn | None:
    """Answer requests until the launcher hangs up (None); in a forked child, return its Spawn."""
    while True:
        data = channel.sock.recv(65536)
        if not data:
            return None
        for message in channel.decoder.feed(data):
            if isinstance(message, wire.Spawn):
                problem = unsafe_to_fork()
                if problem:
                    channel.send(wire.Refused(reason=problem))
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                # Answer only once the child has its own session, as Popen returns
                # only after the exec: a signal sent to its group at once must land.
                settled, announce = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(settled)
                    os.setsid()
                    os.close(announce)
                    return message
                os.close(announce)
                os.read(settled, 1)  # EOF once the child has called setsid (or died)
                os.close(settled)
                channel.send(wire.Spawned(pid=pid))
            elif isinstance(message, wire.Reap):
                # Only on request: until then the exited child pins its process
                # group id, which the launcher kills first (see LocalProcess).
                try:
                    _, status = os.waitpid(message.pid, 0)
                except ChildProcessError:
                    channel.send(wire.Refused(reason=f"pid {message.pid} is not a child of this zygote"))
                    continue
                channel.send(wire.Reaped(pid=message.pid, returncode=os.waitstatus_to_exitcode(status)))


def _become_rank(spawn: wire.Spawn, zygote_pid: int, handlers: dict, channel: _Channel) -> int:
    channel.sock.close()
    _set_parent_death_signal(expected_parent=zygote_pid)
    for fd, path in ((1, spawn.stdout_path), (2, spawn.stderr_path)):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(out, fd)
        os.close(out)
    os.chdir(spawn.cwd)
    os.environ.clear()
    os.environ.update(spawn.env)
    for signum, handler in handlers.items():
        if signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)
    _reseed()
    return run_python(spawn.mode, spawn.target, list(spawn.args))


def _reseed() -> None:
    # A forked child shares its parent's generator states; a new process would
    # seed each from the OS. Python's random reseeds itself (register_at_fork).
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.default_generator.seed()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        sys.stderr.write("usage: python -m rankwarden.worker._zygote FD\n")
        return 2
    handlers = {}
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if handler is not None:
            handlers[signum] = handler
    _set_parent_death_signal()
    channel = _Channel(socket.socket(fileno=int(argv[0])))
    started = time.perf_counter()
    modules = []
    try:
        for name in PRELOAD:
            importlib.import_module(name)
            modules.append(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means: no warm ranks
        channel.send(wire.Unavailable(reason=f"import {name} failed: {type(exc).__name__}: {exc}"))
        return 0
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
            modules.append(name)
        except ImportError:
            pass
    problem = unsafe_to_fork()
    if problem:
        sys.stderr.write(f"rankwarden zygote {os.getpid()}: cannot fork ranks: {problem}\n")
        channel.send(wire.Unavailable(reason=problem))
        return 0
    seconds = time.perf_counter() - started
    sys.stderr.write(f"rankwarden zygote {os.getpid()}: ready after {seconds:.2f}s ({', '.join(modules)})\n")
    channel.send(wire.Ready(version=wire.WARM_PROTOCOL_VERSION, pid=os.getpid(),
                            import_seconds=round(time.perf_counter() - started, 3), modules=modules))
    zygote_pid = os.getpid()
    spawn = _serve(channel)
    if spawn is None:
        return 0
    return _become_rank(spawn, zygote_pid, handlers, channel)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
