"""The dashboard's cost: first paint with 1,000 finished jobs, and 8 live tabs on the server's CPU.

A real `rankwarden serve` process with 1,000 finished jobs in its database
(written straight into SQLite before it starts) and one running 2-rank job
that reports a loss every step.

1. First paint: a fresh headless Chromium logs in, then loads `/`; the page's
   first contentful paint and the moment its jobs table is filled (a
   `performance.mark`) are read from the browser's own clock, from
   navigation start. Repeated --loads times, median and worst reported.
2. Live updates: 8 job views of the running job (4 browsers x 2 windows: a
   browser keeps at most 6 HTTP/1.1 connections per server, and a job view
   holds 3 streams), every one visible. The server process's CPU time
   (utime + stime from /proc, ranks excluded) over --seconds is compared
   with the same window with no page open.

    python bench/dashboard.py [--jobs 1000] [--seconds 20] [--loads 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import trio

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from rankwarden.api._db import JobDB  # noqa: E402
from rankwarden.api._schema import JobRequest  # noqa: E402
from tests._browser import browser, missing  # noqa: E402

TOKEN = "bench-dashboard-token-0123456789abcdef"
WORKER = os.path.join(ROOT, "tests", "scripts", "worker.py")
TICK = os.sysconf("SC_CLK_TCK")


def seed(state: str, count: int) -> None:
    db = JobDB(os.path.join(state, "jobs.sqlite3"))
    try:
        for i in range(count):
            job_id = f"done-{i:05d}"
            request = JobRequest(entrypoint=WORKER, args=["--steps", "100"], world_size=2, job_id=job_id,
                                 total_steps=100)
            db.insert_now(job_id, request, "pending")
            db.update_now(job_id, state=("succeeded", "failed", "stopped")[i % 3], attempt=1 + i % 3,
                          restarts=i % 3, reason="seeded by bench/dashboard.py")
    finally:
        db.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


async def login(b, url: str) -> None:
    await b.get(url + "/")
    status = await b.js("return (await fetch('/login', {method: 'POST', headers: {'X-Rankwarden': '1', "
                        "'Content-Type': 'application/json'}, body: JSON.stringify({token: arguments[0]})})).status",
                        TOKEN)
    assert status == 200, status


async def first_paint(url: str, loads: int) -> dict:
    fcp, table = [], []
    async with browser() as b:
        await login(b, url)
        await b.get(url + "/")  # warm: the assets are cached by nothing (no-store), the connection is
        for _ in range(loads):
            await b.get(url + "/?" + str(time.time()))
            await b.wait_for("return performance.getEntriesByName('rankwarden:jobs').length", timeout=30)
            fcp.append(await b.wait_for("const p = performance.getEntriesByType('paint')"
                                        ".find(e => e.name === 'first-contentful-paint'); return p && p.startTime",
                                        timeout=10, what="the first contentful paint"))
            table.append(await b.js("return performance.getEntriesByName('rankwarden:jobs')[0].startTime"))
            rows = await b.js("return document.querySelectorAll('#jobs-table tbody tr').length")
            assert rows == 200, rows
    return {"fcp_ms": fcp, "table_ms": table}


async def measure(pid: int, seconds: float) -> float:
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    await trio.sleep(seconds)
    return (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)


async def live_tabs(url: str, job_id: str, pid: int, seconds: float, browsers: int = 4, windows: int = 2) -> dict:
    async with contextlib.AsyncExitStack() as stack:
        visible = []
        for _ in range(browsers):
            b = await stack.enter_async_context(browser())
            await login(b, url)
            for w in range(windows):
                if w:
                    await b.new_window()
                await b.get(f"{url}/#/job/{job_id}")
                await b.wait_for("return window.rankwardenCharts && window.rankwardenCharts.time.length > 0",
                                 timeout=30)
                visible.append(await b.js("return document.visibilityState"))
        # Every view is live: its step moves.
        await trio.sleep(2)
        busy = await measure(pid, seconds)
    return {"cpu": busy, "visible": visible}


async def main_async(args) -> dict:
    state = tempfile.mkdtemp(prefix="rw-dash-bench-")
    seed(state, args.jobs)
    env = dict(os.environ, RANKWARDEN_API_TOKEN=TOKEN)
    server = await trio.lowlevel.open_process(
        [sys.executable, "-m", "rankwarden", "serve", "--port", "0", "--state-dir", state,
         "--allow", os.path.join(ROOT, "tests", "scripts", "*")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    seen = b""
    while not (match := re.search(rb"on (http://\S+)", seen)):
        seen += await server.stdout.receive_some(4096)
    url = match.group(1).decode()
    result: dict = {}
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as api:
            result["paint"] = await first_paint(url, args.loads)
            body = {"entrypoint": WORKER, "args": ["--steps", "1000000", "--step-time", "0.02"], "world_size": 2,
                    "job_id": "bench-live", "checkpoint": False, "heartbeat_timeout": 10}
            assert (await api.post("/jobs", json=body)).status_code == 201
            while (await api.get("/jobs/bench-live/summary")).json()["step"] is None:
                await trio.sleep(0.2)
            await trio.sleep(2)
            result["idle_cpu"] = await measure(server.pid, args.seconds)
            result["live"] = await live_tabs(url, "bench-live", server.pid, args.seconds)
            await api.post("/jobs/bench-live/stop")
    finally:
        server.terminate()
        await server.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    if (why := missing()) is not None:
        sys.exit(f"bench/dashboard.py needs Chromium: {why}")
    r = trio.run(main_async, args)
    fcp, table = r["paint"]["fcp_ms"], r["paint"]["table_ms"]
    extra = r["live"]["cpu"] - r["idle_cpu"]
    print(f"first paint, {args.jobs} finished jobs in the database ({args.loads} loads):")
    print(f"  first contentful paint: median {statistics.median(fcp):.0f} ms, worst {max(fcp):.0f} ms")
    print(f"  jobs table filled (200 rows): median {statistics.median(table):.0f} ms, worst {max(table):.0f} ms"
          f"  [target < 1000 ms: {'ok' if max(table) < 1000 else 'MISSED'}]")
    print(f"server CPU, one running 2-rank job, over {args.seconds:.0f} s:")
    print(f"  no page open:          {r['idle_cpu'] * 100:.2f} % of a core")
    print(f"  8 live job views:      {r['live']['cpu'] * 100:.2f} % of a core "
          f"(visibility: {', '.join(sorted(set(r['live']['visible'])))})")
    print(f"  cost of the 8 views:   {extra * 100:.2f} % of a core  [target < 5 %: {'ok' if extra < 0.05 else 'MISSED'}]")


if __name__ == "__main__":
    main()
