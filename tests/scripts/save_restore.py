"""Saves and restores through rankwarden.worker with no URL: the job's default store."""

import argparse
import os

import rankwarden.worker as rw

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()
rank = int(os.environ["RANK"])
found = rw.restore()
start = 0 if found is None else found[0]
print(f"rank {rank} {'fresh start' if found is None else f'resumed at step {start}'}", flush=True)
for step in range(start + 1, args.steps + 1):
    rw.report(step)
    rw.save(step, {"step": step, "rank": rank})
print(f"rank {rank} saved up to step {args.steps}", flush=True)
