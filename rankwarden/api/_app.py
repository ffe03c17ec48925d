"""The HTTP face: Quart-Trio routes over the JobManager.

Every route but ``/health`` needs ``Authorization: Bearer <token>``. Every
error is a JSON ``ErrorBody`` with the right status. Bodies are decoded into
msgspec Structs, so a bad field is a 400 naming it.

Server-Sent Events are pulled from the job's own files (``events.jsonl``,
and ``logs.jsonl`` for rank output): each event's ``id`` is its line number,
a client reconnecting with ``Last-Event-ID`` gets exactly what it missed,
and a slow client only falls behind in a file; it can never block the job or
another client, and no buffer can overflow. A stream ends after the job does.
"""

from __future__ import annotations

import functools
import hmac
import re
from typing import AsyncIterator

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

import rankwarden
from rankwarden.api._admission import check_job_id
from rankwarden.api._dashboard import Sessions, install_dashboard, is_public
from rankwarden.api._logs import read_tail, stream_file
from rankwarden.api._manager import JobManager
from rankwarden.api._metrics import render_metrics
from rankwarden.api._metrics_store import render_job_metrics
from rankwarden.api._schema import (
    API_STATES,
    ErrorBody,
    Health,
    JobList,
    JobRequest,
    LogLines,
    PurgeRequest,
    PurgeResult,
)
from rankwarden.errors import ApiError

__all__ = ["create_app"]

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 10.0  # seconds to receive a whole body
CLOSE_GRACE = 2.0  # seconds a response's last bytes may take (to a client that does not read)
_EVENT_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() accepts '²'
_encoder = msgspec.json.Encoder()


def _json(body, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status=status, mimetype="application/json")


def _error(status: int, message: str, detail: str = "") -> Response:
    return _json(ErrorBody(error=message, status=status, detail=detail), status)


def _job_id(job_id: str) -> str:
    return check_job_id(job_id)


async def _body(kind):
    raw = await request.get_data()
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"query parameter {name} must be between {low} and {high}, got {value}")
    return value


class _PerClient:
    """ASGI middleware: at most ``limit`` requests in flight per client address (429 beyond).

    One client cannot hold every connection slot (many SSE streams, slow
    bodies) and starve the others; an unauthenticated one is answered
    before its body is read (see ``authenticate_then_drain``)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]
        if self.in_flight.get(client, 0) >= self.limit:
            body = _encoder.encode(ErrorBody(error=f"too many requests in flight from {client} "
                                                  f"(server limit max_client_requests={self.limit})", status=429,
                                             detail="close some streams, or retry later"))
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight[client] = self.in_flight.get(client, 0) + 1
        try:
            await self.app(scope, receive, functools.partial(_send_last_shielded, send))
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]


async def _send_last_shielded(send, message) -> None:
    """The ASGI ``send``, with a response's last message shielded (for at most CLOSE_GRACE seconds).

    When that message ends a response that closes its connection (``Connection:
    close``: a refused or timed-out body), hypercorn closes the socket inside
    this call. Quart-trio cancels the request's task as soon as hypercorn
    reports the disconnect, which lands in the middle of that close and leaves
    the socket open: a client that never closes it could then hold it."""
    if message["type"] == "http.response.body" and not message.get("more_body", False):
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_GRACE):
            await send(message)
    else:
        await send(message)


def create_app(manager: JobManager, token: str) -> QuartTrio:
    app = QuartTrio("rankwarden")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    # A body must arrive promptly: a client trickling bytes cannot hold a request open.
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT
    app.asgi_app = _PerClient(app.asgi_app, manager.config.limits.max_client_requests)  # type: ignore[method-assign]
    expected = f"Bearer {token}".encode()
    sessions = Sessions(token)

    @app.before_request
    async def authenticate_then_drain():
        # The token is checked before a byte of the body is read: an
        # unauthenticated client cannot make the server buffer anything. A
        # refusal over an unread body closes the connection (after_request),
        # since the body's bytes would otherwise stall the next request on it.
        if request.path != "/health" and not is_public(request.path, request.method):
            # Exactly one header, exactly the token: a second Authorization
            # header is ambiguous (proxies and servers disagree on which wins).
            given = request.headers.getlist("Authorization")
            if not given and request.cookies:
                # A browser's session cookie (see _dashboard): state changes also need its header.
                if (refusal := sessions.check()) is not None:
                    return _error(*refusal)
            elif len(given) != 1 or not hmac.compare_digest(given[0].encode(), expected):
                return _error(401, "missing or wrong bearer token", "send `Authorization: Bearer <token>`")
        if (request.content_length or 0) > MAX_BODY:
            return _error(413, "request body too large", f"the limit is {MAX_BODY} bytes")
        # Read the (bounded) body before answering: see above.
        await request.get_data()
        return None

    @app.after_request
    async def harden(response: Response) -> Response:
        if response.status_code in (401, 403, 408, 413):
            # The body was refused, or never came whole: the connection's next
            # bytes are not a request, and a trickling client must not keep it.
            response.headers["Connection"] = "close"
        # Answers are JSON or event streams about private jobs: never sniffed
        # as something else, never kept by a cache.
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError):
        return _error(exc.status, exc.message, exc.detail)

    for status, message in ((404, "not found"), (405, "method not allowed"), (413, "request body too large"),
                            (400, "bad request")):
        app.register_error_handler(status, lambda exc, s=status, m=message: _error(s, m))

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception):
        if hasattr(exc, "code") and isinstance(getattr(exc, "code"), int) and 400 <= exc.code < 500:
            return _error(exc.code, getattr(exc, "description", "bad request") or "bad request")
        app.logger.exception("unexpected error")
        return _error(500, "internal error", type(exc).__name__)

    @app.get("/health")
    async def health():
        return _json(Health(version=rankwarden.__version__, jobs_running=manager.running()))

    @app.post("/jobs")
    async def submit():
        info = await manager.submit(await _body(JobRequest))
        return _json(info, 201)

    @app.get("/jobs")
    async def list_jobs():
        states = [s for s in request.args.get("state", "").split(",") if s]
        bad = [s for s in states if s not in API_STATES]
        if bad:
            raise ApiError(400, f"unknown state {bad[0]!r}", f"states: {', '.join(API_STATES)}")
        offset, limit = _int_arg("offset", 0, 0, 10**9), _int_arg("limit", 100, 1, 1000)
        jobs, total = await manager.list(states or None, offset, limit)
        return _json(JobList(jobs=jobs, total=total, offset=offset, limit=limit))

    @app.get("/jobs/summaries")
    async def summaries():
        return _json(await manager.active_summaries())

    @app.get("/jobs/<job_id>")
    async def show(job_id: str):
        return _json(await manager.get(_job_id(job_id)))

    @app.get("/jobs/<job_id>/summary")
    async def summary(job_id: str):
        return _json(await manager.summary(_job_id(job_id)))

    @app.get("/jobs/<job_id>/logs")
    async def logs(job_id: str):
        await manager.get(_job_id(job_id))
        count = _int_arg("lines", 100, 1, 100000)
        rank = _int_arg("rank", -1, 0, 65535) if "rank" in request.args else None
        attempt = _int_arg("attempt", -1, 1, 10**6) if "attempt" in request.args else None
        def wanted(line: dict) -> bool:
            return (rank is None or line["rank"] == rank) and (attempt is None or line["attempt"] == attempt)

        lines = await trio.to_thread.run_sync(read_tail, manager.combined_log(job_id), count, wanted)
        return _json(LogLines(job_id=job_id, lines=lines))

    @app.get("/jobs/<job_id>/logs/stream")
    async def log_stream(job_id: str):
        await manager.get(_job_id(job_id))
        return _sse(stream_file(manager.combined_log(job_id), _last_event_id(), lambda: manager.log_wakeup(job_id),
                                lambda: manager.is_active(job_id), lambda: manager.log_copier(job_id)))

    @app.get("/jobs/<job_id>/events/stream")
    async def event_stream(job_id: str):
        await manager.get(_job_id(job_id))
        return _sse(stream_file(manager.events_path(job_id), _last_event_id(), lambda: manager.event_wakeup(job_id),
                                lambda: manager.is_active(job_id)))

    @app.post("/jobs/<job_id>/stop")
    async def stop(job_id: str):
        return _json(await manager.stop(_job_id(job_id)), 202)

    @app.delete("/jobs/<job_id>")
    async def delete(job_id: str):
        return _json(await manager.delete(_job_id(job_id)))

    @app.post("/jobs/purge")
    async def purge():
        body = await _body(PurgeRequest)
        return _json(PurgeResult(purged=await manager.purge(list(body.states), body.older_than_seconds)))

    @app.get("/metrics")
    async def metrics():
        text = render_metrics(await manager.counts(), manager.live_metrics())
        text += render_job_metrics({job_id: (live.metrics.series.latest, await manager.summary(job_id))
                                    for job_id, live in list(manager.live.items())
                                    if live.metrics is not None and manager.is_active(job_id)})
        return Response(text, mimetype="text/plain", headers={"Content-Type": "text/plain; version=0.0.4"})

    install_dashboard(app, manager, sessions, _json, _error)

    @app.get("/openapi.json")
    async def openapi():
        from rankwarden.api._openapi import openapi_document

        return _json(openapi_document())

    return app


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    if not _EVENT_ID.fullmatch(raw):
        raise ApiError(400, f"Last-Event-ID must be a line number, got {raw[:32]!r}")
    return int(raw)


def _sse(body: AsyncIterator[bytes]) -> Response:
    response = Response(body, mimetype="text/event-stream", headers={"X-Accel-Buffering": "no"})
    response.timeout = None  # a stream lasts as long as its job
    return response
