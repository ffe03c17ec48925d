"""``rankwarden serve``: the API server and its jobs in one Trio nursery.

Locked by default: it binds to loopback, every route but /health needs the
bearer token, and jobs may only run entrypoints the operator allowed.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from rankwarden.api._app import create_app
from rankwarden.api._manager import JobManager, ServerConfig

__all__ = ["load_or_create_token", "serve_api"]

log = logging.getLogger(__name__)
TOKEN_FILE = "api-token"


def load_or_create_token(state_dir: str | os.PathLike[str]) -> tuple[str, bool]:
    """The API token: $RANKWARDEN_API_TOKEN, else the state dir's token file (created 0600 at first start).

    Returns (token, created)."""
    from_env = os.environ.get("RANKWARDEN_API_TOKEN")
    if from_env:
        return from_env, False
    path = Path(state_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return path.read_text().strip(), False
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, True


async def serve_api(
    config: ServerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str,
    shutdown: trio.Event | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set (or cancelled). ``task_status.started(url)`` once listening."""
    if host in ("0.0.0.0", "::", ""):
        log.warning("the API listens on every interface (%s): anyone who can reach port %s and holds the token "
                    "can run allowed entrypoints; put TLS and a firewall in front", host or "0.0.0.0", port)
    manager = JobManager(config)
    app = create_app(manager, token)
    hypercorn_config = HypercornConfig()
    hypercorn_config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hypercorn_config.accesslog = None
    hypercorn_config.graceful_timeout = 3.0
    stop = shutdown if shutdown is not None else trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            binds = await nursery.start(
                functools.partial(hypercorn_serve, app, hypercorn_config, shutdown_trigger=stop.wait)
            )
            task_status.started(binds[0])
            await stop.wait()
            # Jobs keep their "running" rows: the next start resumes them (or
            # marks them interrupted). Cancelling stops their ranks (shielded).
            manager.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        manager.db.close()
