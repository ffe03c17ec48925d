"""The REST API: ``rankwarden serve`` and its client.

Import ``rankwarden.api.Client`` to talk to a server; the server itself is
started by ``rankwarden serve`` (or ``serve_api`` in your own Trio nursery).
"""

from rankwarden.api._admission import Limits
from rankwarden.api._manager import ServerConfig
from rankwarden.api._schema import JobInfo, JobList, JobRequest, JobSummary
from rankwarden.api._templates import Param, Template, load_templates
from rankwarden.api.client import ApiClientError, AsyncClient, Client

__all__ = [
    "ApiClientError",
    "AsyncClient",
    "Client",
    "JobInfo",
    "JobList",
    "JobRequest",
    "JobSummary",
    "Limits",
    "Param",
    "ServerConfig",
    "Template",
    "load_or_create_token",
    "load_templates",
    "serve_api",
]


def __getattr__(name: str):
    # The server needs the `api` extra (hypercorn, quart-trio); the client only
    # httpx. Loading the server on first use lets `rankwarden jobs` and
    # `from rankwarden.api import Client` work with httpx alone.
    if name in ("load_or_create_token", "serve_api"):
        from rankwarden.api import _server

        return getattr(_server, name)
    raise AttributeError(f"module 'rankwarden.api' has no attribute {name!r}")
