"""Coordinator scale: the per-rank heartbeat path vs aggregation through node relays.

Modes, each in a fresh coordinator process (a real ``Coordinator`` with a
launcher that starts nothing, ``tune_gc=True`` as ``rankwarden run`` uses it):

* ``per-rank N``: N simulated ranks, each its own TCP connection sending a
  ``Heartbeat`` every interval (the single-host default);
* ``aggregated R x K``: R simulated node relays, each one connection carrying
  K ranks' hellos and one ``RelayBeat`` per interval (every rank's step
  changed: the worst case), as ``rankwarden.agent.Relay`` sends them. The
  coordinator's side is the real one.

The simulated peers run in ``--senders`` other processes (so this process's
CPU is the coordinator's alone). They send on absolute deadlines spread
evenly over the interval (never send-then-sleep, which drifts below the
nominal rate), and the rate the coordinator *received* is counted on its side
(the steps it recorded; each heartbeat carries the next step) and printed
next to the nominal one.

Phases after all peers are connected: warm-up, a CPU window (coordinator CPU
per heartbeat received, loop stalls seen by a 10 ms sleeper), RSS read once
the 30 s step-rate history has filled (``--history``), then silence:
``--silent`` ranks stop heartbeating (per-rank), or in aggregated mode that
many ranks are named frozen by their relay at exactly their last heartbeat +
timeout (``RelaySilent``, as a real relay does), and ``--frozen-relays``
relays stop sending altogether (a frozen node: one deadline per relay on the
coordinator). Detection latency is stamped from the wall time of the last
heartbeat (or relay frame) the sender actually sent, to the coordinator's
``detected_at``; p99 is printed with n.

The API server's log copier is measured on its own (``--log-copier``): it
runs in the same process as the coordinators the server runs, so add its
figure to theirs.

    python bench/scale.py                          # about 6 minutes on 2 cores
    python bench/scale.py --quick                  # about 2 minutes; RSS is read before the history fills (said so)
    python bench/scale.py --baseline ../main       # also the per-rank modes with another checkout (before a change)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# --baseline runs the per-rank modes again with another checkout's rankwarden (e.g. main before a change).
sys.path.insert(0, os.environ.get("RANKWARDEN_BENCH_CHECKOUT") or os.path.dirname(HERE))

import logging  # noqa: E402

import trio  # noqa: E402

from rankwarden import protocol  # noqa: E402

RATE_WINDOW = 30.0  # the coordinator's step-rate history (coordinator/_rank.py _RATE_WINDOW)


# -- the simulated peers (sender processes; synchronous, no trio) ---------------------------------------


def _recv_frames(sock: socket.socket, decoder: protocol.FrameDecoder, count: int) -> list:
    got: list = []
    while len(got) < count:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("coordinator closed a connection while connecting")
        got.extend(decoder.feed(data))
    return got


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def sender(config: dict) -> None:
    """Connect this sender's peers, wait for "go", send on absolute deadlines, silence some, report."""
    job, token, interval, timeout = config["job"], config["token"], config["interval"], config["timeout"]
    mode = config["mode"]
    hello = dict(version=protocol.PROTOCOL_VERSION, job=job, attempt=1, pid=os.getpid(), token=token)
    units = config["units"]
    n = len(units)

    def connect(unit: int) -> tuple[socket.socket, list[int]]:
        sock = _connect(config["address"])
        decoder = protocol.FrameDecoder(protocol.ToRank if mode == "per-rank" else protocol.ToRelay)
        if mode == "per-rank":
            # No wait for the welcome: a coordinator slow to answer must not hold up the
            # heartbeats of the ranks already connected (the coordinator counts who is in).
            sock.sendall(protocol.encode(protocol.Hello(rank=unit, **hello)))
            ranks = [unit]
        else:
            ranks = list(range(unit * config["per_relay"], (unit + 1) * config["per_relay"]))
            frames = [protocol.encode(protocol.RelayHello(version=protocol.PROTOCOL_VERSION, job=job,
                                                          node=f"sim-{unit}", interval=interval, timeout=timeout))]
            frames += [protocol.encode(protocol.RelayForward(rank=r, message=protocol.Hello(rank=r, **hello)))
                       for r in ranks]
            sock.sendall(b"".join(frames))
            got = _recv_frames(sock, decoder, len(ranks))
            assert all(isinstance(m.message, protocol.Welcome) for m in got), got[:1]
        sock.setblocking(False)
        return sock, ranks

    # Peers are connected one by one while the ones already connected heartbeat
    # on schedule (a rank that waited for all the others would time out first).
    peers: list = [None] * n  # (connection, ranks it carries)
    connected = 0
    start = time.time()
    go = math.inf  # set by the coordinator's "go <wall time> <silence after>" once every sender is ready
    silent_units = set(config["silent_units"])  # per-rank: ranks; aggregated: whole relays (frozen nodes)
    silent_ranks = set(config["silent_ranks"])  # aggregated: ranks their relay names frozen
    dead: set[int] = set()
    progress_every = max(1, round(config["progress_interval"] / interval))
    seq = [0] * n
    last_beat = [0.0] * n  # wall time of the last frame sent on each connection
    sent = 0
    last_sent: dict[str, float] = {}  # "rank" or "relayN" -> wall time its last heartbeat was sent
    pending_silent: list[tuple[float, int, int]] = []  # (due wall time, connection, rank) of RelaySilent
    named: dict[str, float] = {}  # rank -> wall time its RelaySilent was actually sent
    stop_at = silence_at = counted_from = counted_until = math.inf
    counted = 0
    while (now := time.time()) < stop_at:
        if connected < n:
            peers[connected] = connect(units[connected])
            connected += 1
            if connected == n:
                print("ready", flush=True)
        elif go == math.inf and select.select([sys.stdin], [], [], 0)[0]:
            line = sys.stdin.readline().split()
            go, silence_after = float(line[1]), float(line[2])
            silence_at = go + silence_after
            stop_at = silence_at + timeout + config["tail"]
            counted_from, counted_until = go + config["count_from"], go + config["count_until"]
        due = int((now - start) / interval * n)
        silencing = now >= silence_at
        while sent < due:
            i = sent % n
            sent += 1
            if peers[i] is None:
                continue
            sock, ranks = peers[i]
            unit = units[i]
            if silencing and unit in silent_units:
                continue  # frozen: the connection stays open, nothing is sent
            seq[i] += 1
            if mode == "per-rank":
                frame = protocol.encode(protocol.Heartbeat(seq=seq[i], step=seq[i]))
            else:
                live = []
                for r in ranks:
                    if not (silencing and r in silent_ranks):
                        if seq[i] % progress_every == 0:  # progress once a second, as the Relay sends it
                            live.append(protocol.RelayRank(r, seq[i]))
                    elif str(r) not in last_sent:
                        # Its last heartbeat reached the relay no later than the last beat
                        # that carried it; the relay names it exactly one timeout after.
                        last_sent[str(r)] = last_beat[i]
                        pending_silent.append((last_beat[i] + timeout, i, r))
                frame = protocol.encode(protocol.RelayBeat(seq=seq[i], changed=live))
            if i in dead:
                continue
            try:
                sock.send(frame)
            except BlockingIOError:
                raise SystemExit("the coordinator stopped reading (a full socket buffer): the rate is not sustained")
            except OSError:
                dead.add(i)  # the coordinator dropped it (it judged the rank failed): counted on its side
                continue
            last_beat[i] = time.time()
            if counted_from <= now < counted_until:
                counted += 1
            if unit in silent_units:
                last_sent[str(unit) if mode == "per-rank" else f"relay{unit}"] = last_beat[i]
        for item in [p for p in pending_silent if p[0] <= now]:
            pending_silent.remove(item)
            _, i, r = item
            peers[i][0].send(protocol.encode(protocol.RelaySilent(rank=r, silent_for=timeout,
                                                                  detail="simulated frozen rank")))
            named[str(r)] = time.time()
        if connected == n:
            next_due = start + (sent + 1) * interval / n
            time.sleep(max(0.0, min(0.002, next_due - time.time())))
    sent_rate = counted / (counted_until - counted_from)
    print(json.dumps({"last_sent": last_sent, "named": named, "frames_per_s": sent_rate, "dropped": len(dead)}),
          flush=True)
    for sock, _ in peers:
        sock.close()


# -- the coordinator process --------------------------------------------------------------------------------


class _Idle:
    """A 'process' that runs until stopped."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self.pid = None

    async def wait(self):
        from rankwarden.launcher import ExitStatus

        await self._done.wait()
        return ExitStatus(signal=15)

    async def stop(self, grace: float):
        from rankwarden.launcher import ExitStatus

        self._done.set()
        return ExitStatus(signal=15)

    def signal(self, sig: int) -> None:
        self._done.set()


class _StubLauncher:
    def __init__(self) -> None:
        self.requests: list = []
        self.started = 0

    async def start(self, request):
        # Only the first request is kept (for the token): keeping 10,000 environments
        # would be the benchmark's memory, not the coordinator's.
        self.started += 1
        if not self.requests:
            self.requests.append(request)
        await trio.lowlevel.checkpoint()
        return _Idle()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]  # nearest rank: with n < 100 it is the maximum


async def coordinator_main(args) -> dict:
    from rankwarden.coordinator import Coordinator
    from rankwarden.events import RankFailed
    from rankwarden.spec import JobSpec

    aggregated = args.mode == "aggregated"
    ranks = args.relays * args.per_relay if aggregated else args.ranks[0]
    frames = [0]
    if aggregated:
        from rankwarden.coordinator import _aggregate

        # Count the relay frames the coordinator handled (one Python call each: counted against us).
        handle = _aggregate._RelayConnection.handle

        def counting(self, message, router, tuner):
            frames[0] += 1
            return handle(self, message, router, tuner)

        _aggregate._RelayConnection.handle = counting
    spec = JobSpec(entrypoint="sim.py", world_size=ranks, job_id=f"scale-{args.mode}-{ranks}",
                   job_dir=tempfile.mkdtemp(prefix="rw-scale-"), heartbeat_timeout=args.timeout,
                   heartbeat_interval=args.interval, progress_timeout=0, startup_timeout=600,
                   restart_scope="rank", max_restarts=ranks, backoff={"initial": 1000.0, "max": 1000.0})
    launcher = _StubLauncher()
    try:
        coordinator = Coordinator(spec, launcher=launcher, tune_gc=True)
    except TypeError:  # a --baseline checkout from before tune_gc
        coordinator = Coordinator(spec, launcher=launcher)
    rng = random.Random(0)
    units = list(range(args.relays)) if aggregated else list(range(ranks))
    if aggregated:
        frozen_relays = sorted(rng.sample(units, args.frozen_relays))
        others = [r for u in units if u not in frozen_relays for r in range(u * args.per_relay, (u + 1) * args.per_relay)]
        silent_ranks = sorted(rng.sample(others, args.silent))
        silent_units = frozen_relays
    else:
        silent_ranks, silent_units = [], sorted(rng.sample(units, args.silent))
    detected: dict[int, float] = {}
    result: dict = {"mode": args.mode, "ranks": ranks, "connections": len(units)}
    stalls: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        while launcher.started < ranks:
            await trio.sleep(0.05)
        token = launcher.requests[0].env["RANKWARDEN_TOKEN"]
        senders = []
        for k in range(args.senders):
            config = dict(mode=args.mode, address=coordinator.address, job=coordinator.job_id, token=token,
                          interval=args.interval, timeout=args.timeout, per_relay=args.per_relay,
                          units=units[k::args.senders], silent_units=silent_units, silent_ranks=silent_ranks,
                          tail=args.tail, progress_interval=args.progress_interval, count_from=args.warmup, count_until=args.warmup + args.window)
            process = await trio.lowlevel.open_process(
                [sys.executable, __file__, "--send", json.dumps(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            senders.append(process)
        connect_started = time.perf_counter()
        buffers = [b""] * len(senders)

        async def read_line(i: int) -> str:
            while b"\n" not in buffers[i]:
                data = await senders[i].stdout.receive_some(1 << 20)
                if not data:
                    raise RuntimeError(f"sender {i} ended early")
                buffers[i] += data
            line, buffers[i] = buffers[i].split(b"\n", 1)
            return line.decode()

        for i in range(len(senders)):
            with trio.fail_after(600):
                assert await read_line(i) == "ready"
        with trio.move_on_after(60):
            while sum(1 for r in coordinator.snapshot().ranks if r.heartbeat_age is not None) < ranks:
                await trio.sleep(0.2)
        result["connect_s"] = time.perf_counter() - connect_started
        connected = sum(1 for r in coordinator.snapshot().ranks if r.heartbeat_age is not None)
        result["connected"] = connected
        go = time.time() + 0.2
        silence_after = max(args.history, args.warmup + args.window) + 1.0
        for process in senders:
            await process.stdin.send_all(f"go {go} {silence_after}\n".encode())

        async def watch() -> None:
            async for event in coordinator.events():
                if isinstance(event, RankFailed):
                    detected[event.rank] = event.failure.detected_at

        async def monitor_stalls() -> None:
            while True:
                before = trio.current_time()
                await trio.sleep(0.01)
                stalls.append(trio.current_time() - before - 0.01)

        nursery.start_soon(watch)
        nursery.start_soon(monitor_stalls)

        def received() -> int:
            return sum(r.step or 0 for r in coordinator.snapshot().ranks)

        await trio.sleep_until(trio.current_time() + (go - time.time()) + args.warmup)
        cpu0, wall0, steps0, frames0, stalls0 = _cpu(), time.perf_counter(), received(), frames[0], len(stalls)
        await trio.sleep(args.window)
        cpu1, wall1, steps1, frames1 = _cpu(), time.perf_counter(), received(), frames[0]
        window_stalls = stalls[stalls0:]
        elapsed = wall1 - wall0
        result["cpu_percent"] = 100 * (cpu1 - cpu0) / elapsed
        result["heartbeats_per_s"] = (steps1 - steps0) / elapsed
        result["frames_per_s"] = (frames1 - frames0) / elapsed if aggregated else result["heartbeats_per_s"]
        result["nominal_per_s"] = ranks / args.interval
        result["cpu_us_per_heartbeat"] = 1e6 * (cpu1 - cpu0) / max(1, steps1 - steps0)
        result["cpu_us_per_frame"] = 1e6 * (cpu1 - cpu0) / max(1, (frames1 - frames0) if aggregated else steps1 - steps0)
        result["stall_max_ms"] = 1000 * max(window_stalls, default=0.0)
        result["stall_p99_ms"] = 1000 * _p99(window_stalls) if window_stalls else 0.0
        await trio.sleep_until(trio.current_time() + (go + args.history - time.time()))
        result["rss_mib"] = _rss_mib()
        result["rss_at_s"] = time.time() - go
        # The CPU the failures cost: one second around the moment the silenced ranks
        # are due (timeout after the silence), less what that second costs in steady state.
        due = go + silence_after + args.timeout
        await trio.sleep_until(trio.current_time() + max(0.0, due - 0.3 - time.time()))
        cpu_a = _cpu()
        await trio.sleep(1.0)
        result["failure_second_cpu_ms"] = 1000 * (_cpu() - cpu_a)
        result["failed_in_second"] = len(detected)
        outputs = []
        for i, process in enumerate(senders):
            outputs.append(json.loads(await read_line(i)))
            await process.wait()
        result["sent_per_s"] = sum(o["frames_per_s"] for o in outputs)
        result["stall_max_all_ms"] = 1000 * max(stalls, default=0.0)
        coordinator.stop(force=True)
        await coordinator.wait()
        nursery.cancel_scope.cancel()
    last_sent: dict[str, float] = {}
    named: dict[str, float] = {}
    for o in outputs:
        last_sent.update(o["last_sent"])
        named.update(o["named"])
    if aggregated:
        by_rank = {r: last_sent[str(r)] for r in silent_ranks if str(r) in last_sent}
        result["rank_latencies"] = [detected[r] - t for r, t in by_rank.items() if r in detected]
        result["rank_silent"] = len(by_rank)
        # Split: the simulated relay's own lateness in naming (a loaded sender process) vs the coordinator's part.
        result["relay_late"] = [named[str(r)] - (t + args.timeout) for r, t in by_rank.items() if str(r) in named]
        result["coordinator_part"] = [detected[r] - named[str(r)] for r in by_rank if r in detected and str(r) in named]
        relay_latencies = []
        for u in silent_units:
            t = last_sent.get(f"relay{u}")
            for r in range(u * args.per_relay, (u + 1) * args.per_relay):
                if t is not None and r in detected:
                    relay_latencies.append(detected[r] - t)
        result["relay_latencies"] = relay_latencies
        result["relay_silent"] = len(silent_units) * args.per_relay
        expected = set(silent_ranks) | {r for u in silent_units for r in range(u * args.per_relay, (u + 1) * args.per_relay)}
    else:
        latencies = [detected[u] - last_sent[str(u)] for u in silent_units if str(u) in last_sent and u in detected]
        result["rank_latencies"] = latencies
        result["rank_silent"] = len(silent_units)
        expected = set(silent_units)
    #: Ranks failed that were never silenced: the coordinator fell behind and misjudged them.
    result["false_failures"] = len(set(detected) - expected)
    return result


# -- the API server's log copier, alone ---------------------------------------------------------------------


async def log_copier_main(ranks: int, seconds: float) -> dict:
    from rankwarden.api._logs import LogCopier
    from rankwarden.coordinator._jobdir import JobDir

    root = tempfile.mkdtemp(prefix="rw-scale-logs-")
    job_dir = JobDir(os.path.join(root, "job"))
    for rank in range(ranks):
        for path in job_dir.log_paths(rank, 1):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    copier = LogCopier(job_dir, job_dir.path / "logs.jsonl")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(copier.run, lambda: [(r, 1) for r in range(ranks)])
        await trio.sleep(2.0)
        cpu0, wall0 = _cpu(), time.perf_counter()
        await trio.sleep(seconds)
        cpu1, wall1 = _cpu(), time.perf_counter()
        nursery.cancel_scope.cancel()
    return {"ranks": ranks, "cpu_percent": 100 * (cpu1 - cpu0) / (wall1 - wall0)}


# -- the driver ----------------------------------------------------------------------------------------------


def _child(argv: list[str], checkout: str | None = None) -> dict | None:
    env = dict(os.environ, RANKWARDEN_BENCH_CHECKOUT=checkout) if checkout else None
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"{' '.join(argv)} failed:\n{out.stderr[-2000:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _latency(values: list[float], silent: int) -> str:
    if not values:
        return f"detected 0/{silent}"
    ordered = sorted(values)
    return (f"p50 {ordered[len(ordered) // 2]:.3f}s p99 {_p99(values):.3f}s max {ordered[-1]:.3f}s "
            f"(n={len(values)} of {silent} silent)")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--send":
        sender(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows; RSS is read before the history fills")
    parser.add_argument("--ranks", type=int, nargs="*", default=[1024, 4096], help="per-rank modes")
    parser.add_argument("--relays", type=int, default=1250)
    parser.add_argument("--per-relay", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=2.0, help="heartbeat_timeout")
    parser.add_argument("--interval", type=float, default=0.1, help="heartbeat_interval (and the relays' beat)")
    parser.add_argument("--progress-interval", type=float, default=1.0,
                        help="how often a relay's beat carries its ranks' progress (Relay's progress_interval)")
    parser.add_argument("--senders", type=int, default=2, help="processes simulating the peers")
    parser.add_argument("--silent", type=int, default=100, help="ranks silenced in each mode")
    parser.add_argument("--frozen-relays", type=int, default=13, help="relays silenced in the aggregated mode")
    parser.add_argument("--log-copier", type=int, nargs="*", default=[1024, 10000],
                        help="rank counts for the log copier alone")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also run the per-rank modes with the rankwarden of this checkout (e.g. /path/to/main)")
    parser.add_argument("--coordinator", choices=["per-rank", "aggregated"], help=argparse.SUPPRESS)
    parser.add_argument("--copier", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=float, default=20.0, help=argparse.SUPPRESS)
    parser.add_argument("--history", type=float, default=RATE_WINDOW + 5.0, help=argparse.SUPPRESS)
    parser.add_argument("--tail", type=float, default=3.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.coordinator:
        logging.basicConfig(level=logging.ERROR)  # a warning per frozen rank is expected, not news
        args.mode = args.coordinator
        print(json.dumps(trio.run(coordinator_main, args)))
        return 0
    if args.copier:
        print(json.dumps(trio.run(log_copier_main, args.copier, args.window)))
        return 0
    timing = ["--warmup", "3", "--window", "6", "--history", "12"] if args.quick else []
    common = ["--timeout", str(args.timeout), "--progress-interval", str(args.progress_interval), "--interval", str(args.interval), "--senders", str(args.senders),
              "--silent", str(args.silent), *timing]
    rate = 1 / args.interval
    history = "12 s, before the 30 s step-rate history fills (--quick)" if args.quick else f"{RATE_WINDOW + 5:g} s"
    print(f"# coordinator scale: heartbeats at {rate:g} Hz, heartbeat_timeout {args.timeout:g}s, "
          f"{os.cpu_count()} CPUs (the {args.senders} sender processes share them), RSS read at {history}, "
          f"{time.strftime('%Y-%m-%d')}")
    rows = []
    for ranks in args.ranks:
        rows.append(_child(["--coordinator", "per-rank", "--ranks", str(ranks), *common]))
        if args.baseline:
            row = _child(["--coordinator", "per-rank", "--ranks", str(ranks), *common], args.baseline)
            if row is not None:
                row["mode"] = "baseline"
            rows.append(row)
    if args.relays:
        rows.append(_child(["--coordinator", "aggregated", "--relays", str(args.relays), "--per-relay",
                            str(args.per_relay), "--frozen-relays", str(args.frozen_relays), *common]))
    rows = [r for r in rows if r is not None]
    for r in rows:
        shape = f"{r['ranks']:6,} ranks" + (f" ({r['connections']:,} relays)" if r["mode"] == "aggregated" else "")
        per = (f"{r['cpu_us_per_heartbeat']:.1f} us per rank heartbeat, {r['cpu_us_per_frame']:.1f} us per frame"
               if r["mode"] == "aggregated" else f"{r['cpu_us_per_heartbeat']:.1f} us per heartbeat")
        print(f"{r['mode']:>10} {shape}: coordinator CPU {r['cpu_percent']:5.1f}% of one core, {per}; "
              f"received {r['heartbeats_per_s']:,.0f} rank heartbeats/s of {r['nominal_per_s']:,.0f} nominal"
              + (f" in {r['frames_per_s']:,.0f} frames/s" if r["mode"] == "aggregated" else "")
              + f" (senders sent {r['sent_per_s']:,.0f} frames/s); RSS {r['rss_mib']:.0f} MiB at {r['rss_at_s']:.0f} s; "
              f"loop stall max {r['stall_max_ms']:.0f} ms (p99 {r['stall_p99_ms']:.0f} ms; whole run "
              f"{r['stall_max_all_ms']:.0f} ms); {r['connected']:,}/{r['ranks']:,} connected in {r['connect_s']:.1f} s; "
              f"ranks failed that were never silenced: {r['false_failures']}")
        what = "frozen rank, named by its relay" if r["mode"] == "aggregated" else "silent rank"
        print(f"{'':>10}   detection of a {what}: {_latency(r['rank_latencies'], r['rank_silent'])}; "
              f"goal <= {args.timeout + args.interval:.1f}s (timeout + one interval)")
        if r["mode"] == "aggregated" and r["coordinator_part"]:
            print(f"{'':>10}     of which the simulated relay named it late by p99 {_p99(r['relay_late']):.3f}s "
                  f"(a starved sender process), and the coordinator took p99 {_p99(r['coordinator_part']):.3f}s "
                  f"max {max(r['coordinator_part']):.3f}s from the RelaySilent sent to the failure")
        if r["mode"] == "aggregated":
            print(f"{'':>10}   detection of a frozen relay's ranks: {_latency(r['relay_latencies'], r['relay_silent'])}")
        if "failure_second_cpu_ms" in r:
            print(f"{'':>10}   coordinator CPU in the second around the failures of {r['failed_in_second']} ranks: "
                  f"{r['failure_second_cpu_ms']:.0f} ms (a steady second: {10 * r['cpu_percent']:.0f} ms)")
    for r in rows:
        old = next((b for b in rows if b["mode"] == "baseline" and b["ranks"] == r["ranks"]), None)
        if r["mode"] == "per-rank" and old is not None:
            print(f"per-rank {r['ranks']:,} vs baseline: CPU {r['cpu_percent'] / old['cpu_percent']:.2f}x, "
                  f"per heartbeat {r['cpu_us_per_heartbeat'] / old['cpu_us_per_heartbeat']:.2f}x, "
                  f"RSS {r['rss_mib'] / old['rss_mib']:.2f}x, worst stall {r['stall_max_ms']:.0f} vs "
                  f"{old['stall_max_ms']:.0f} ms")
    base = next((r for r in rows if r["mode"] == "per-rank"), None)
    agg = next((r for r in rows if r["mode"] == "aggregated"), None)
    if base and agg:
        print(f"aggregated vs per-rank {base['ranks']:,}: {agg['ranks'] / base['ranks']:.1f}x the ranks at "
              f"{agg['cpu_percent'] / base['cpu_percent']:.2f}x the CPU; CPU per rank heartbeat "
              f"{agg['cpu_us_per_heartbeat'] / base['cpu_us_per_heartbeat']:.2f}x; RSS per rank "
              f"{(agg['rss_mib'] / agg['ranks']) / (base['rss_mib'] / base['ranks']):.2f}x")
    for ranks in args.log_copier:
        c = _child(["--copier", str(ranks), "--window", "5" if args.quick else "10"])
        if c is None:
            continue
        print(f"API server log copier alone, {ranks:,} idle ranks: {c['cpu_percent']:.1f}% of one core "
              "(add it to a coordinator's figure when the API server runs the job)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
