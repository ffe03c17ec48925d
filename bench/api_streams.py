"""API streams under load: 100 SSE subscribers on one job's log stream at ~2,000 lines/s.

A real `rankwarden serve` process runs a 2-rank job whose ranks print
timestamped lines at --rate lines/s in total. 100 clients (one process, one
Trio loop) follow the log stream from the start to its end; every line is
counted, and one in --sample lines is timed from the rank's print to the
client's receipt. Meanwhile one client hammers GET /jobs/{id}/summary.

    python bench/api_streams.py [--subscribers 100] [--rate 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import trio

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "bench-token"


async def main_async(args) -> dict:
    state = tempfile.mkdtemp(prefix="rw-api-bench-")
    env = dict(os.environ, RANKWARDEN_API_TOKEN=TOKEN)
    server = await trio.lowlevel.open_process(
        [sys.executable, "-m", "rankwarden", "serve", "--port", "0", "--state-dir", state, "--allow", os.path.join(HERE, "*"),
         "--limit", f"max_client_requests={args.subscribers + 20}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    seen = b""
    while not (match := re.search(rb"on (http://\S+)", seen)):
        seen += await server.stdout.receive_some(4096)
    url = match.group(1).decode()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    result: dict = {}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60,
                                     limits=httpx.Limits(max_connections=args.subscribers + 10)) as client:
            body = {"entrypoint": os.path.join(HERE, "_printer.py"), "args": [str(args.rate / 2), str(args.seconds)],
                    "world_size": 2, "job_id": "bench-streams", "checkpoint": False, "heartbeat_timeout": 10}
            assert (await client.post("/jobs", json=body)).status_code == 201
            counts, latencies, summaries = [], [], []

            async def subscriber(index: int) -> None:
                # Counts events in the raw bytes (decoding 2,000 lines/s per client in Python
                # would measure the clients); times one line in --sample (subscriber 0: all).
                lines, buffer = 0, b""
                async with client.stream("GET", "/jobs/bench-streams/logs/stream") as response:
                    async with contextlib.aclosing(response.aiter_raw()) as stream:
                        async for chunk in stream:
                            buffer += chunk
                            *events, buffer = buffer.split(b"\n\n")
                            now = time.time()
                            for event in events:
                                if b"event: end" in event:
                                    counts.append(lines)
                                    return
                                if b"\ndata: " not in event:
                                    continue
                                lines += 1
                                if index == 0 or lines % args.sample == 0:
                                    text = json.loads(event.split(b"\ndata: ", 1)[1])["line"].split()
                                    if len(text) == 3 and text[1] != "done":
                                        latencies.append(now - float(text[2]))
                counts.append(lines)

            async def hammer() -> None:
                done = 0
                start = time.perf_counter()
                while time.perf_counter() - start < args.seconds * 0.8:
                    await client.get("/jobs/bench-streams/summary")
                    done += 1
                summaries.append(done / (time.perf_counter() - start))

            async with trio.open_nursery() as nursery:
                for i in range(args.subscribers):
                    nursery.start_soon(subscriber, i)
                nursery.start_soon(hammer)
            produced = len((await client.get("/jobs/bench-streams/logs", params={"lines": 100000})).json()["lines"])
            result.update(produced=produced, counts=counts, latencies=sorted(latencies), summaries=summaries)
    finally:
        server.send_signal(signal.SIGTERM)
        await server.wait()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000.0, help="lines per second from the job in total")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sample", type=int, default=20, help="time one line in this many (subscriber 0 times all)")
    args = parser.parse_args()
    r = trio.run(main_async, args)
    lat = r["latencies"]
    lost = [r["produced"] - c for c in r["counts"]]
    print(f"# API streams: {args.subscribers} SSE subscribers, {args.rate:g} lines/s for {args.seconds:g}s, "
          f"{os.cpu_count()} CPUs (server, job and clients on the same CPUs), {time.strftime('%Y-%m-%d')}")
    print(f"lines produced {r['produced']}; every subscriber received {min(r['counts'])}..{max(r['counts'])}; "
          f"lines lost per subscriber: max {max(lost)}")
    print(f"delivery latency (print -> client) p50 {1000 * statistics.median(lat):.0f} ms, "
          f"p99 {1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.0f} ms, max {1000 * lat[-1]:.0f} ms ({len(lat)} timed)")
    print(f"GET /summary under load: {r['summaries'][0]:.0f} requests/s (one client, sequential)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
