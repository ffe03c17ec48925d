"""A rank for bench/detection.py: steps forever; records when it is asked to stop."""

import os
import signal
import sys
import time

import rankwarden.worker as rw  # a no-op under torchrun

out = sys.argv[1]
rank = os.environ["RANK"]


def write(name: str, text: str) -> None:
    # Write then rename: a reader never sees a half-written file.
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def on_term(signum, frame):
    write(f"term_{rank}", repr(time.time()))
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
write(f"pid_{rank}", str(os.getpid()))
step = 0
while True:
    time.sleep(0.01)
    step += 1
    rw.report(step)
