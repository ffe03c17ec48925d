"""Coordinator scale: 256 and 1024 simulated ranks heartbeating at 10 Hz over real sockets.

The coordinator runs here with a launcher that starts nothing; the ranks are
fake peers in a second process (so this process's CPU is the coordinator's
alone), each a real TCP connection speaking the heartbeat protocol. After a
warm-up, 1% of the ranks go silent (frozen: the connection stays open, the
heartbeats stop). It reports the coordinator's CPU use and memory during the
steady state, and how long after going silent each frozen rank was declared
failed (the floor is heartbeat_timeout).

    python bench/scale.py [--ranks 256 1024] [--timeout 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import logging

import trio

from rankwarden import protocol
from rankwarden.coordinator import Coordinator
from rankwarden.events import RankFailed
from rankwarden.launcher import ExitStatus
from rankwarden.spec import JobSpec

WARMUP = 5.0
STEADY = 8.0


class _Idle:
    """A 'process' that runs until stopped."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self.pid = None

    async def wait(self) -> ExitStatus:
        await self._done.wait()
        return ExitStatus(signal=15)

    async def stop(self, grace: float) -> ExitStatus:
        self._done.set()
        return ExitStatus(signal=15)

    def signal(self, sig: int) -> None:
        self._done.set()


class _StubLauncher:
    def __init__(self) -> None:
        self.requests = []

    async def start(self, request):
        self.requests.append(request)
        await trio.lowlevel.checkpoint()
        return _Idle()


async def _peers(address: str, job: str, token: str, ranks: int, silent: list[int], out: str, interval: float) -> None:
    host, port = address.rsplit(":", 1)
    silenced: dict[int, float] = {}

    async def peer(rank: int) -> None:
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(protocol.encode(protocol.Hello(version=protocol.PROTOCOL_VERSION, job=job, rank=rank,
                                                              attempt=1, pid=os.getpid(), token=token)))
        await stream.receive_some(4096)  # welcome
        start = trio.current_time()
        await trio.sleep(random.random() * interval)
        seq = 0
        while True:
            if rank in silent and trio.current_time() - start >= WARMUP + STEADY:
                silenced[rank] = time.time()
                await trio.sleep_forever()
            seq += 1
            await stream.send_all(protocol.encode(protocol.Heartbeat(seq=seq, step=seq)))
            await trio.sleep(interval)

    async with trio.open_nursery() as nursery:
        for rank in range(ranks):
            nursery.start_soon(peer, rank)
        await trio.sleep(WARMUP + STEADY + 6.0)
        with open(out, "w") as f:
            json.dump(silenced, f)
        nursery.cancel_scope.cancel()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def measure(ranks: int, timeout: float) -> dict:
    launcher = _StubLauncher()
    spec = JobSpec(entrypoint="sim.py", world_size=ranks, job_id=f"scale-{ranks}", job_dir=tempfile.mkdtemp(),
                   heartbeat_timeout=timeout, heartbeat_interval=0.1, progress_timeout=0, startup_timeout=300,
                   restart_scope="rank", max_restarts=ranks, backoff={"initial": 1000.0, "max": 1000.0})
    coordinator = Coordinator(spec, launcher=launcher)
    silent = sorted(random.Random(0).sample(range(ranks), max(1, ranks // 100)))
    detected: dict[int, float] = {}
    out = tempfile.mktemp(suffix=".json")
    result: dict = {"ranks": ranks}
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        while len(launcher.requests) < ranks:
            await trio.sleep(0.01)
        env = launcher.requests[0].env
        peers = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--peers", coordinator.address, coordinator.job_id, env["RANKWARDEN_TOKEN"],
             str(ranks), json.dumps(silent), out])

        async def watch() -> None:
            async for event in coordinator.events():
                if isinstance(event, RankFailed):
                    detected[event.rank] = event.failure.detected_at

        nursery.start_soon(watch)
        await trio.sleep(WARMUP)
        usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await trio.sleep(STEADY)
        usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result["cpu_percent"] = 100 * ((usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)) / (wall1 - wall0)
        result["rss_mib"] = _rss_mib()
        connected = sum(1 for r in coordinator.snapshot().ranks if r.heartbeat_age is not None)
        result["connected"] = connected
        await peers.wait()
        coordinator.stop(force=True)
    with open(out) as f:
        silenced = {int(k): v for k, v in json.load(f).items()}
    os.remove(out)
    latencies = [detected[r] - silenced[r] for r in silenced if r in detected]
    result["silent"], result["detected"] = len(silenced), len(latencies)
    if latencies:
        latencies.sort()
        result["p50"] = statistics.median(latencies)
        result["p99"] = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        result["max"] = latencies[-1]
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--peers":
        address, job, token, ranks, silent, out = sys.argv[2:8]
        trio.run(_peers, address, job, token, int(ranks), json.loads(silent), out, 0.1)
        return 0
    logging.basicConfig(level=logging.ERROR)  # one warning per frozen rank is expected, not news
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--timeout", type=float, default=2.0, help="heartbeat_timeout (the detection floor)")
    args = parser.parse_args()
    print(f"# coordinator scale: heartbeats at 10 Hz, heartbeat_timeout {args.timeout:g}s, 1% of ranks frozen, "
          f"{os.cpu_count()} CPUs (peers run in a second process on the same CPUs), {time.strftime('%Y-%m-%d')}")
    for ranks in args.ranks:
        r = trio.run(measure, ranks, args.timeout)
        latency = (f"detection after silence p50 {r['p50']:.3f}s p99 {r['p99']:.3f}s max {r['max']:.3f}s "
                   f"({r['detected']}/{r['silent']} detected)") if "p50" in r else f"detected {r['detected']}/{r['silent']}"
        print(f"{ranks:5} ranks: coordinator CPU {r['cpu_percent']:5.1f}% of one core, RSS {r['rss_mib']:.0f} MiB, "
              f"{r['connected']} connected; {latency}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
