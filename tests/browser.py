"""Headless Chromium driven over the DevTools protocol, for the report page's browser test.

The browser comes from Debian's `chromium` package (`.ci/install-browser`). Console errors,
uncaught exceptions, error log entries and every network request are recorded while a page loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Self

import websocket

STARTUP_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 60.0


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _read_text(path: str) -> str:
    """Return a file's text, or "" while it does not exist yet."""
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


@dataclass
class PageLog:
    """What a page did while it loaded and ran: errors and requests other than the page itself."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


class Chromium:
    """One headless Chromium process with one page, closed on exit."""

    def __init__(self, executable: str, width: int = 1280, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="rayq-chromium-")
        # A file, not a pipe: Chromium logs a lot, and a full pipe would block it.
        self.stderr_path = os.path.join(self.profile, "stderr.log")
        self.stderr = open(self.stderr_path, "wb")  # noqa: SIM115  (open while Chromium runs)
        # --no-sandbox: CI runs as root, where Chromium's sandbox does not start.
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.stderr)
        self.next_id = 0
        self.events: list[dict] = []
        self.socket = websocket.create_connection(self._page_socket_url(), timeout=COMMAND_TIMEOUT_S,
                                                  suppress_origin=True)

    def _page_socket_url(self) -> str:
        # With port 0 Chromium picks a free port and writes it to DevToolsActivePort.
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _read_text(port_file).strip():
            if self.process.poll() is not None:
                with open(self.stderr_path, errors="replace") as log:
                    raise RuntimeError("chromium exited at start: " + log.read()[-2000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium wrote no DevToolsActivePort in {STARTUP_TIMEOUT_S} s")
            time.sleep(0.1)
        port = int(_read_text(port_file).split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            targets = json.load(reply)
        return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

    def send(self, method: str, **params) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for_event(self, method: str, timeout_s: float = COMMAND_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        for event in self.events:
            if event.get("method") == method:
                return event
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            self.events.append(message)
            if message.get("method") == method:
                return message
        raise TimeoutError(f"no {method} within {timeout_s} s")

    def open(self, url: str, settle_s: float = 0.5) -> PageLog:
        """Load `url`, wait for its load event and a short settle time, and return its log."""
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")
        self.evaluate(f"new Promise(done => setTimeout(done, {int(settle_s * 1000)}))")
        return self.page_log(url)

    def page_log(self, url: str) -> PageLog:
        log = PageLog()
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                log.errors.append("exception: " + details.get("exception", {}).get(
                    "description", details.get("text", "")))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                log.errors.append(f"console.{params['type']}: " + " ".join(
                    str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                log.errors.append(f"log: {params['entry']['text']}")
            elif method == "Network.requestWillBeSent":
                requested = params["request"]["url"]
                if requested != url and not requested.startswith("data:"):
                    log.requests.append(requested)
        return log

    def evaluate(self, expression: str):
        """Evaluate JavaScript in the page and return its value (promises are awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: str) -> None:
        import base64

        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.stderr.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
