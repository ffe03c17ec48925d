"""Recovery after a failure, rankwarden (warm and --no-warm) vs torchrun, on the same 2-rank DDP job (gloo, CPU).

Both launchers run demo/train.py (checkpoint every 16 steps, resume from the
newest committed checkpoint). Each trial waits until rank 1 passes step 40,
then hits it with kill -9 (or SIGSTOP) and measures from the trace the script
writes:

  detect    fault -> the launcher announced the failure on its output, timed
            the same way for both: the harness stamps each line of the
            launcher's output as it arrives (rankwarden: "rankwarden: attempt
            N: ... [cause]"; torchrun, run with LOGLEVEL=INFO: "Worker group
            FAILED"). torchrun notices a dead worker by polling every
            monitor_interval (0.1 s by default); rankwarden waits on a pidfd.
  recover   fault -> every rank of the next attempt has completed a step
  redone    steps trained after the resumed checkpoint, trained again
  steps/s   steady state, steps 10..40 of the first attempt

and breaks rankwarden's recovery into its parts (the restart floor):
detection, stopping the old ranks, spawning, interpreter start, import torch,
process-group init, checkpoint load, first step.

"rankwarden" forks restarted ranks from its zygote (the default; the trace
says whether it did: "warm" counts the trials whose next attempt was forked),
"rankwarden-fresh" is ``rankwarden run --no-warm``, "rankwarden-live" is
``rankwarden run --live`` with the script's ``--live``: only the failed rank
is replaced (warm), the survivor keeps its process and state; for it
"recover" is fault -> every rank has finished a step after the replacement
joined, and "redone" counts completed steps trained again. Trials rotate between
the launchers (rankwarden, rankwarden-fresh, torchrun, rankwarden, ...), so a
machine that slows down or warms up over the run weighs on all alike.

    python bench/recovery.py --trials 5 [--sigstop-wait 120] [--faults kill]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "demo", "train.py")
KILL_AT = 40
#: The line each launcher prints when it has noticed a failed rank.
ANNOUNCES = {"rankwarden": re.compile(r"rankwarden: attempt \d+: .*\[[\w-]+\]\s*$"),
             "torchrun": re.compile(r"Worker group (FAILED|UNHEALTHY)")}
ANNOUNCES["rankwarden-fresh"] = ANNOUNCES["rankwarden-live"] = ANNOUNCES["rankwarden"]
TOOLS = ("rankwarden", "rankwarden-fresh", "rankwarden-live", "torchrun")


def torchrun_monitor_interval() -> float | None:
    """torchrun's default polling interval for dead workers, from the installed torch."""
    try:
        import dataclasses

        from torch.distributed.elastic.agent.server.api import WorkerSpec
    except ImportError:
        return None
    return next((f.default for f in dataclasses.fields(WorkerSpec) if f.name == "monitor_interval"), None)


class Output:
    """The launcher's output, copied to a file, each line stamped with the time it arrived."""

    def __init__(self, proc: subprocess.Popen, path: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._copy, args=(proc.stdout, path), daemon=True)
        self._thread.start()

    def _copy(self, stream, path: str) -> None:
        with open(path, "wb") as log:
            for raw in iter(stream.readline, b""):
                self.lines.append((time.time(), raw.decode(errors="replace")))
                log.write(raw)

    def first(self, pattern: re.Pattern, after: float) -> float | None:
        return next((t for t, line in list(self.lines) if t >= after and pattern.search(line)), None)

    def join(self) -> None:
        self._thread.join(5)


def read_trace(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def launch(tool: str, work: str, data: str, trace: str) -> tuple[subprocess.Popen, Output]:
    # Without the script's SIGTERM handler: with it, torchrun waits its 30 s SIGTERM
    # timeout for a survivor blocked in a collective (measured: ~36 s recovery).
    script = [TRAIN, "--data", data, "--epochs", "1", "--step-time", "0.02", "--trace", trace, "--no-graceful-stop",
              *(["--live"] if tool == "rankwarden-live" else [])]
    if tool == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "3",
               *script, "--ckpt-url", os.path.join(work, "ckpt")]
    else:
        cmd = [sys.executable, "-m", "rankwarden", "run", "--nproc-per-node", "2", "--max-restarts", "3", "--quiet",
               "--heartbeat-timeout", "3", "--backoff-initial", "0.05", "--kill-grace", "2", "--run-id", "bench-recovery",
               "--job-dir", os.path.join(work, "job"), "--checkpoint", os.path.join(work, "ckpt"),
               *(["--no-warm"] if tool == "rankwarden-fresh" else []),
               *(["--live", "--progress-timeout", "8"] if tool == "rankwarden-live" else []), *script]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKWARDEN_")}
    env["PYTHONUNBUFFERED"] = "1"
    if tool == "torchrun":
        env["LOGLEVEL"] = "INFO"  # torchrun says "Worker group FAILED" at INFO
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, Output(proc, os.path.join(work, "launcher.log"))


def wait_until(predicate, limit: float):
    # A harness watching a file the ranks append to; it measures, it decides nothing.
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    return None


def trial(tool: str, fault: int, data: str, limit: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="rw-recovery-") as work:
        trace = os.path.join(work, "trace.jsonl")
        proc, output = launch(tool, work, data, trace)
        try:
            def ready():
                steps = [e for e in read_trace(trace) if e["event"] == "step" and e["rank"] == 1 and e["restart"] == 0]
                return steps[-1] if steps and steps[-1]["step"] >= KILL_AT else None

            hit = wait_until(ready, 120)
            if not hit:
                return {"error": "never reached the fault step"}
            t_fault = time.time()
            os.kill(hit["pid"], fault)
            if tool == "rankwarden-live":
                return _live_result(trace, hit["pid"], t_fault, output, limit)

            def every_rank_stepped():
                steps = [e for e in read_trace(trace) if e["event"] == "step" and e["restart"] >= 1]
                return steps if len({e["rank"] for e in steps}) == 2 else None

            recovered = wait_until(every_rank_stepped, limit)
            events = read_trace(trace)
            first_run = [e for e in events if e["event"] == "step" and e["restart"] == 0]
            rate = _rate(first_run)
            result = {"steps_per_s": rate, "recovered": bool(recovered)}
            if not recovered:
                with open(os.path.join(work, "launcher.log"), "rb") as f:
                    tail = [line for line in f.read().decode(errors="replace").splitlines()
                            if "Error" in line or "error" in line or "fail" in line.lower()]
                result["why"] = tail[-3:]
            if recovered:
                first_restart = min(e["restart"] for e in recovered)
                stepped = {}
                for e in recovered:
                    if e["restart"] == first_restart:
                        stepped[e["rank"]] = min(stepped.get(e["rank"], e["t"]), e["t"])
                restored = [e for e in events if e["event"] == "restored" and e["restart"] >= 1]
                reached = max(e["step"] for e in first_run)
                result["recover"] = max(stepped.values()) - t_fault
                result["first_rank"] = min(stepped.values()) - t_fault
                result["redone"] = max(0, reached - min(e["step"] for e in restored)) if restored else None
                result["phases"] = _phases(tool, work, events, t_fault)
                announced = output.first(ANNOUNCES[tool], t_fault)
                result["detect"] = None if announced is None else announced - t_fault
                starts = [e["t"] for e in events if e["event"] == "start" and e["restart"] >= 1]
                result["respawned"] = min(starts) - t_fault if starts else None
                if tool.startswith("rankwarden"):
                    with open(os.path.join(work, "job", "events.jsonl")) as f:
                        started = [json.loads(line) for line in f]
                    result["warm"] = all(e.get("warm") for e in started
                                         if e["type"] == "rank_started" and e["attempt"] >= 2)
            return result
        finally:
            for e in read_trace(trace):
                if e["event"] == "start":
                    for sig in (signal.SIGCONT, signal.SIGKILL):
                        try:
                            os.kill(e["pid"], sig)
                        except OSError:
                            pass
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            output.join()


def _live_result(trace: str, victim: int, t_fault: float, output, limit: float) -> dict:
    """Live: the survivor keeps its process; recovered once every rank has finished a step in the new group."""
    def every_rank_stepped():
        events = read_trace(trace)
        new = [e for e in events if e["event"] == "step" and e["rank"] == 1 and e["pid"] != victim]
        if not new:
            return None
        first = new[0]["step"]
        done = {}
        for e in events:
            if e["event"] == "step" and e["t"] > t_fault and e["step"] >= first:
                done.setdefault(e["rank"], e["t"])
        return (first, done) if len(done) == 2 else None

    found = wait_until(every_rank_stepped, limit)
    events = read_trace(trace)
    result = {"steps_per_s": _rate([e for e in events if e["event"] == "step"]), "recovered": bool(found)}
    if not found:
        return result
    first, done = found
    survivor_pids = {e["pid"] for e in events if e["rank"] == 0}
    reached = max(e["step"] for e in events if e["event"] == "step" and e["t"] <= t_fault)
    survivor_steps = [e["step"] for e in events if e["event"] == "step" and e["rank"] == 0]
    announced = output.first(ANNOUNCES["rankwarden-live"], t_fault)
    starts = [e["t"] for e in events if e["event"] == "start" and e["pid"] != victim and e["rank"] == 1]
    result.update(recover=max(done.values()) - t_fault, first_rank=min(done.values()) - t_fault,
                  redone=max(0, reached - (first - 1)), detect=None if announced is None else announced - t_fault,
                  respawned=min(starts) - t_fault if starts else None, survivor_kept=len(survivor_pids) == 1,
                  survivor_repeated=len(survivor_steps) - len(set(survivor_steps)), warm=True)
    return result


def _rate(steps: list[dict]) -> float | None:
    window = [e for e in steps if 10 <= e["step"] <= KILL_AT and e["rank"] == 0]
    if len(window) < 2:
        return None
    return (window[-1]["step"] - window[0]["step"]) / (window[-1]["t"] - window[0]["t"])


def _phases(tool: str, work: str, events: list[dict], t_fault: float) -> dict:
    """Seconds spent in each part of the recovery (rankwarden: from its events too)."""
    after = [e for e in events if e["restart"] >= 1]

    def first(name):
        times = [e["t"] for e in after if e["event"] == name]
        return min(times) if times else None

    def last_of_first(name):  # the slower rank decides when the group moves on
        per_rank = {}
        for e in after:
            if e["event"] == name and e["restart"] == min(x["restart"] for x in after):
                per_rank.setdefault(e["rank"], e["t"])
        return max(per_rank.values()) if per_rank else None

    marks = {"fault": t_fault}
    if tool.startswith("rankwarden"):
        with open(os.path.join(work, "job", "events.jsonl")) as f:
            job_events = [json.loads(line) for line in f]
        failed = next(e for e in job_events if e["type"] == "rank_failed")
        marks["detected"] = failed["failure"]["detected_at"]
        stopped = [e["time"] for e in job_events if e["type"] in ("rank_stopped", "rank_failed") and e["attempt"] == failed["attempt"]]
        marks["old ranks stopped"] = max(stopped)
        spawned = [e["time"] for e in job_events if e["type"] == "rank_started" and e["attempt"] == failed["attempt"] + 1]
        marks["new ranks spawned"] = max(spawned) if spawned else None
    marks["interpreter started"] = last_of_first("start")
    marks["torch imported"] = last_of_first("imported")
    marks["process group ready"] = last_of_first("process_group")
    marks["model+optimizer built"] = last_of_first("model_built")
    marks["checkpoint loaded"] = last_of_first("restored")
    marks["first step done"] = last_of_first("step")  # every rank of the next attempt
    phases, previous = {}, ("fault", t_fault)
    for name, t in marks.items():
        if name == "fault" or t is None:
            continue
        phases[name] = t - previous[1]
        previous = (name, t)
    if "detected" in marks:
        phases["_detected"] = marks["detected"] - t_fault
    return phases


def stats(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"min {min(values):6.2f}  median {statistics.median(values):6.2f}  max {max(values):6.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--sigstop-wait", type=float, default=120.0, help="how long torchrun gets to recover from SIGSTOP")
    parser.add_argument("--data", default=os.path.join(ROOT, "rankwarden-jobs", "data"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--faults", default="kill,stop", help="which faults to inject: kill, stop, or both")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data, "index.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "demo", "make_dataset.py"), "--out", args.data], check=True,
                       stdout=subprocess.DEVNULL)
    faults = set(args.faults.split(","))
    results: dict = {}
    if "kill" in faults:
        for _ in range(args.trials):  # rotating: drift in the machine lands on every launcher alike
            for tool in TOOLS:
                results.setdefault((tool, "kill"), []).append(trial(tool, signal.SIGKILL, args.data, 120))
    if "stop" in faults:
        for i in range(args.trials):  # torchrun gets one SIGSTOP trial (it waits --sigstop-wait), in the middle
            results.setdefault(("rankwarden", "stop"), []).append(trial("rankwarden", signal.SIGSTOP, args.data, 120))
            if i == args.trials // 2:
                results[("torchrun", "stop")] = [trial("torchrun", signal.SIGSTOP, args.data, args.sigstop_wait)]

    print(f"# recovery: 2-rank DDP (gloo, CPU), {args.trials} trials per launcher, interleaved, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    interval = torchrun_monitor_interval()
    print("# detect: fault -> the launcher's failure line reached this harness (same clock and method for both); "
          f"torchrun finds a kill -9 by polling every monitor_interval = {interval if interval is not None else '?'} s "
          "(its default, torch/distributed/elastic/agent/server/api.py), rankwarden by a pidfd")
    print("# recover: fault -> every rank of the next attempt has finished a step")
    for (tool, fault), rows in results.items():
        ok = [r for r in rows if r.get("recovered")]
        print(f"{fault:4} {tool:16} recovered {len(ok)}/{len(rows)}  detect s {stats([r.get('detect') for r in ok])}  "
              f"recover s {stats([r.get('recover') for r in ok])}  redone {stats([r.get('redone') for r in ok])}")
        for r in rows:
            if fault == "kill" and not r.get("recovered") and r.get("why"):
                print(f"     {tool} did not recover: {' | '.join(line.strip()[-160:] for line in r['why'])}")
        if fault == "kill" and ok:
            print(f"     {tool} fault -> first new rank process started s {stats([r.get('respawned') for r in ok])}")
        if tool.startswith("rankwarden") and ok:
            print(f"     {tool} next attempt forked warm in {sum(bool(r.get('warm')) for r in ok)}/{len(ok)} trials")
    rates = {}
    for tool in TOOLS:
        rows = [r for fault in ("kill", "stop") for r in results.get((tool, fault), [])]
        rates[tool] = [r["steps_per_s"] for r in rows if r.get("steps_per_s") is not None]
        print(f"steady state {tool:16} steps/s {stats(rates[tool])}")
    if rates.get("rankwarden") and rates.get("torchrun"):
        ratio = statistics.median(rates["rankwarden"]) / statistics.median(rates["torchrun"])
        print(f"steady state rankwarden / torchrun median = {ratio:.3f}x (goal >= 0.98x)")

    def median_recover(tool):
        values = [r["recover"] for r in results.get((tool, "kill"), []) if r.get("recovered")]
        return statistics.median(values) if values else None

    theirs = median_recover("torchrun")
    goals = {"rankwarden": "  goal <= 0.15x", "rankwarden-live": "  goal <= 0.10x and below rankwarden's"}
    for tool in ("rankwarden", "rankwarden-fresh", "rankwarden-live"):
        ours = median_recover(tool)
        if ours and theirs:
            print(f"ratio kill -9 recovery: {tool} / torchrun median = {ours / theirs:.3f}x "
                  f"(torchrun / {tool} = {theirs / ours:.2f}x){goals.get(tool, '')}")
    live_rows = [r for r in results.get(("rankwarden-live", "kill"), []) if r.get("recovered")]
    if live_rows:
        print(f"live: survivor kept its process in {sum(bool(r.get('survivor_kept')) for r in live_rows)}/{len(live_rows)} "
              f"trials; steps the survivor completed twice: {sum(r.get('survivor_repeated', 0) for r in live_rows)}")
    if ("rankwarden", "stop") in results:
        ok = [r for r in results[("rankwarden", "stop")] if r.get("recovered")]
        if ok:
            print(f"SIGSTOP rankwarden: fault -> next attempt's first step median {statistics.median(r['first_rank'] for r in ok):.2f}s "
                  "(goal <= heartbeat_timeout 3 s + 1 s)")
    if ("torchrun", "stop") in results:
        stop = results[("torchrun", "stop")][0]
        print(f"SIGSTOP under torchrun: {'recovered' if stop.get('recovered') else f'no recovery within {args.sigstop_wait:g}s'}")
    for tool in ("rankwarden", "rankwarden-fresh"):
        print(f"restart floor ({tool}, kill -9, median seconds per part):")
        parts: dict[str, list[float]] = {}
        for r in results.get((tool, "kill"), []):
            for name, seconds in (r.get("phases") or {}).items():
                if not name.startswith("_"):
                    parts.setdefault(name, []).append(seconds)
        total = sum(statistics.median(v) for v in parts.values()) or 1.0
        for name, values in parts.items():
            print(f"  {name:22} {statistics.median(values):6.3f}  ({100 * statistics.median(values) / total:4.1f}%)")
        if parts:
            largest = max(parts, key=lambda n: statistics.median(parts[n]))
            print(f"  largest part: {largest}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{t}/{k}": v for (t, k), v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
