"""The REST API over a real Hypercorn server on loopback (port 0), talked to with httpx."""

from __future__ import annotations

import contextlib
import functools
import json
import os

import httpx
import pytest
import trio

from rankwarden.api import ServerConfig, serve_api

from .conftest import JOB_PREFIX, SCRIPTS

WORKER = os.path.join(SCRIPTS, "worker.py")
TOKEN = "test-token-0123456789"
LIMIT = 60


@pytest.fixture
async def api(tmp_path):
    stop = trio.Event()
    config = ServerConfig(state_dir=str(tmp_path / "state"), allow=[os.path.join(SCRIPTS, "*")])
    async with trio.open_nursery() as nursery:
        url = await nursery.start(functools.partial(serve_api, config, port=0, token=TOKEN, shutdown=stop))
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
            yield client
        stop.set()


def job(name, *args, **fields):
    body = {"entrypoint": WORKER, "args": list(args), "world_size": 2, "job_id": f"{JOB_PREFIX}{name}",
            "heartbeat_timeout": 3.0, "checkpoint": False}
    body.update(fields)
    return body


async def wait_state(client, job_id, *states):
    # The test observes the server from outside, as a user would.
    with trio.fail_after(LIMIT):
        while (info := (await client.get(f"/jobs/{job_id}")).json())["state"] not in states:
            await trio.sleep(0.05)
    return info


async def read_sse(client, path, *, last_event_id=None, stop_after=None):
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events, ended = [], False
    with trio.fail_after(LIMIT):
        async with client.stream("GET", path, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            event_id, kind = None, ""
            async with contextlib.aclosing(response.aiter_lines()) as lines:
                async for line in lines:
                    if line.startswith("id: "):
                        event_id = int(line[4:])
                    elif line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind != "end":
                        events.append((event_id, json.loads(line[6:])))
                        if stop_after and len(events) == stop_after:
                            break
                    elif line == "" and kind == "end":
                        ended = True
                        break
    return events, ended


async def test_health_needs_no_token_and_everything_else_does(api):
    assert (await api.get("/health")).json()["status"] == "ok"
    anonymous = httpx.AsyncClient(base_url=str(api.base_url))
    wrong = httpx.AsyncClient(base_url=str(api.base_url), headers={"Authorization": "Bearer nope"})
    for client in (anonymous, wrong):
        async with client:
            for method, path in [("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/summaries"), ("GET", "/jobs/x"),
                                 ("GET", "/jobs/x/summary"), ("GET", "/jobs/x/logs"), ("GET", "/jobs/x/logs/stream"),
                                 ("GET", "/jobs/x/events/stream"), ("POST", "/jobs/x/stop"), ("DELETE", "/jobs/x"),
                                 ("POST", "/jobs/purge"), ("GET", "/metrics"), ("GET", "/openapi.json")]:
                response = await client.request(method, path)
                assert response.status_code == 401, (method, path)
                assert response.json()["error"] == "missing or wrong bearer token"


async def test_the_whole_job_lifecycle(api):
    body = job("api-life", "--steps", "100000", "--step-time", "0.01", total_steps=100000)
    created = await api.post("/jobs", json=body)
    assert created.status_code == 201 and created.json()["state"] == "pending"
    job_id = body["job_id"]
    await wait_state(api, job_id, "running")
    with trio.fail_after(LIMIT):
        while (summary := (await api.get(f"/jobs/{job_id}/summary")).json())["steps_per_second"] is None:
            await trio.sleep(0.1)
    assert summary["steps_per_second"] > 0 and summary["eta_seconds"] > 0 and len(summary["ranks"]) == 2
    listed = (await api.get("/jobs", params={"state": "running"})).json()
    assert [j["job_id"] for j in listed["jobs"]] == [job_id]
    assert [s["job_id"] for s in (await api.get("/jobs/summaries")).json()] == [job_id]
    assert (await api.delete(f"/jobs/{job_id}")).status_code == 409  # still running

    lines, _ = await read_sse(api, f"/jobs/{job_id}/logs/stream", stop_after=2)
    assert sorted(l["line"].split(" pid")[0] for _, l in lines) == ["rank 0 ready", "rank 1 ready"]
    assert (await api.post(f"/jobs/{job_id}/stop")).status_code == 202
    info = await wait_state(api, job_id, "stopped")
    assert info["reason"] == "stopped through the API"
    assert (await api.post(f"/jobs/{job_id}/stop")).status_code == 409
    tail = (await api.get(f"/jobs/{job_id}/logs", params={"lines": 1, "rank": 1})).json()["lines"]
    assert len(tail) == 1 and tail[0]["rank"] == 1

    events, ended = await read_sse(api, f"/jobs/{job_id}/events/stream")
    assert ended and events[-1][1]["type"] == "job_stopped"
    metrics = (await api.get("/metrics")).text
    assert 'rankwarden_jobs{state="stopped"} 1' in metrics

    deleted = await api.delete(f"/jobs/{job_id}")
    assert deleted.status_code == 200 and deleted.json()["job_id"] == job_id
    assert (await api.get(f"/jobs/{job_id}")).status_code == 404
    second = job("api-purge", "--steps", "3")
    await api.post("/jobs", json=second)
    await wait_state(api, second["job_id"], "succeeded")
    purged = (await api.post("/jobs/purge", json={"states": ["succeeded"]})).json()
    assert purged == {"purged": [second["job_id"]]}


async def test_sse_resume_with_last_event_id_returns_exactly_the_missed_events(api):
    body = job("api-sse", "--steps", "30", "--fail-rank", "1", "--fail-mode", "exit1")
    await api.post("/jobs", json=body)
    await wait_state(api, body["job_id"], "succeeded")
    path = f"/jobs/{body['job_id']}/events/stream"
    everything, ended = await read_sse(api, path)
    assert ended and [i for i, _ in everything] == list(range(1, len(everything) + 1))
    first, _ = await read_sse(api, path, stop_after=5)
    rest, _ = await read_sse(api, path, last_event_id=first[-1][0])
    assert first + rest == everything
    bad = await api.get(path, headers={"Last-Event-ID": "x1"})
    assert bad.status_code == 400


async def test_twenty_concurrent_sse_clients_all_receive_every_line(api):
    body = job("api-fanout", "--steps", "200", "--step-time", "0.005")
    await api.post("/jobs", json=body)
    results = []

    async def reader():
        lines, ended = await read_sse(api, f"/jobs/{body['job_id']}/logs/stream")
        results.append((ended, [l["line"] for _, l in lines]))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(reader)
    assert len(results) == 20
    reference = results[0][1]
    assert len(reference) == 4  # 2 ranks x (ready + done)
    assert all(ended and lines == reference for ended, lines in results)


@pytest.mark.parametrize(
    "body, status, text",
    [
        ({"entrypoint": "/bin/sh", "args": ["-c", "id"]}, 403, "is not allowed on this server"),
        ({"entrypoint": os.path.join(SCRIPTS, "..", "..", "rankwarden", "cli.py")}, 403, "is not allowed"),
        ({"entrypoint": WORKER, "world_size": "two"}, 400, "Expected `int`, got `str` - at `$.world_size`"),
        ({"entrypoint": WORKER, "python": "/usr/bin/python3"}, 400, "unknown field `python`"),
        ({"entrypoint": WORKER, "job_id": "../../etc"}, 400, "$.job_id"),
        ({"entrypoint": os.path.join(SCRIPTS, "missing.py")}, 400, "does not exist on the server"),
    ],
)
async def test_bad_submissions_get_clear_4xx_errors(api, body, status, text):
    response = await api.post("/jobs", json=body)
    assert response.status_code == status
    assert text in response.json()["error"]


async def test_bad_ids_bodies_and_sizes_are_refused(api):
    assert (await api.get("/jobs/..%2F..%2Fetc%2Fpasswd")).status_code in (400, 404)
    assert (await api.get("/jobs/UPPER_case")).status_code == 400
    assert (await api.get("/jobs/no-such-job")).status_code == 404
    assert (await api.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"})).status_code == 400
    huge = await api.post("/jobs", content=b"x" * 200_000, headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and huge.json()["status"] == 413
    assert (await api.get("/jobs", params={"limit": "0"})).status_code == 400
    assert (await api.get("/jobs", params={"state": "dancing"})).status_code == 400
    body = job("api-dup", "--steps", "2")
    assert (await api.post("/jobs", json=body)).status_code == 201
    assert (await api.post("/jobs", json=body)).status_code == 409
    await wait_state(api, body["job_id"], "succeeded")


async def test_a_refused_body_never_stalls_the_next_request_on_the_connection(api):
    # Regression (found by schemathesis): a response sent over an unread body
    # left the body's bytes on the keep-alive connection; the next request hung.
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=str(api.base_url), headers=headers, timeout=10,
                                 limits=httpx.Limits(max_connections=1)) as one:
        with trio.fail_after(20):
            big = await one.post("/jobs", content=b"0" * 600_000)
            assert big.status_code == 413 and big.headers["connection"] == "close"
            assert (await one.post("/jobs", json={"entrypoint": "0", "args": ["0" * 4097]})).status_code == 400
            await one.request("OPTIONS", "/jobs/purge", content=b"x" * 39)
            assert (await one.post("/jobs/purge", json={"states": ["failed"]})).status_code == 200


async def test_control_characters_in_a_submission_are_a_400(api):
    response = await api.post("/jobs", json={"entrypoint": "a\u0000b"})
    assert response.status_code == 400 and "control characters or NUL" in response.json()["error"]


async def test_the_async_client(api):
    from rankwarden.api import ApiClientError, AsyncClient

    async with AsyncClient(str(api.base_url), TOKEN) as client:
        body = job("api-client", "--steps", "3")
        info = await client.submit(**body)
        assert info.job_id == body["job_id"]
        events = [e async for _, e in client.stream(f"/jobs/{info.job_id}/events/stream")]
        assert events[-1]["type"] == "job_succeeded"
        assert (await client.get(info.job_id)).state == "succeeded"
        assert [j.job_id for j in (await client.list(state="succeeded")).jobs] == [info.job_id]
        assert any("done after 3 steps" in line["line"] for line in await client.logs(info.job_id))
        assert (await client.summary(info.job_id)).ranks[0].step == 3
        assert await client.purge(["succeeded"]) == [info.job_id]
        with pytest.raises(ApiClientError) as error:
            await client.get(info.job_id)
        assert error.value.status == 404


def test_log_tail_reads_backwards_across_block_boundaries(tmp_path):
    from rankwarden.api._logs import read_tail as _tail

    path = tmp_path / "logs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "rank": i % 3, "attempt": 1, "line": "x" * (i % 17)}) + "\n"
                            for i in range(1, 501)))
    everything = [json.loads(l) for l in path.read_text().splitlines()]
    for block in (7, 64, 1 << 16):
        assert _tail(path, 10, lambda l: True, block) == everything[-10:]
        assert _tail(path, 5, lambda l: l["rank"] == 1, block) == [l for l in everything if l["rank"] == 1][-5:]
        assert _tail(path, 1000, lambda l: True, block) == everything
    assert _tail(tmp_path / "missing", 5, lambda l: True) == []


async def test_only_the_exact_bearer_token_is_accepted(api):
    # Every near miss of the real header: the verdict "allowed" must be able to say no.
    # (Whitespace around a header value is not part of it in HTTP: "Bearer " arrives as "Bearer".)
    near_misses = [
        "Bearer", "Bearer x", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN[:1]}", f"Bearer {TOKEN}x", f"Bearer  {TOKEN}",
        f"Basic {TOKEN}", f"Token {TOKEN}", TOKEN, f"Bearer {TOKEN.upper()}", f"Bearer {TOKEN}\tx",
        f"Bearer {TOKEN}, Bearer {TOKEN}", f"Bearer{TOKEN}",
    ]
    for header in near_misses:
        async with httpx.AsyncClient(base_url=str(api.base_url), headers={"Authorization": header}) as client:
            response = await client.get("/jobs")
            assert response.status_code == 401, header
    # Two Authorization headers: refused, whichever one is right.
    async with httpx.AsyncClient(base_url=str(api.base_url)) as client:
        response = await client.get("/jobs", headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer x")])
        assert response.status_code == 401
    assert (await api.get("/jobs")).status_code == 200  # and the real one still works
