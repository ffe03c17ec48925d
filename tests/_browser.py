"""A real headless Chromium for the tests, driven over WebDriver (chromedriver) with httpx.

No browser download and no new package: Debian's ``chromium`` and
``chromium-driver``, and the W3C WebDriver protocol's plain HTTP. Every
wait is on a condition, checked in the page (``wait_for``), with a deadline.
chromedriver runs in its own process group, which is killed (with the
browser in it) when the ``Browser`` closes, so no process is left behind.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import httpx
import trio

__all__ = ["CHROMIUM", "CHROMEDRIVER", "Browser", "browser", "missing"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1700", "--hide-scrollbars"]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (apt-get install -y chromium chromium-driver)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriverError(Exception):
    pass


class Browser:
    def __init__(self, http: httpx.AsyncClient, session: str) -> None:
        self.http, self.session = http, session

    async def _call(self, method: str, path: str, body: dict | None = None):
        response = await self.http.request(method, f"/session/{self.session}{path}", json=body)
        value = response.json()["value"]
        if response.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:500]}")
        return value

    async def get(self, url: str) -> None:
        await self._call("POST", "/url", {"url": url})

    async def js(self, script: str, *args):
        """Run ``script`` (a function body; ``arguments`` holds ``args``) in the page; its return value."""
        return await self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def wait_for(self, script: str, *args, timeout: float = 20.0, what: str = ""):
        """Wait until ``script`` returns something truthy (checked every 50 ms); return it."""
        last = None
        with trio.move_on_after(timeout):
            while True:
                last = await self.js(script, *args)
                if last:
                    return last
                await trio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what or script!r} (last: {last!r})")

    async def new_window(self) -> str:
        """Open a new window (not a background tab: each one stays visible) and switch to it."""
        handle = (await self._call("POST", "/window/new", {"type": "window"}))["handle"]
        await self._call("POST", "/window", {"handle": handle})
        return handle

    async def switch(self, handle: str) -> None:
        await self._call("POST", "/window", {"handle": handle})

    async def screenshot(self) -> bytes:
        return base64.b64decode(await self._call("GET", "/screenshot"))


class browser:
    """``async with browser() as b:`` a fresh headless Chromium with its own profile."""

    async def __aenter__(self) -> Browser:
        self.profile = tempfile.mkdtemp(prefix="rankwarden-chromium-")
        port = _free_port()
        self.driver = await trio.lowlevel.open_process(
            [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
        try:
            with trio.fail_after(20):
                while True:
                    try:
                        if (await self.http.get("/status")).json()["value"]["ready"]:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
                "binary": CHROMIUM, "args": [*ARGS, f"--user-data-dir={self.profile}"]}}}}
            created = await self.http.post("/session", json=caps)
            value = created.json()["value"]
            if created.status_code != 200:
                raise WebDriverError(f"could not start Chromium: {value.get('message', '')[:1000]}")
            self.browser = Browser(self.http, value["sessionId"])
        except BaseException:
            await self._close()
            raise
        return self.browser

    async def __aexit__(self, *exc) -> None:
        with trio.CancelScope(shield=True):
            try:
                with trio.move_on_after(10):
                    await self.http.delete(f"/session/{self.browser.session}")
            except httpx.HTTPError:
                pass
            await self._close()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                os.killpg(self.driver.pid, signal.SIGKILL)  # chromedriver and the browser it started
            except ProcessLookupError:
                pass
            await self.driver.wait()
            await self.http.aclose()
            shutil.rmtree(self.profile, ignore_errors=True)
