"""The dashboard in a real headless Chromium: log in, submit, watch a rank die and a rank freeze, stop.

Skipped, with the reason printed, where Chromium and its driver are not
installed (`.ci/run` installs them). With RANKWARDEN_UPDATE_SCREENSHOT=1 the
test also saves the job view it sees mid-run to docs/dashboard.png.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time

import httpx
import pytest
import trio

from rankwarden.api import ServerConfig, Template, serve_api

from ._browser import browser, missing
from .conftest import JOB_PREFIX, SCRIPTS
from .test_api import TOKEN, WORKER

pytestmark = [pytest.mark.skipif(missing() is not None, reason=f"browser tests skipped: {missing()}"),
              pytest.mark.timeout(240)]
SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "dashboard.png")
TEMPLATE = Template(entrypoint=WORKER, max_world_size=2,
                    args=["--steps", "100000", "--step-time", "0.05", "--graceful"])


@contextlib.asynccontextmanager
async def server(tmp_path):
    stop = trio.Event()
    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[os.path.join(SCRIPTS, "*")],
                          templates={"train": TEMPLATE})
    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(serve_api, config, port=0, token=TOKEN, shutdown=stop))
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as api:
            yield url, api
        stop.set()


async def cross_site_page(task_status=trio.TASK_STATUS_IGNORED, *, target: str):
    """Another site (http://localhost:PORT, not 127.0.0.1) whose page posts a form to the API."""
    page = (f'<!doctype html><form id="f" method="POST" action="{target}"><input name="x" value="1"></form>'
            '<script>document.getElementById("f").submit()</script>').encode()

    async def answer(stream):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(page), page))
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(answer, listeners)


def events_of(tmp_path, job_id, kind):
    """The job's events of one type so far, from its events.jsonl."""
    with open(tmp_path / "state" / "jobs" / job_id / "events.jsonl") as f:
        return [e for line in f if line.endswith("\n") and (e := json.loads(line))["type"] == kind]


async def test_the_dashboard_in_chromium(tmp_path):
    job_id = f"{JOB_PREFIX}dash"
    async with server(tmp_path) as (url, api), browser() as b, trio.open_nursery() as nursery:
        # Before login: a login form and nothing else.
        await b.get(url + "/")
        await b.wait_for("return !document.getElementById('login').hidden", what="the login form")
        assert await b.js("return document.getElementById('jobs').hidden && document.getElementById('job').hidden")
        assert await b.js("return (await fetch('/jobs')).status") == 401

        # A wrong token is refused; the right one logs in.
        await b.js("document.getElementById('token').value = arguments[0];"
                   "document.getElementById('login-form').requestSubmit()", "wrong-token-0123456789")
        await b.wait_for("return document.getElementById('login-error').textContent", what="the login error")
        assert await b.js("return document.cookie") == ""  # HttpOnly: invisible to scripts
        await b.js("document.getElementById('token').value = arguments[0];"
                   "document.getElementById('login-form').requestSubmit()", TOKEN)
        await b.wait_for("return !document.getElementById('jobs').hidden", what="the jobs list")

        # Submit a 2-rank job from the operator's template.
        await b.wait_for("return document.getElementById('template').options.length === 1", what="the templates")
        await b.js("document.getElementById('submit').open = true;"
                   "document.getElementById('submit-job-id').value = arguments[0];"
                   "document.getElementById('submit-world').value = '2';"
                   "document.getElementById('submit-form').requestSubmit()", job_id)
        await b.wait_for("return location.hash === '#/job/' + arguments[0]", job_id, what="the job view")

        # The step advances live, without a reload.
        step = "return parseInt(document.querySelector('[data-fact=step]')?.textContent) || 0"
        first = await b.wait_for(step, what="a first step")
        await b.wait_for(step.replace("|| 0", "> arguments[0]"), first, what="the step advancing")
        await b.wait_for("return document.querySelectorAll('#ranks .rank[data-state=running]').length === 2")
        await b.wait_for("return document.querySelector('#charts [data-chart=loss] canvas')", what="a loss chart")

        # SIGKILL rank 1: the failure is on the timeline and the rank grid within 2 s of the coordinator's event.
        summary = (await api.get(f"/jobs/{job_id}/summary")).json()
        os.kill(summary["ranks"][1]["pid"], signal.SIGKILL)
        await b.wait_for("return document.querySelector('#timeline li[data-type=rank_failed]') && "
                         "document.querySelector('#ranks .rank[data-rank=\"1\"]').dataset.failures === '1'",
                         what="the failure on the page")
        seen = time.time()
        (failed,) = events_of(tmp_path, job_id, "rank_failed")
        assert failed["failure"]["cause"] == "signaled" and failed["failure"]["rank"] == 1
        assert seen - failed["time"] < 2.0, f"the page showed the failure {seen - failed['time']:.2f} s after it"
        assert "signaled" in await b.js("return document.querySelector('#timeline li[data-type=rank_failed]').textContent")

        # The log follows the restart: a marker, then the new attempt's lines.
        await b.wait_for("const log = document.getElementById('log').textContent;"
                         "const at = log.indexOf('attempt 2 (restarted)');"
                         "return at >= 0 && /rank 1 ready/.test(log.slice(at))", what="the restarted attempt's log")
        await b.wait_for(step.replace("|| 0", "> 3"), what="progress after the restart")

        # A frozen rank turns red before the coordinator acts (heartbeat_timeout 5 s: red past 2.5 s).
        summary = (await api.get(f"/jobs/{job_id}/summary")).json()
        os.kill(summary["ranks"][0]["pid"], signal.SIGSTOP)
        frozen_at = time.time()
        await b.wait_for("return document.querySelector('#ranks .rank.bad[data-rank=\"0\"]')", what="rank 0 red",
                         timeout=8)
        red_after = time.time() - frozen_at
        timeouts = [e for e in events_of(tmp_path, job_id, "rank_failed")
                    if e["failure"]["cause"] == "heartbeat_timeout"]
        assert not timeouts and red_after < 4.5, (red_after, timeouts)
        await b.wait_for("return [...document.querySelectorAll('#timeline li[data-type=rank_failed]')]"
                         ".some(li => li.textContent.includes('heartbeat_timeout'))", what="the heartbeat timeout")
        await b.wait_for("return document.getElementById('log').textContent.includes('attempt 3 (restarted)')")
        await b.wait_for(step.replace("|| 0", "> 3"), what="progress after the second restart")
        await b.wait_for("return document.querySelectorAll('#ranks .rank.bad').length === 0", what="a healthy grid")
        # The charts take points live, as they come.
        points = "return window.rankwardenCharts.time.length"
        await b.wait_for(points.replace("length", "length > arguments[0]"), await b.js(points), what="new points")
        await b.wait_for(step.replace("|| 0", "> 60"), what="a longer run for the screenshot")
        await b.wait_for("return document.querySelectorAll('#charts canvas').length >= 3")
        shot = await b.screenshot()
        assert shot.startswith(b"\x89PNG")
        if os.environ.get("RANKWARDEN_UPDATE_SCREENSHOT") == "1":
            os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
            with open(SCREENSHOT, "wb") as f:
                f.write(shot)

        # A fetch with the cookie but without the X-Rankwarden header is refused...
        assert await b.js(f"return (await fetch('/jobs/{job_id}/stop', {{method: 'POST'}})).status") == 403
        # ...and a form on another site cannot stop the job (SameSite=Strict: no cookie goes with it).
        port = await nursery.start(functools.partial(cross_site_page, target=f"{url}/jobs/{job_id}/stop"))
        await b.get(f"http://localhost:{port}/")
        await b.wait_for("return location.href.endsWith('/stop') && document.body.textContent.includes('error')",
                         what="the cross-site POST's answer")
        assert "missing or wrong bearer token" in await b.js("return document.body.textContent")
        assert (await api.get(f"/jobs/{job_id}")).json()["state"] == "running"
        nursery.cancel_scope.cancel()

        # Stop, with confirmation.
        await b.get(f"{url}/#/job/{job_id}")
        await b.wait_for("return !document.getElementById('stop').disabled", what="the stop button")
        await b.js("document.getElementById('stop').click()")
        assert await b.js("return !document.getElementById('confirm').hidden")
        await b.js("document.getElementById('confirm-yes').click()")
        await b.wait_for("return document.getElementById('job-state').textContent === 'stopped'",
                         what="the job stopped", timeout=30)
        assert (await api.get(f"/jobs/{job_id}")).json()["state"] == "stopped"
        await b.wait_for("return [...document.querySelectorAll('#timeline li')].some(li => li.dataset.type === 'job_stopped')")

        # Log out: the session ends, the page asks for the token again.
        await b.js("document.getElementById('logout').click()")
        await b.wait_for("return !document.getElementById('login').hidden", what="the login form again")
        assert await b.js("return (await fetch('/jobs')).status") == 401
