"""Commits step 1 cleanly, then dies by SIGKILL at a named point while saving step 2.

usage: ckpt_writer.py URL JOB POINT
"""

import os
import signal
import sys

from rankwarden.checkpoint import CheckpointStore, set_fault_hook

url, job, point = sys.argv[1:4]
store = CheckpointStore(url, job)


def payloads(step):
    # Two files of 3 MiB, content derived from the step: a reader can tell them apart.
    return {name: bytes([step]) * (3 << 20) + name.encode() for name in ("rank_00000.pt", "rank_00001.pt")}


store.save(1, payloads(1), world_size=2)


def crash(name):
    if name == point:
        os.kill(os.getpid(), signal.SIGKILL)


set_fault_hook(crash)
store.save(2, payloads(2), world_size=2)
print("completed without reaching", point)
