"""API streams under load: 100 SSE subscribers on one job's log stream at ~2,000 lines/s.

A real `rankwarden serve` process runs a 2-rank job whose ranks print
`rank seq time` lines at --rate lines/s in total (the time taken as the line
is written). The subscribers run in a second process (one Trio loop, raw
HTTP/1.1, counting events in bytes) so that the clients' parsing
does not run inside the server being measured; both processes' CPU time is
reported, since on a small machine they still share the CPUs.

Measured, per line: delivery latency from the rank's write (the time in the
line) to the subscriber's receipt; every line of subscribers 0..--full-1 is
timed, and of the others the first line of every batch received (the one
that waited longest: a pessimistic sample). Lines lost are counted against what
the ranks printed (each rank writes its count to a file outside the server
when it exits), not against the server's own log, and subscribers 0..--full-1
check that every rank's lines arrive once each, in order. Meanwhile one
client polls GET /jobs/{id}/summary --summary-rate times a second and times it.

    python bench/api_streams.py [--subscribers 100] [--rate 2000] [--seconds 10]

To compare two checkouts, run it from a directory that holds no ``rankwarden``
package, with PYTHONPATH naming the checkout: ``python -m rankwarden`` puts the
current directory first on sys.path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import h11
import trio

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "bench-token"
JOB = "bench-streams"
LEAD = 2.0  # seconds the ranks wait before printing, so every subscriber is connected first
_LINE = re.compile(rb'"line":"(\d+) (\d+) ([0-9.]+)"')
_DONE = re.compile(rb'"line":"(\d+) done (\d+)"')


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# -- the client process ---------------------------------------------------------------------


async def _events(stream, conn):
    """The response's body, as it arrives."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 16))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200, event
        elif isinstance(event, h11.Data):
            yield bytes(event.data)
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return


async def clients(args) -> dict:
    host, port = re.match(r"http://([^:/]+):(\d+)", args.client).groups()
    port = int(port)
    connected = trio.Event()
    pending = [args.subscribers]
    result: dict = {"counts": [], "latencies": [], "order_errors": 0, "summary_latencies": []}

    async def subscriber(index: int) -> None:
        # Counts events in the raw bytes (decoding 2,000 lines/s for each of 100
        # clients in Python would measure the clients, and a client that falls
        # behind shows up as server latency); times and checks only some lines
        # (see the module docstring).
        full = index < args.full
        lines, buffer, greeted = 0, b"", False
        last = {}  # rank -> the last seq seen (full subscribers)
        # Raw bytes, not h11: the server sends each batch of whole events as one
        # HTTP chunk, so chunk-size lines never fall inside an event, and
        # counting needs no parsing.
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(f"GET /jobs/{JOB}/logs/stream HTTP/1.1\r\nHost: {host}:{port}\r\n"
                              f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode())
        async with stream:
            while data := await stream.receive_some(1 << 16):
                now = time.time()
                if not lines and not buffer:
                    assert data.startswith(b"HTTP/1.1 200"), data[:200]
                if not greeted and b": rankwarden stream" in data:
                    greeted = True
                    pending[0] -= 1
                    if not pending[0]:
                        connected.set()
                buffer += data
                cut = buffer.rfind(b"\n\n") + 2
                if not cut:
                    continue
                complete, buffer = buffer[:cut], buffer[cut:]
                lines += complete.count(b"\ndata: ") - complete.count(b"event: end\n")
                if full:
                    for rank, seq, sent in _LINE.findall(complete):
                        if int(seq) != last.get(rank, 0) + 1:
                            result["order_errors"] += 1
                        last[rank] = int(seq)
                        result["latencies"].append(now - float(sent))
                    for rank, seq in _DONE.findall(complete):
                        if int(seq) != last.get(rank, 0):
                            result["order_errors"] += 1
                elif first := _LINE.search(complete):
                    # The first line of the batch waited longest: a pessimistic sample.
                    result["latencies"].append(now - float(first.group(3)))
                if b"event: end" in complete:
                    break
        result["counts"].append(lines)

    async def poller() -> None:
        # A dashboard polling the summary at a steady rate over one keep-alive
        # connection. A client that polls as fast as the server answers would
        # take all the CPU it can get, and the stream latency would then measure it.
        await connected.wait()
        stream = await trio.open_tcp_stream(host, port)
        conn = h11.Connection(h11.CLIENT)
        start = time.perf_counter()
        async with stream:
            while (due := start + len(result["summary_latencies"]) / args.summary_rate) - start < args.seconds * 0.8:
                await trio.sleep_until(trio.current_time() + max(0.0, due - time.perf_counter()))
                sent = time.perf_counter()
                await stream.send_all(conn.send(h11.Request(method="GET", target=f"/jobs/{JOB}/summary", headers=[
                    ("Host", f"{host}:{port}"), ("Authorization", f"Bearer {TOKEN}")])))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                async for _ in _events(stream, conn):
                    pass
                result["summary_latencies"].append(time.perf_counter() - sent)
                conn.start_next_cycle()

    async with trio.open_nursery() as nursery:
        for i in range(args.subscribers):
            nursery.start_soon(subscriber, i)
        nursery.start_soon(poller)
        await connected.wait()
        result["connected_at"] = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu"] = usage.ru_utime + usage.ru_stime
    return result


# -- the measuring process ------------------------------------------------------------------


def measure(args) -> dict:
    state, printed = tempfile.mkdtemp(prefix="rw-api-bench-"), tempfile.mkdtemp(prefix="rw-api-printed-")
    env = dict(os.environ, RANKWARDEN_API_TOKEN=TOKEN)
    server = subprocess.Popen(
        [sys.executable, "-m", "rankwarden", "serve", "--port", "0", "--state-dir", state, "--allow", os.path.join(HERE, "*"),
         "--limit", f"max_client_requests={args.subscribers + 20}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        seen = b""
        while not (match := re.search(rb"on (http://\S+)", seen)):
            seen += server.stdout.read1(4096)
        url = match.group(1).decode()
        body = {"entrypoint": os.path.join(HERE, "_printer.py"),
                "args": [str(args.rate / 2), str(args.seconds), printed, str(LEAD)],
                "world_size": 2, "job_id": JOB, "checkpoint": False, "heartbeat_timeout": 10}
        submit = urllib.request.Request(f"{url}/jobs", data=json.dumps(body).encode(), method="POST", headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(submit) as response:
            assert response.status == 201, response.status
        cpu_before, wall_before = _cpu_seconds(server.pid), time.perf_counter()
        out_file = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads one while the sleeper below runs
        client = subprocess.Popen(
            [sys.executable, __file__, "--client", url, "--subscribers", str(args.subscribers),
             "--seconds", str(args.seconds), "--full", str(args.full),
             "--summary-rate", str(args.summary_rate)],
            stdout=out_file, text=True)
        # Meanwhile this (otherwise idle) process measures how late the machine
        # wakes a sleeper: the scheduling delay every process in the chain
        # (rank, server, client) pays on each hop, whatever the code does.
        overshoot = []
        while client.poll() is None:
            start = time.perf_counter()
            time.sleep(0.005)
            overshoot.append(time.perf_counter() - start - 0.005)
        assert client.returncode == 0, client.returncode
        server_cpu = _cpu_seconds(server.pid) - cpu_before
        wall = time.perf_counter() - wall_before
        out_file.seek(0)
        result = json.loads(out_file.read())
        result["server_cpu"], result["wall"], result["overshoot"] = server_cpu, wall, sorted(overshoot)
        result["printed"] = sum(int(open(os.path.join(printed, name)).read()) for name in os.listdir(printed))
        result["ranks_reported"] = len(os.listdir(printed))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(printed, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000.0, help="lines per second from the job in total")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--full", type=int, default=5, help="subscribers that time and check the order of every line")
    parser.add_argument("--summary-rate", type=float, default=20.0, help="GET /summary requests per second")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the subscribers against this URL
    args = parser.parse_args()
    if args.client:
        print(json.dumps(trio.run(clients, args)))
        return 0
    r = measure(args)
    lat = sorted(r["latencies"])
    lost = [r["printed"] - c for c in r["counts"]]
    print(f"# API streams: {args.subscribers} SSE subscribers (in a second process), {args.rate:g} lines/s for "
          f"{args.seconds:g}s, {os.cpu_count()} CPUs shared by server, ranks and clients, {time.strftime('%Y-%m-%d')}")
    print(f"lines printed by the ranks {r['printed']} ({r['ranks_reported']}/2 ranks reported); every subscriber "
          f"received {min(r['counts'])}..{max(r['counts'])}; lines lost per subscriber: max {max(lost)}; "
          f"out of order or repeated (subscribers 0..{min(args.full, args.subscribers) - 1}, every line checked): {r['order_errors']}")
    print(f"delivery latency (rank's write -> client) p50 {1000 * statistics.median(lat):.0f} ms, "
          f"p99 {1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.0f} ms, max {1000 * lat[-1]:.0f} ms ({len(lat)} timed)")
    # Not a measure of efficiency: the server sends smaller batches more often
    # when it gets more CPU, so it takes what the machine leaves it.
    print(f"CPU over {r['wall']:.1f} s: server {r['server_cpu']:.1f} s ({100 * r['server_cpu'] / r['wall']:.0f}% of a core), "
          f"clients {r['cpu']:.1f} s ({100 * r['cpu'] / r['wall']:.0f}%); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    late = r["overshoot"]
    print(f"machine: a 5 ms sleep in an idle process wakes late by p50 {1000 * statistics.median(late):.1f} ms, "
          f"p99 {1000 * late[int(0.99 * len(late))]:.1f} ms, max {1000 * late[-1]:.1f} ms (the delay each hop pays "
          f"for a CPU: compare before blaming the server)")
    slat = sorted(r["summary_latencies"])
    print(f"GET /summary under load ({args.summary_rate:g}/s, one keep-alive connection): p50 "
          f"{1000 * statistics.median(slat):.1f} ms, p99 {1000 * slat[min(len(slat) - 1, int(0.99 * len(slat)))]:.1f} ms "
          f"({len(slat)} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
