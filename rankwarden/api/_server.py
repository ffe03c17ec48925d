"""``rankwarden serve``: the API server and its jobs in one Trio nursery.

Locked by default: it binds to loopback, every route but /health needs the
bearer token, and jobs may only run entrypoints the operator allowed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import ipaddress
import logging
import os
import secrets
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from rankwarden.api._app import create_app
from rankwarden.api._manager import JobManager, ServerConfig
from rankwarden.errors import RankwardenError

__all__ = ["is_loopback", "load_or_create_token", "serve_api", "weak_token"]

log = logging.getLogger(__name__)
TOKEN_FILE = "api-token"


def load_or_create_token(state_dir: str | os.PathLike[str]) -> tuple[str, bool]:
    """The API token: $RANKWARDEN_API_TOKEN, else the state dir's token file (created 0600 at first start).

    A token file that others may read (group or world bits set) is refused
    with a RankwardenError: the token lets its holder run code on the host.
    Returns (token, created)."""
    from_env = os.environ.get("RANKWARDEN_API_TOKEN")
    if from_env:
        return from_env, False
    path = Path(state_dir) / TOKEN_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, True
    with os.fdopen(fd) as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        if mode & 0o077:
            raise RankwardenError(
                f"the API token file {path} has mode {mode:04o}: others may read it. "
                f"Run `chmod 600 {path}` (and replace the token if it may have leaked), then start again.")
        return f.read().strip(), False


def weak_token(token: str) -> str | None:
    """Why ``token`` is too weak to guard a server others can reach, or None.

    At least 24 characters with at least 12 distinct ones: a generated token
    (``secrets.token_urlsafe(32)``, 43 characters) passes, a word does not."""
    if len(token) < 24:
        return f"it has {len(token)} characters (at least 24 are needed)"
    if len(set(token)) < 12:
        return f"it has only {len(set(token))} distinct characters (at least 12 are needed)"
    return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


async def serve_api(
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str,
    shutdown: trio.Event | None = None,
    graceful_timeout: float = 3.0,
    tune_gc: bool = False,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set (or cancelled). ``task_status.started(url)`` once listening.

    After ``shutdown`` is set, requests in flight have ``graceful_timeout``
    seconds to finish; then the jobs' coordinators are cancelled. ``tune_gc``
    (what ``rankwarden serve`` does: the process is the server's) sets this
    process's garbage collector for short pauses (see ``_tune_gc``)."""
    # The token travels no further: local ranks inherit this process's
    # environment, and a rank holding the API token could submit jobs.
    os.environ.pop("RANKWARDEN_API_TOKEN", None)
    if not is_loopback(host) and (reason := weak_token(token)):
        raise RankwardenError(f"refusing to listen on {host} with a weak API token: {reason}. "
                              "Unset RANKWARDEN_API_TOKEN to have one generated, or set a long random one "
                              "(`python -c 'import secrets; print(secrets.token_urlsafe(32))'`).")
    if host in ("0.0.0.0", "::", ""):
        log.warning("the API listens on every interface (%s): anyone who can reach port %s and holds the token "
                    "can run allowed entrypoints; put TLS and a firewall in front", host or "0.0.0.0", port)
    manager = JobManager(config)
    app = create_app(manager, token)
    if tune_gc:
        _tune_gc()
    hypercorn_config = HypercornConfig()
    hypercorn_config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hypercorn_config.accesslog = None
    hypercorn_config.loglevel = "WARNING"  # `rankwarden serve` prints the address itself
    hypercorn_config.graceful_timeout = graceful_timeout
    # A connection that has not sent a whole request head within this time
    # (idle, or trickling headers) is closed. Not read_timeout: hypercorn
    # applies that to every read, which would cut SSE streams whose clients
    # are silent by design.
    hypercorn_config.keep_alive_timeout = 15
    stop = shutdown if shutdown is not None else trio.Event()
    # hypercorn's own pattern (trio/run.py::worker_serve): a lifespan nursery
    # (the jobs) around a server nursery; the shutdown trigger stops new
    # connections, requests in flight get graceful_timeout to finish, a
    # deadline on the server's cancel scope bounds the whole phase, and only
    # then are the jobs cancelled (their rows stay "running": the next start
    # resumes them or marks them interrupted).
    try:
        async with trio.open_nursery() as lifespan:
            await lifespan.start(manager.run)
            async with trio.open_nursery() as server:

                async def trigger() -> None:
                    await stop.wait()
                    manager.shutdown()  # new submissions get 503 from now on
                    server.cancel_scope.deadline = trio.current_time() + graceful_timeout + 1.0

                binds = await server.start(functools.partial(
                    _serve_http, app, hypercorn_config, config.limits.max_client_connections, trigger))
                task_status.started(binds[0])
            lifespan.cancel_scope.cancel()
    finally:
        manager.db.close()


def _tune_gc() -> None:
    """Keep the cyclic garbage collector's pauses out of log and heartbeat latency.

    A server streaming 2,000 lines/s to 100 subscribers allocates millions of
    short-lived objects a minute. With the default thresholds (700, 10, 10),
    in one 12 s run of bench/api_streams.py (timed with gc.callbacks) the
    collector ran 1,738 young and 14 full collections, 1.3 s in all, the
    full ones walking every object the imports made (torch included) for up
    to 117 ms each: a stream stalls that long, and so do heartbeats. So:
    what exists after start-up is frozen (never scanned again), and a young
    collection waits for 50,000 allocations; the same run then spent 0.1 s
    in 153 collections. Reference counting still frees almost everything at
    once; only cycles wait longer."""
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, 50_000), middle, old)


# -- hypercorn's worker_serve, with a bound on connections per client address ---------------


class _Connections:
    """Open TCP connections per client address: beyond ``limit`` a new one gets 429 and is closed.

    Requests in flight per client are bounded in the app (``_PerClient``),
    but a client can also hold sockets that never send a request (each for
    up to hypercorn's keep_alive_timeout): counted here, at accept, where
    hypercorn offers no hook."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self.refusing: set[str] = set()

    async def handle(self, serve_one, stream: trio.SocketStream) -> None:
        try:
            client = stream.socket.getpeername()[0]
        except OSError:  # gone already
            await stream.aclose()
            return
        if self.open.get(client, 0) >= self.limit:
            if client not in self.refusing:  # once per episode, not once per connection of a flood
                self.refusing.add(client)
                log.warning("refusing connections from %s: it already has %d open (server limit "
                            "max_client_connections=%d)", client, self.limit, self.limit)
            body = (b'{"error":"too many connections from %s (server limit max_client_connections=%d)",'
                    b'"status":429,"detail":"close some connections, or retry later"}' % (client.encode(), self.limit))
            # The answer, then a second at most to read what the client sent
            # (closing over unread bytes would reset the connection and lose
            # the answer); refused connections are not counted, but bounded.
            with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                                      b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
                await stream.send_eof()
                while await stream.receive_some(1 << 16):
                    pass
            await trio.aclose_forcefully(stream)
            return
        self.open[client] = self.open.get(client, 0) + 1
        self.refusing.discard(client)
        try:
            await serve_one(stream)
        finally:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]


async def _serve_http(app, config: HypercornConfig, max_connections: int, shutdown_trigger, *,
                      task_status=trio.TASK_STATUS_IGNORED) -> None:
    """``hypercorn.trio.run.worker_serve`` for plain HTTP, with ``_Connections`` in front of each accept.

    The same shape: a lifespan nursery around a server nursery, binds
    reported through ``task_status``, the shutdown trigger raced against the
    listeners, and ``graceful_timeout`` for the connections still open."""
    app = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: dict = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    connections = _Connections(max_connections)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            listeners, binds = [], []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
                await config.log.info(f"Running on {binds[-1]} (CTRL + C to quit)")
            serve_one = functools.partial(TCPServer, app, config, context, lifespan_state.copy())

            async def handler(stream: trio.SocketStream) -> None:
                await connections.handle(serve_one, stream)

            task_status.started(binds)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(functools.partial(trio.serve_listeners, handler, listeners,
                                                         handler_nursery=server_nursery))
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, others = error.split((ShutdownError, KeyboardInterrupt))
                if others is not None:
                    raise others
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
