"""Holds a reading lease on one step until stdin closes (or until it is killed).

usage: ckpt_reader.py URL JOB STEP [TTL]
"""

import sys

from rankwarden.checkpoint import CheckpointStore

url, job, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = CheckpointStore(url, job)
reading = store.reading(step, ttl=float(sys.argv[4])) if len(sys.argv) > 4 else store.reading(step)
with reading:
    print("reading", flush=True)
    sys.stdin.read()
print("done", flush=True)
