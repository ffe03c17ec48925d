"""A rank for the tests: steps, reports progress, and fails on request in a chosen way."""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import rankwarden.worker as rw

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--step-time", type=float, default=0.05)
parser.add_argument("--fail-rank", type=int, default=-1)
parser.add_argument("--fail-attempt", type=int, default=1, help="0: every attempt")
parser.add_argument("--fail-step", type=int, default=2)
parser.add_argument("--fail-mode", choices=["exit1", "kill", "stop", "hang"], default="exit1")
parser.add_argument("--record", default="", help="directory to write this rank's environment to")
parser.add_argument("--spawn-child", action="store_true", help="leave a child process running")
parser.add_argument("--no-report", action="store_true", help="never call rankwarden.worker.report")
parser.add_argument("--graceful", action="store_true", help="on a stop request, say so and exit 0")
parser.add_argument("--until-file", default="", help="keep stepping until this file exists")
parser.add_argument("--until-attempt", type=int, default=1, help="attempt that waits for --until-file (0: every)")
args = parser.parse_args()

rank = int(os.environ["RANK"])
attempt = int(os.environ.get("RANKWARDEN_ATTEMPT", "1"))
if args.record:
    with open(os.path.join(args.record, f"r{rank}_a{attempt}.json"), "w") as f:
        json.dump({"env": dict(os.environ), "argv": sys.argv, "path0": sys.path[0], "name": __name__, "pid": os.getpid()}, f)
print(f"rank {rank} ready pid {os.getpid()}", flush=True)
if args.spawn_child:
    subprocess.Popen(["sleep", "1000"])

if args.graceful:
    rw.graceful_stop()
def more(step):
    if args.until_file and args.until_attempt in (0, attempt):
        return not os.path.exists(args.until_file)
    return step <= args.steps


step = 0
while more(step + 1):
    step += 1
    if args.graceful and rw.drain_requested():
        print(f"rank {rank} drained at step {step - 1}", flush=True)
        sys.exit(0)
    time.sleep(args.step_time)
    if not args.no_report:
        rw.report(step, samples=step * 8, loss=1.0 / step)
    if rank == args.fail_rank and args.fail_attempt in (0, attempt) and step == args.fail_step:
        with open(os.path.join(args.record or tempfile.gettempdir(), f"fault_r{rank}_a{attempt}"), "w") as f:
            f.write(repr(time.time()))
        if args.fail_mode == "exit1":
            print(f"rank {rank} failing on purpose", file=sys.stderr)
            sys.exit(1)
        if args.fail_mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if args.fail_mode == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        while args.fail_mode == "hang":
            time.sleep(1)
print(f"rank {rank} done after {step} steps")
