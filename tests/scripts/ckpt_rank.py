"""A rank that checkpoints every step through the coordinator's multi-rank commit.

It resumes from the newest committed step, saves steps up to --steps (waiting
for each commit), and can be told to die by SIGKILL after writing its file for
a step but before reporting it.
"""

import argparse
import json
import os
import signal
import time

from rankwarden.worker import RankCheckpointer

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--die-rank", type=int, default=-1)
parser.add_argument("--die-step", type=int, default=-1)
parser.add_argument("--out", required=True)
parser.add_argument("--step-time", type=float, default=0.0, help="seconds of 'training' per step")
args = parser.parse_args()

rank = int(os.environ["RANK"])
attempt = int(os.environ["RANKWARDEN_ATTEMPT"])
ckpt = RankCheckpointer()
found = ckpt.load_latest()
start = 0
if found is not None:
    start, data = found
    assert data == f"rank {rank} step {start}".encode(), data  # exactly my own bytes of that step
with open(os.path.join(args.out, f"resume_r{rank}_a{attempt}.json"), "w") as f:
    json.dump({"resumed_from": start}, f)

for step in range(start + 1, args.steps + 1):
    time.sleep(args.step_time)
    payload = f"rank {rank} step {step}".encode()
    if attempt == 1 and rank == args.die_rank and step == args.die_step:
        ckpt.store.write_file(step, ckpt.file_name, payload, tag=ckpt.tag, rank=rank)
        os.kill(os.getpid(), signal.SIGKILL)  # written, never reported
    ckpt.save(step, payload)
    assert ckpt.wait_committed(step, timeout=60), f"step {step} was not committed"
print(f"rank {rank} done at step {args.steps}")
