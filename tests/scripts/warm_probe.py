"""Records what a rank sees of its process, then ends as told: for the warm-vs-fresh tests.

    warm_probe.py RECORD_PATH {exit CODE | raise | message | signal SIG}

Never seeds a random generator: the record shows what an unseeded script gets.
"""

import ctypes
import json
import os
import random
import signal
import subprocess
import sys

threads_at_start = len(os.listdir("/proc/self/task"))
preloaded = "torch" in sys.modules  # before this script imports it: the rank was warm

import numpy  # noqa: E402
import torch  # noqa: E402

PR_GET_PDEATHSIG = 2
death_signal = ctypes.c_int(0)
ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(death_signal), 0, 0, 0)
handlers = {}
for signum in signal.valid_signals():
    try:
        handler = signal.getsignal(signum)
    except (OSError, ValueError):
        continue
    handlers[str(int(signum))] = handler if isinstance(handler, int) else getattr(handler, "__name__", repr(handler))

record = {
    "preloaded": preloaded,
    "argv": sys.argv,
    "name": __name__,
    "file": __file__,
    "spec": repr(__spec__),
    "path0": sys.path[0],
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    # What a C library or a child sees. (subprocess.run closes its pipes at once; os.popen's
    # pipe stayed open until a garbage collection and showed up in "fds" below.)
    "c_env_rank": subprocess.run(["printenv", "RANK"], capture_output=True, text=True).stdout.strip(),
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
    "sid": os.getsid(0),
    "death_signal": death_signal.value,
    "stdin": os.readlink("/proc/self/fd/0"),
    "stdout": os.readlink("/proc/self/fd/1"),
    "stderr": os.readlink("/proc/self/fd/2"),
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2),
    "fd_targets": {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if int(fd) > 2
                   and os.path.exists(f"/proc/self/fd/{fd}")},
    "threads_at_start": threads_at_start,
    "handlers": handlers,
    "sigmask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "torch_num_threads": torch.get_num_threads(),
    "random": [random.random() for _ in range(4)],
    "numpy": numpy.random.rand(4).tolist(),
    "torch": torch.rand(4).tolist(),
}
path, how, *rest = sys.argv[1:]
with open(path, "w") as f:
    json.dump(record, f)
print(f"probe {os.environ.get('RANK')} recorded", flush=True)
if how == "exit":
    sys.exit(int(rest[0]))
if how == "raise":
    raise RuntimeError("probe failing on purpose")
if how == "message":
    sys.exit("probe exiting with a message")
if how == "signal":
    os.kill(os.getpid(), int(rest[0]))
