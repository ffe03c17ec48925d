"""Lost hosts: how soon a 2-node job notices each kind of loss, and how soon the host is back in.

Hosts are network namespaces on one bridge (tests/netns.py; needs root).
Each trial starts `rankwarden run --nnodes 2` (node 0 with the coordinator,
node 1 an agent; 2 ranks each), waits until every rank is connected, then:

    kill      kill -9 of node 1's agent (its ranks die with it)
    stop      SIGSTOP of node 1's agent and ranks, SIGCONT after detection
    partition node 1's bridge port detached, re-attached after detection

``detected`` is the coordinator's first failure event minus the moment of
the fault (for ``partition``: when the ``ip`` command that cut the link
returned, so it may read up to that command's run time short); ``back`` is from the repair (a replacement agent for ``kill``,
SIGCONT, or the healed link) to every rank of attempt 2 connected.

    sudo python bench/node_loss.py --trials 3 --heartbeat-timeout 2
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.netns import Cluster  # noqa: E402
from tests.test_agents import connected, events, finish, first_failure, signal_all, wait_for  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "scripts", "worker.py")


def trial(kind: str, timeout: float, work: Path) -> tuple[float, float]:
    cluster = Cluster(nodes=1)
    try:
        job_dir = work / f"{kind}-{time.time_ns()}"
        endpoint = f"{cluster.address(0)}:29400"
        env = dict(os.environ, RANKWARDEN_JOB_SECRET="bench-secret-0123456789")

        def node(k: int) -> subprocess.Popen:
            return cluster.popen(k, [
                sys.executable, "-m", "rankwarden", "run", "--nnodes", "2", "--node-rank", str(k),
                "--rdzv-endpoint", endpoint, "--nproc-per-node", "2", "--heartbeat-timeout", str(timeout),
                "--backoff-initial", "0.05", "--kill-grace", "1", "--stop-grace", "2", "--job-dir", str(job_dir),
                "--run-id", job_dir.name[:40].lower(), "--quiet", WORKER, "--steps", "3", "--until-file",
                str(work / "never"), "--until-attempt", "1"], env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)

        node0, node1 = node(0), node(1)
        wait_for("every rank", lambda: connected(job_dir, 1), procs=(node0,))
        host1 = cluster.pids()[cluster.namespace(1)]
        fault = time.time()
        if kind == "kill":
            node1.kill()
        elif kind == "stop":
            signal_all(host1, signal.SIGSTOP)
        else:
            cluster.partition(1)
            # The link goes down somewhere inside the `ip` command (~0.5 s here): count from its end.
            fault = time.time()
        detected = wait_for("detection", lambda: first_failure(job_dir), timeout=timeout + 30)["time"] - fault
        repaired = time.time()
        if kind == "kill":
            finish([node1])
            node1 = node(1)
        elif kind == "stop":
            # Thawed first, the agent may stop a written-off rank before it is sent SIGCONT.
            signal_all(host1, signal.SIGCONT)
        else:
            cluster.heal(1)
        wait_for("attempt 2", lambda: connected(job_dir, 2), timeout=60, procs=(node0,))
        back = time.time() - repaired
        finish([node0, node1])
        assert not any(e["type"] == "job_failed" for e in events(job_dir)), "the job failed"
        return detected, back
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0)
    parser.add_argument("--kinds", default="kill,stop,partition")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"heartbeat_timeout={args.heartbeat_timeout:g}s, {args.trials} trials each (median, max)")
        for kind in args.kinds.split(","):
            results = [trial(kind, args.heartbeat_timeout, Path(tmp)) for _ in range(args.trials)]
            detected, back = zip(*results)
            print(f"{kind:10s} detected {statistics.median(detected):6.2f}s ({max(detected):.2f})   "
                  f"back in {statistics.median(back):6.2f}s ({max(back):.2f})", flush=True)


if __name__ == "__main__":
    main()
