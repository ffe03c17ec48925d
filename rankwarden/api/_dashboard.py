"""The dashboard: the page at ``/``, its browser sessions, and the metrics routes it reads.

Browser authentication. ``EventSource`` cannot send an ``Authorization``
header, so a browser logs in once with the API token (``POST /login``) and
gets a session cookie: ``HttpOnly`` (scripts on the page cannot read it),
``SameSite=Strict`` (no other site's page makes the browser send it) and
``Secure`` when the request came over TLS. The cookie's value is a random
session id known only to this server's memory: logging out (``POST
/logout``) or restarting the server ends it, and it expires after
``SESSION_SECONDS``. Scripts keep using the bearer token.

Cross-site requests. A request authenticated by the cookie that changes
state (anything but GET/HEAD) must also carry ``X-Rankwarden: 1``: an HTML
form cannot set a header, and a script on another origin cannot send one
without a CORS preflight this server never grants. A present ``Origin``
must also be this server's. Logging in obeys the same rules, so another
site cannot log a browser into a session of its choosing.

What is public: ``/health``, the page's HTML, script and styles (code, no
data) and ``POST /login``. Every job detail needs the cookie or the token.
"""

from __future__ import annotations

import hmac
import secrets
import time
from importlib import resources
from typing import Annotated

import msgspec
import trio
from msgspec import Meta
from quart import Response, request

from rankwarden.api._metrics_store import MetricsSeries, load_series, stream_points
from rankwarden.errors import ApiError

__all__ = ["COOKIE", "CSRF_HEADER", "Sessions", "install_dashboard"]

COOKIE = "rankwarden_session"
CSRF_HEADER = "X-Rankwarden"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: The page's files: name -> content type. Nothing else under static/ is served.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/uPlot.LICENSE": "text/plain; charset=utf-8",
}
#: The page runs only its own scripts and talks only to this server.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class LoginRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    token: Annotated[str, Meta(max_length=4096)]


class LoginResult(msgspec.Struct, frozen=True, kw_only=True):
    #: Seconds until the session expires.
    expires_in: int


class TemplateInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    max_world_size: int
    params: dict[str, dict]


class Sessions:
    """Browser sessions: random ids in this server's memory, each with an expiry."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._expiry: dict[str, float] = {}  # session id -> time.monotonic() it expires

    def login(self, token: str) -> str | None:
        if not hmac.compare_digest(token.encode(), self._token):
            return None
        now = time.monotonic()
        self._expiry = {s: e for s, e in self._expiry.items() if e > now}
        while len(self._expiry) >= MAX_SESSIONS:  # the oldest session goes first
            del self._expiry[next(iter(self._expiry))]
        session = secrets.token_urlsafe(32)
        self._expiry[session] = now + SESSION_SECONDS
        return session

    def valid(self, session: str) -> bool:
        expires = self._expiry.get(session)
        return expires is not None and expires > time.monotonic()

    def logout(self, session: str) -> None:
        self._expiry.pop(session, None)

    def check(self) -> tuple[int, str, str] | None:
        """For a request with no Authorization header: None if its session cookie admits it, else (status, error, detail)."""
        session = request.cookies.get(COOKIE, "")
        if not session or not self.valid(session):
            return 401, "missing or wrong bearer token", \
                "send `Authorization: Bearer <token>`, or log in at / (the session may have ended)"
        if request.method not in _SAFE_METHODS:
            return cross_site_refusal()
        return None


def cross_site_refusal() -> tuple[int, str, str] | None:
    """Why a cookie-authenticated state change is refused as possibly cross-site, or None."""
    if request.headers.get(CSRF_HEADER) != "1":
        return 403, f"a browser session's {request.method} needs the {CSRF_HEADER}: 1 header", \
            "a cross-site form cannot send it; scripts should use the bearer token"
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return 403, f"cross-origin request from {origin[:100]!r} refused", ""
    return None


def is_public(path: str, method: str) -> bool:
    return (method in ("GET", "HEAD") and (path == "/" or path.startswith("/assets/"))) or \
        (path == "/login" and method == "POST")


def _load_static() -> dict[str, bytes]:
    root = resources.files("rankwarden.api") / "static"
    return {name: (root / name).read_bytes() for name in STATIC}


def install_dashboard(app, manager, sessions: Sessions, json, error) -> None:
    """Add the page, login/logout, templates and the metrics routes to ``app``."""
    from rankwarden.api._app import _int_arg, _job_id, _last_event_id, _sse  # _app calls this function

    files = _load_static()  # read once: the first paint never waits on the disk

    @app.get("/")
    async def dashboard_page():
        return Response(files["index.html"], mimetype="text/html",
                        headers={"Content-Type": STATIC["index.html"], "Content-Security-Policy": CSP,
                                 "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"})

    @app.get("/assets/<path:name>")
    async def asset(name: str):
        if name not in files:
            raise ApiError(404, "not found")
        return Response(files[name], headers={"Content-Type": STATIC[name]})

    @app.post("/login")
    async def dashboard_login():
        refusal = cross_site_refusal()
        if refusal is not None:
            return error(*refusal)
        try:
            body = msgspec.json.decode(await request.get_data() or b"{}", type=LoginRequest)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"invalid request body: {exc}") from None
        session = sessions.login(body.token)
        if session is None:
            return error(401, "wrong token", "use the token `rankwarden serve` printed (or its api-token file)")
        response = json(LoginResult(expires_in=SESSION_SECONDS))
        response.set_cookie(COOKIE, session, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="Strict",
                            secure=request.scheme in ("https", "wss"))
        return response

    @app.post("/logout")
    async def dashboard_logout():
        sessions.logout(request.cookies.get(COOKIE, ""))
        response = Response(b"", status=204)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                               secure=request.scheme in ("https", "wss"))
        return response

    @app.get("/templates")
    async def list_templates():
        return json([TemplateInfo(name=name, max_world_size=t.max_world_size,
                                  params={p: msgspec.to_builtins(v) for p, v in t.params.items()})
                     for name, t in sorted(manager.config.templates.items())])

    async def series(job_id: str) -> MetricsSeries:
        live = manager.live.get(job_id)
        if live is not None and live.metrics is not None:
            return live.metrics.series
        path = manager.job_dir(job_id) / "metrics.json"
        return await trio.to_thread.run_sync(load_series, path, job_id) or MetricsSeries(job_id=job_id)

    @app.get("/jobs/<job_id>/metrics")
    async def job_metrics(job_id: str):
        await manager.get(_job_id(job_id))
        after = _int_arg("after", 0, 0, 10**18)
        found = await series(job_id)
        if after:
            start = next((i for i, s in enumerate(found.seq) if s > after), len(found.seq))
            found = MetricsSeries(job_id=job_id, stride=found.stride, samples=found.samples,
                                  time=found.time[start:], step=found.step[start:], seq=found.seq[start:],
                                  values={k: v[start:] for k, v in found.values.items()}, latest=found.latest)
        return json(found)

    @app.get("/jobs/<job_id>/metrics/stream")
    async def job_metrics_stream(job_id: str):
        await manager.get(_job_id(job_id))
        after = _last_event_id()
        found = await series(job_id)  # a finished job's, read once

        def recorder():
            live = manager.live.get(job_id)
            return live.metrics if live is not None else None

        def current() -> MetricsSeries:
            live = recorder()
            return live.series if live is not None else found

        with_summary = request.args.get("summary") == "1"
        return _sse(stream_points(recorder, current, after,
                                  (lambda: manager.summary(job_id)) if with_summary else None))
