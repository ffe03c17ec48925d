"""Failure detection, rankwarden vs torchrun, side by side on the same rank script.

For each trial: start 2 ranks, inject a fault into rank 1 (kill -9 or SIGSTOP),
and measure the time until the launcher acts on it, seen from the surviving
rank 0 as the moment its SIGTERM arrives (both launchers SIGTERM the survivors
of a failed group). For rankwarden it also reads the coordinator's own
detection time from events.jsonl. A launcher that has not acted within
--limit seconds is reported as "not detected".

    python bench/detection.py --trials 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RANK = os.path.join(HERE, "_rank.py")


def wait_for(path: str, limit: float) -> bool:
    # A benchmark harness watching files another process writes; it measures, it does not decide.
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.002)
    return False


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def command(tool: str, out: str, heartbeat_timeout: float) -> list[str]:
    if tool == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "0", RANK, out]
    return [sys.executable, "-m", "rankwarden", "run", "--nproc-per-node", "2", "--max-restarts", "0", "--quiet",
            "--heartbeat-timeout", str(heartbeat_timeout), "--kill-grace", "1", "--job-dir", os.path.join(out, "job"),
            "--run-id", "bench-detect", RANK, out]


def trial(tool: str, fault: int, heartbeat_timeout: float, limit: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        launcher = subprocess.Popen(command(tool, out, heartbeat_timeout), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            if not (wait_for(os.path.join(out, "pid_0"), 60) and wait_for(os.path.join(out, "pid_1"), 60)):
                raise RuntimeError(f"{tool}: ranks did not start")
            time.sleep(0.5)  # steady state: heartbeats flowing
            victim = int(read(os.path.join(out, "pid_1")))
            t_fault = time.time()
            os.kill(victim, fault)
            acted = wait_for(os.path.join(out, "term_0"), limit)
            result = {"acted": None, "detected": None}
            if acted:
                result["acted"] = float(read(os.path.join(out, "term_0"))) - t_fault
            events = os.path.join(out, "job", "events.jsonl")
            if os.path.exists(events):
                for line in read(events).splitlines():
                    event = json.loads(line)
                    if event["type"] == "rank_failed":
                        result["detected"] = event["failure"]["detected_at"] - t_fault
                        break
            return result
        finally:
            for pid_file in ("pid_0", "pid_1"):
                try:
                    pid = int(read(os.path.join(out, pid_file)))
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def summary(values: list[float | None], limit: float) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return f"not detected within {limit:g}s in {len(values)}/{len(values)} trials"
    missed = len(values) - len(got)
    text = f"min {min(got) * 1000:8.1f} ms  median {statistics.median(got) * 1000:8.1f} ms  max {max(got) * 1000:8.1f} ms"
    return text + (f"  ({missed} not detected within {limit:g}s)" if missed else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0)
    parser.add_argument("--limit", type=float, default=20.0, help="seconds to wait for a launcher to act")
    parser.add_argument("--tools", default="rankwarden,torchrun")
    args = parser.parse_args()
    tools = args.tools.split(",")
    print(f"# detection: {args.trials} trials each, rankwarden --heartbeat-timeout {args.heartbeat_timeout:g}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    medians = {}
    for fault_name, fault in (("kill -9", signal.SIGKILL), ("SIGSTOP", signal.SIGSTOP)):
        for tool in tools:
            results = [trial(tool, fault, args.heartbeat_timeout, args.limit) for _ in range(args.trials)]
            acted = [r["acted"] for r in results]
            print(f"{fault_name:8} {tool:10} fault -> survivors stopped:  {summary(acted, args.limit)}")
            if tool == "rankwarden":
                detected = [r["detected"] for r in results]
                print(f"{fault_name:8} {tool:10} fault -> failure recorded:   {summary(detected, args.limit)}")
            got = [a for a in acted if a is not None]
            medians[(fault_name, tool)] = statistics.median(got) if got else None
    for fault_name in ("kill -9", "SIGSTOP"):
        ours, theirs = medians.get((fault_name, "rankwarden")), medians.get((fault_name, "torchrun"))
        if ours and theirs:
            print(f"ratio {fault_name}: torchrun / rankwarden median = {theirs / ours:.2f}x")
        elif ours and (fault_name, "torchrun") in medians:
            print(f"ratio {fault_name}: torchrun did not act within {args.limit:g}s; rankwarden median {ours:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
