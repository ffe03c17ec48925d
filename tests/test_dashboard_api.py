"""The dashboard's server side over HTTP: browser sessions, metrics series, their stream and gauges."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import trio

from rankwarden.api._metrics_store import CAPACITY, MetricsRecorder, MetricsSeries, load_series

from .test_api import LIMIT, TOKEN, api, job, read_sse, wait_state  # noqa: F401 (api is a fixture)

BROWSER = {"X-Rankwarden": "1"}


def browser(api) -> httpx.AsyncClient:
    """A client with no bearer token: what a browser's page is."""
    return httpx.AsyncClient(base_url=str(api.base_url), timeout=30)


async def login(client, token=TOKEN):
    return await client.post("/login", json={"token": token}, headers=BROWSER)


async def test_nothing_but_the_page_and_login_is_public(api):
    async with browser(api) as anonymous:
        page = await anonymous.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert TOKEN not in page.text
        assert (await anonymous.get("/assets/app.js")).status_code == 200
        assert (await anonymous.get("/assets/vendor/uPlot.iife.min.js")).status_code == 200
        assert (await anonymous.get("/assets/..%2F_app.py")).status_code == 404
        assert (await anonymous.get("/assets/vendor/README")).status_code == 404
        for path in ("/jobs", "/jobs/x/metrics", "/jobs/x/metrics/stream", "/templates", "/metrics"):
            assert (await anonymous.get(path)).status_code == 401, path
        assert (await anonymous.post("/logout", headers=BROWSER)).status_code == 401


async def test_login_sets_a_strict_httponly_cookie_that_works_until_logout(api):
    async with browser(api) as page:
        wrong = await login(page, "not-the-token")
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert (await page.post("/login", json={"token": TOKEN})).status_code == 403  # no X-Rankwarden header
        assert (await page.post("/login", json={"token": TOKEN}, headers={**BROWSER, "Origin": "http://evil.test"})
                ).status_code == 403
        response = await login(page)
        assert response.status_code == 200
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback; under TLS it is Secure
        assert TOKEN not in cookie
        assert (await page.get("/jobs")).status_code == 200
        # Reads need only the cookie; a state change also needs the header a cross-site form cannot send.
        body = job("dash-csrf", "--steps", "3")
        forged = await page.post("/jobs", json=body)
        assert forged.status_code == 403 and "X-Rankwarden" in forged.json()["error"]
        cross = await page.post("/jobs", json=body, headers={**BROWSER, "Origin": "http://localhost:1"})
        assert cross.status_code == 403
        assert (await page.post("/jobs", json=body, headers=BROWSER)).status_code == 201
        await wait_state(api, body["job_id"], "succeeded")
        assert (await page.post("/logout", headers=BROWSER)).status_code == 204
        assert (await page.get("/jobs")).status_code == 401
    # The session is over on the server too: the old cookie is refused if replayed.
    session = response.cookies["rankwarden_session"]
    async with httpx.AsyncClient(base_url=str(api.base_url), cookies={"rankwarden_session": session}) as replay:
        assert (await replay.get("/jobs")).status_code == 401
    assert (await api.get("/jobs")).status_code == 200  # the bearer token keeps working


async def test_metrics_series_stream_and_gauges(api):
    body = job("dash-metrics", "--steps", "100000", "--step-time", "0.01", total_steps=100000)
    assert (await api.post("/jobs", json=body)).status_code == 201
    job_id = body["job_id"]
    await wait_state(api, job_id, "running")
    with trio.fail_after(LIMIT):
        while len((series := (await api.get(f"/jobs/{job_id}/metrics")).json())["time"]) < 3:
            await trio.sleep(0.1)
    assert series["stride"] == 1 and series["step"] == sorted(series["step"])
    assert len(series["values"]["loss"]) == len(series["time"])
    loss, step = series["values"]["loss"][-1], series["step"][-1]
    assert 0 < loss <= 1.0 / max(1, step - 50)  # the worker reports loss = 1/step
    after = (await api.get(f"/jobs/{job_id}/metrics", params={"after": series["seq"][-1]})).json()
    assert all(s > series["seq"][-1] for s in after["seq"])

    # The stream sends points after Last-Event-ID, and a summary each second.
    events, _ = await read_sse(api, f"/jobs/{job_id}/metrics/stream?summary=1", last_event_id=series["seq"][-1],
                               stop_after=6)
    points = [e for _, e in events if "seq" in e]
    summaries = [e for _, e in events if "job_id" in e]
    assert points and all(p["seq"] > series["seq"][-1] and "loss" in p["values"] for p in points)
    assert summaries and summaries[0]["job_id"] == job_id

    text = (await api.get("/metrics")).text
    assert f'rankwarden_job_metric{{job="{job_id}",metric="loss"}} ' in text
    assert f'rankwarden_job_step{{job="{job_id}"}} ' in text
    assert f'rankwarden_job_eta_seconds{{job="{job_id}"}} ' in text

    assert (await api.post(f"/jobs/{job_id}/stop")).status_code == 202
    await wait_state(api, job_id, "stopped")
    # The stream of a finished job sends the rest and ends; the series survives in the job dir.
    _, ended = await read_sse(api, f"/jobs/{job_id}/metrics/stream")
    assert ended
    final = (await api.get(f"/jobs/{job_id}/metrics")).json()
    assert len(final["time"]) >= len(series["time"]) and final["latest"]["loss"] > 0
    openapi = (await api.get("/openapi.json")).json()
    assert "/jobs/{job_id}/metrics" in openapi["paths"] and "MetricsSeries" in openapi["components"]["schemas"]


class _Snap:
    def __init__(self, steps, loss):
        running = type("S", (), {"value": "running"})()
        self.ranks = [type("R", (), {"step": s, "metrics": {"loss": loss}, "state": running})() for s in steps]


def test_a_long_series_is_downsampled_and_resumable(tmp_path):
    state = {"step": 0}
    recorder = MetricsRecorder("t-down", lambda: _Snap([state["step"]] * 2, 1.0 / (state["step"] + 1)),
                               lambda: (2.0, 16.0), tmp_path / "metrics.json")
    seen_seq = 0
    for i in range(1, 20 * CAPACITY + 1):
        state["step"] = i
        assert recorder.sample(now=1000.0 + i)
        if i == 5 * CAPACITY:
            seen_seq = recorder.series.seq[-1]
    assert not recorder.sample(now=0)  # nothing moved: no point
    s = recorder.series
    assert CAPACITY // 2 <= len(s.time) < CAPACITY and s.stride == 32 and s.samples == 20 * CAPACITY
    assert s.time == sorted(s.time) and s.step == sorted(s.step) and s.seq == sorted(set(s.seq))
    assert all(len(column) == len(s.time) for column in s.values.values())
    assert s.values["steps_per_second"][-1] == 2.0 and s.latest["loss"] == pytest.approx(1.0 / (20 * CAPACITY + 1))
    newer = s.after(seen_seq)
    assert newer and newer[0]["seq"] > seen_seq and newer[-1]["seq"] == s.seq[-1]
    trio.run(recorder.finish)
    again = load_series(tmp_path / "metrics.json", "t-down")
    assert again is not None and again.seq == s.seq and again.values == s.values
    (tmp_path / "metrics.json").write_text(json.dumps({"job_id": "x", "time": [1.0], "step": []}))
    assert load_series(tmp_path / "metrics.json", "x") is None
    assert isinstance(MetricsSeries(job_id="y"), MetricsSeries)
    assert not os.path.exists(tmp_path / "metrics.tmp")
