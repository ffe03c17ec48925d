"""A small client for the REST API, synchronous (``Client``) and async on Trio (``AsyncClient``).

    client = Client("http://127.0.0.1:8000", token)
    job = client.submit(entrypoint="/srv/train.py", world_size=2)
    for event_id, line in client.stream_logs(job.job_id):
        print(line["rank"], line["line"])
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator, Iterator

import httpx
import msgspec

from rankwarden.api._schema import DeleteResult, JobInfo, JobList, JobRequest, JobSummary, PurgeResult
from rankwarden.errors import ApiClientError

__all__ = ["ApiClientError", "AsyncClient", "Client"]


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            body = response.json()
            raise ApiClientError(response.status_code, body.get("error", response.reason_phrase), body.get("detail", ""))
        except (ValueError, AttributeError):
            raise ApiClientError(response.status_code, response.reason_phrase) from None
    return response


def _request_body(fields: dict[str, Any]) -> bytes:
    return msgspec.json.encode(msgspec.convert(fields, JobRequest))


class _SSE:
    """Turns text/event-stream lines into (id, data) pairs."""

    def __init__(self) -> None:
        self.event_id, self.data, self.kind = 0, [], ""

    def feed(self, line: str) -> tuple[int, Any] | None | bool:
        if line == "":
            if self.kind == "end":
                return True
            out = (self.event_id, json.loads("\n".join(self.data))) if self.data else None
            self.data, self.kind = [], ""
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id" and value.isdigit():
            self.event_id = int(value)
        elif name == "data":
            self.data.append(value)
        elif name == "event":
            self.kind = value
        return None


def _unreachable(url: str, exc: httpx.TransportError) -> ApiClientError:
    reason = str(exc).rpartition("] ")[2] or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "refused" in reason.lower():
        reason = "connection refused"
    return ApiClientError(0, f"cannot reach {url}: {reason}")


class _Translate(httpx.BaseTransport):
    """httpx's transport errors become one ApiClientError (status 0) at this one boundary."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self.inner.handle_request(request)
        except httpx.TransportError as exc:
            raise _unreachable(f"{request.url.scheme}://{request.url.netloc.decode()}", exc) from None

    def close(self) -> None:
        self.inner.close()


class _AsyncTranslate(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.inner.handle_async_request(request)
        except httpx.TransportError as exc:
            raise _unreachable(f"{request.url.scheme}://{request.url.netloc.decode()}", exc) from None

    async def aclose(self) -> None:
        await self.inner.aclose()


class Client:
    def __init__(self, url: str, token: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                  transport=_Translate(transport or httpx.HTTPTransport()))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, **fields: Any) -> JobInfo:
        response = _check(self._http.post("/jobs", content=_request_body(fields),
                                          headers={"Content-Type": "application/json"}))
        return msgspec.json.decode(response.content, type=JobInfo)

    def list(self, state: str | None = None, offset: int = 0, limit: int = 100) -> JobList:
        params = {"offset": offset, "limit": limit, **({"state": state} if state else {})}
        return msgspec.json.decode(_check(self._http.get("/jobs", params=params)).content, type=JobList)

    def get(self, job_id: str) -> JobInfo:
        return msgspec.json.decode(_check(self._http.get(f"/jobs/{job_id}")).content, type=JobInfo)

    def summary(self, job_id: str) -> JobSummary:
        return msgspec.json.decode(_check(self._http.get(f"/jobs/{job_id}/summary")).content, type=JobSummary)

    def logs(self, job_id: str, *, lines: int = 100, rank: int | None = None, attempt: int | None = None) -> list[dict]:
        params = {"lines": lines, **({"rank": rank} if rank is not None else {}), **({"attempt": attempt} if attempt else {})}
        return _check(self._http.get(f"/jobs/{job_id}/logs", params=params)).json()["lines"]

    def stream_logs(self, job_id: str, last_event_id: int = 0) -> Iterator[tuple[int, dict]]:
        yield from self._stream(f"/jobs/{job_id}/logs/stream", last_event_id)

    def stream_events(self, job_id: str, last_event_id: int = 0) -> Iterator[tuple[int, dict]]:
        yield from self._stream(f"/jobs/{job_id}/events/stream", last_event_id)

    def _stream(self, path: str, last_event_id: int) -> Iterator[tuple[int, dict]]:
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        with self._http.stream("GET", path, headers=headers, timeout=httpx.Timeout(30.0, read=None)) as response:
            _check(response) if response.status_code >= 400 and response.read() is not None else None
            parser = _SSE()
            for line in response.iter_lines():
                item = parser.feed(line)
                if item is True:
                    return
                if item:
                    yield item

    def stop(self, job_id: str) -> JobInfo:
        return msgspec.json.decode(_check(self._http.post(f"/jobs/{job_id}/stop")).content, type=JobInfo)

    def delete(self, job_id: str) -> DeleteResult:
        """Delete a finished job with its logs and checkpoints; says what was removed."""
        return msgspec.json.decode(_check(self._http.delete(f"/jobs/{job_id}")).content, type=DeleteResult)

    def purge(self, states: list[str], older_than_seconds: float = 0.0) -> list[str]:
        """Delete finished jobs in ``states`` (required: there is no "everything") older than the cutoff."""
        body = {"states": list(states), "older_than_seconds": older_than_seconds}
        return msgspec.json.decode(_check(self._http.post("/jobs/purge", json=body)).content, type=PurgeResult).purged


class AsyncClient:
    """The same calls, awaitable (httpx runs on Trio through anyio)."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                       transport=_AsyncTranslate(httpx.AsyncHTTPTransport()))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def submit(self, **fields: Any) -> JobInfo:
        response = _check(await self._http.post("/jobs", content=_request_body(fields),
                                                headers={"Content-Type": "application/json"}))
        return msgspec.json.decode(response.content, type=JobInfo)

    async def list(self, state: str | None = None, offset: int = 0, limit: int = 100) -> JobList:
        params = {"offset": offset, "limit": limit, **({"state": state} if state else {})}
        return msgspec.json.decode(_check(await self._http.get("/jobs", params=params)).content, type=JobList)

    async def get(self, job_id: str) -> JobInfo:
        return msgspec.json.decode(_check(await self._http.get(f"/jobs/{job_id}")).content, type=JobInfo)

    async def logs(self, job_id: str, *, lines: int = 100, rank: int | None = None, attempt: int | None = None) -> list[dict]:
        params = {"lines": lines, **({"rank": rank} if rank is not None else {}), **({"attempt": attempt} if attempt else {})}
        return _check(await self._http.get(f"/jobs/{job_id}/logs", params=params)).json()["lines"]

    async def purge(self, states: list[str], older_than_seconds: float = 0.0) -> list[str]:
        body = {"states": list(states), "older_than_seconds": older_than_seconds}
        response = _check(await self._http.post("/jobs/purge", json=body))
        return msgspec.json.decode(response.content, type=PurgeResult).purged

    async def summary(self, job_id: str) -> JobSummary:
        return msgspec.json.decode(_check(await self._http.get(f"/jobs/{job_id}/summary")).content, type=JobSummary)

    async def stop(self, job_id: str) -> JobInfo:
        return msgspec.json.decode(_check(await self._http.post(f"/jobs/{job_id}/stop")).content, type=JobInfo)

    async def delete(self, job_id: str) -> DeleteResult:
        """Delete a finished job with its logs and checkpoints; says what was removed."""
        return msgspec.json.decode(_check(await self._http.delete(f"/jobs/{job_id}")).content, type=DeleteResult)

    async def stream(self, path: str, last_event_id: int = 0) -> AsyncIterator[tuple[int, dict]]:
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id else {}
        async with self._http.stream("GET", path, headers=headers, timeout=httpx.Timeout(30.0, read=None)) as response:
            if response.status_code >= 400:
                await response.aread()
                _check(response)
            parser = _SSE()
            async with contextlib.aclosing(response.aiter_lines()) as lines:
                async for line in lines:
                    item = parser.feed(line)
                    if item is True:
                        return
                    if item:
                        yield item
