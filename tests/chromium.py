"""Drive a headless Chromium from Python with nothing but the standard library.

Chromium speaks the DevTools protocol (JSON commands and events) over two
pipes when started with --remote-debugging-pipe: it reads commands on its
file descriptor 3 and writes answers on 4, each message ended by a NUL
byte. That avoids a websocket client (a new dependency) and a TCP port.

    with Chromium() as browser:
        page = browser.open(Path("view.html").resolve().as_uri())
        page.evaluate("document.title")
        png = page.screenshot()

The flags keep the browser off the network: without the background ones it
tries to reach Google's servers (updates, sync, field trials), which these
machines refuse. --no-sandbox lets it run as root in a container, and
--disable-dev-shm-usage where a container's /dev/shm is small. Run as a script, it saves a screenshot of a page:

    python tests/chromium.py PAGE.html OUT.png [--width W] [--height H] [--wait-for JS]
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUIET_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


class BrowserError(RuntimeError):
    """Chromium exited, timed out, or answered a command with an error."""


def _above_nine(fd):
    """A copy of `fd` numbered 10 or more; the original is closed."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return copy


def find_chromium():
    """The path of a Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    def __init__(self, executable=None, width=1200, height=900, timeout=20.0):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("no chromium executable on PATH")
        self.size, self.timeout = (width, height), timeout
        self.next_id, self.events, self.pending = 0, [], b""

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="tinyddpm-chromium-")
        commands_read, self.commands = os.pipe()
        self.answers, answers_write = os.pipe()
        # Chromium wants the pipes as its descriptors 3 and 4; the shell moves them there.
        # Their ends are first copied above 9, so that moving one cannot overwrite the other.
        commands_read, answers_write = (_above_nine(fd) for fd in (commands_read, answers_write))
        args = QUIET_FLAGS + [f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
                              f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        script = f'exec "$0" "$@" 3<&{commands_read} 4>&{answers_write} {commands_read}<&- {answers_write}>&-'
        self.process = subprocess.Popen(["bash", "-c", script, self.executable, *args],
                                        pass_fds=(commands_read, answers_write),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(answers_write)
        return self

    def __exit__(self, *exc):
        try:
            self.send("Browser.close")
        except BrowserError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.answers)
        shutil.rmtree(self.profile, ignore_errors=True)

    # ---- the protocol ---------------------------------------------------------

    def send(self, method, params=None, session=None):
        """Send one command and wait for its answer; events that arrive meanwhile are kept."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        try:
            os.write(self.commands, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise BrowserError("chromium has exited") from None
        while True:
            answer = self._receive()
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})
            self.events.append(answer)

    def _receive(self):
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                raise BrowserError(f"no answer from chromium within {self.timeout} s")
            chunk = os.read(self.answers, 1 << 20)
            if not chunk:
                raise BrowserError("chromium has exited")
            self.pending += chunk
        message, self.pending = self.pending.split(b"\0", 1)
        return json.loads(message)

    def open(self, url):
        """A new tab showing `url`, once its load event has fired."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Network.enable")           # so that every request the page makes is recorded
        page.send("Page.enable")
        page.send("Page.navigate", {"url": url})
        page.wait_for("document.readyState === 'complete'")
        return page


class Page:
    def __init__(self, browser, session):
        self.browser, self.session = browser, session

    def send(self, method, params=None):
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {text}")
        return result["result"].get("value")

    def wait_for(self, condition, timeout=None):
        """Poll a JavaScript condition until it is true."""
        deadline = time.monotonic() + (timeout or self.browser.timeout)
        while not self.evaluate(f"Boolean({condition})"):
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for: {condition}")
            time.sleep(0.05)

    def requested_urls(self):
        """Every URL the page asked for since it was opened (data: URIs included)."""
        return [event["params"]["request"]["url"] for event in self.browser.events
                if event.get("method") == "Network.requestWillBeSent"
                and event.get("sessionId") == self.session]

    def screenshot(self, full_page=True):
        """PNG bytes of the page (the whole document when full_page)."""
        params = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            width, height = self.evaluate("[document.documentElement.scrollWidth,"
                                          " document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])


def main(argv):
    parser = argparse.ArgumentParser(description="Save a screenshot of a page with headless Chromium.")
    parser.add_argument("page", help="an HTML file")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--wait-for", metavar="JS", default="true",
                        help="a JavaScript condition to wait for before the picture is taken")
    args = parser.parse_args(argv)
    with Chromium(width=args.width, height=args.height) as browser:
        page = browser.open(Path(args.page).resolve().as_uri())
        page.wait_for(args.wait_for)
        Path(args.out).write_bytes(page.screenshot())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
