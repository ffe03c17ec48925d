"""The few Kubernetes API calls the pod launcher makes, over httpx (Trio-native).

Every call is a namespaced ``pods``, ``pods/log`` or ``services`` request;
``tests/test_kube_simulated.py`` holds these to the Role in ``k8s/`` so that
the RBAC can never drift from this file. Errors come back as
``KubernetesError`` built from the API's own ``Status`` body.
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator

import httpx

from rankwarden.errors import KubernetesError
from rankwarden.kube._config import KubeConfig

__all__ = ["KubeApi"]

log = logging.getLogger(__name__)

#: Longest line a watch or log stream may send before we give up on it.
_MAX_LINE = 16 * 1024 * 1024


class KubeApi:
    """A thin client: ``async with KubeApi(config) as api: ...``."""

    def __init__(self, config: KubeConfig, *, timeout: float = 30.0) -> None:
        self.config = config
        self.namespace = config.namespace
        self._token = config.read_token()
        self._client = httpx.AsyncClient(
            base_url=config.server,
            verify=config.ssl_context(),
            # Watches and log follows are long: no read timeout on streams (see _stream).
            timeout=httpx.Timeout(timeout),
        )

    async def __aenter__(self) -> "KubeApi":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- paths -----------------------------------------------------------------------

    def path(self, resource: str, name: str = "", sub: str = "") -> str:
        path = f"/api/v1/namespaces/{self.namespace}/{resource}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    # -- calls -----------------------------------------------------------------------

    async def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", self.path(resource), json=body)

    async def get(self, resource: str, name: str) -> dict[str, Any]:
        return await self._request("GET", self.path(resource, name))

    async def list(self, resource: str, label_selector: str) -> dict[str, Any]:
        return await self._request("GET", self.path(resource), params={"labelSelector": label_selector})

    async def delete(self, resource: str, name: str, *, grace_seconds: int | None = None) -> dict[str, Any] | None:
        """Delete; None if it was already gone (404 is success for a delete)."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            return await self._request("DELETE", self.path(resource, name), json=body)
        except KubernetesError as exc:
            if exc.status == 404:
                return None
            raise

    async def watch(
        self, resource: str, *, label_selector: str, resource_version: str, timeout_seconds: int = 240
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Yield ``(type, object)`` from a watch; raise KubernetesError(410) when the
        resourceVersion is too old (as an HTTP 410 or as an ERROR event, both happen)."""
        params = {
            "watch": "true",
            "labelSelector": label_selector,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        lines = self._stream_lines(self.path(resource), params, read_timeout=timeout_seconds + 30)
        async with aclosing(lines):
            async for line in lines:
                try:
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise KubernetesError(f"watch sent a line that is not a watch event: {line[:200]!r}") from exc
                if kind == "ERROR":
                    raise _status_error(obj, int(obj.get("code") or 500))
                yield kind, obj

    async def follow_log(self, pod: str, container: str, *, timestamps: bool = False,
                         since_time: str | None = None) -> AsyncIterator[bytes]:
        """The container's output (the kubelet's current log file: it rotates), following until it exits.

        ``timestamps``: each line starts with its RFC 3339 time and a space;
        ``since_time``: only lines from that time on (inclusive)."""
        params = {"follow": "true", "container": container}
        if timestamps:
            params["timestamps"] = "true"
        if since_time is not None:
            params["sinceTime"] = since_time
        async with _Stream(self, "GET", self.path("pods", pod, "log"), params, read_timeout=None) as response:
            async for chunk in response.aiter_bytes():
                yield chunk

    # -- plumbing --------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        for retry in (False, True):
            try:
                response = await self._client.request(method, path, headers=self._headers(), **kwargs)
            except httpx.HTTPError as exc:
                raise KubernetesError(f"{method} {path}: {exc!r}") from exc
            if response.status_code == 401 and not retry and self._refresh_token():
                continue
            if response.is_success:
                return response.json()
            raise _response_error(method, path, response.status_code, response.content)
        raise AssertionError("unreachable")

    def _refresh_token(self) -> bool:
        """On 401: the ServiceAccount token may have been rotated; try the new one once."""
        token = self.config.read_token()
        changed = token != self._token
        self._token = token
        if changed:
            log.info("Kubernetes API said 401; retrying with the re-read token")
        return changed

    async def _stream_lines(self, path: str, params: dict[str, str], *, read_timeout: float) -> AsyncIterator[str]:
        async with _Stream(self, "GET", path, params, read_timeout=read_timeout) as response:
            buffer = b""
            async for chunk in response.aiter_bytes():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > _MAX_LINE:
                    raise KubernetesError(f"GET {path}: a line longer than {_MAX_LINE} bytes")
                for line in lines:
                    if line.strip():
                        yield line.decode()
            if buffer.strip():
                yield buffer.decode()


class _Stream:
    """A streaming response that has passed the status check (401 retried once)."""

    def __init__(self, api: KubeApi, method: str, path: str, params: dict[str, str], read_timeout: float | None):
        self._api, self._method, self._path, self._params = api, method, path, params
        self._timeout = httpx.Timeout(api._client.timeout.connect, read=read_timeout)
        self._cm: Any = None

    async def __aenter__(self) -> httpx.Response:
        api = self._api
        for retry in (False, True):
            cm = api._client.stream(self._method, self._path, params=self._params, headers=api._headers(),
                                    timeout=self._timeout)
            try:
                response = await cm.__aenter__()
            except httpx.HTTPError as exc:
                raise KubernetesError(f"{self._method} {self._path}: {exc!r}") from exc
            if response.is_success:
                self._cm = cm
                return response
            body = await response.aread()
            await cm.__aexit__(None, None, None)
            if response.status_code == 401 and not retry and api._refresh_token():
                continue
            raise _response_error(self._method, self._path, response.status_code, body)
        raise AssertionError("unreachable")

    async def __aexit__(self, *exc: Any) -> None:
        if self._cm is not None:
            await self._cm.__aexit__(*exc)


def _response_error(method: str, path: str, status: int, body: bytes) -> KubernetesError:
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("kind") == "Status":
        error = _status_error(obj, status)
        error.args = (f"{method} {path}: {error}",)
        return error
    return KubernetesError(f"{method} {path}: HTTP {status}: {body[:300]!r}", status=status)


def _status_error(status: dict[str, Any], code: int) -> KubernetesError:
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or reason or f"HTTP {code}")
    return KubernetesError(f"{code} {reason}: {message}" if reason else f"{code}: {message}", status=code, reason=reason)
