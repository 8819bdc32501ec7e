"""A small headless-Chromium driver over the Chrome DevTools Protocol (CDP), for UI checks.

No Playwright or Selenium: it starts the system `chromium` (Debian package) with
--remote-debugging-port=0, reads the port from DevToolsActivePort in its throw-away profile,
and speaks CDP over a websocket with aiohttp (already installed: mlflow depends on it). The
CDP connection lives on an event loop in a background thread; the public API is synchronous.

    with Browser() as b:
        b.set_credentials("http://127.0.0.1:5050", "admin", "secret")  # basic auth, optional
        b.open("http://127.0.0.1:5050/#/models")
        b.wait_for_text("unclip", timeout=30)
        b.screenshot("models.png")
        b.local_storage()  # {"mlflow.workflowType_v1": ...}

Every Browser has its own empty profile, so a new Browser is a fresh browser: no
localStorage, no cookies, no cached credentials.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary: $CHROMIUM if set, else the first on PATH, else None."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


class CDPError(RuntimeError):
    """A CDP command answered with an error, or the browser went away."""


class WaitTimeoutError(AssertionError):
    """wait_for_text timed out; the message carries the URL and the start of the page text."""


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Browser:
    """One headless Chromium with one page (tab), driven over CDP.

    width/height: the viewport (and window) size in CSS pixels. chromium: the binary (default
    find_chromium()). timeout: seconds for each CDP command and for start-up.
    """

    def __init__(
        self,
        *,
        width: int = 1400,
        height: int = 900,
        chromium: str | None = None,
        timeout: float = 30.0,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self.chromium = chromium or find_chromium()
        if not self.chromium:
            raise FileNotFoundError("no chromium binary found (apt-get install chromium)")
        self.extra_args = list(extra_args)
        self.console: list[str] = []  # console messages and uncaught exceptions of the page
        self.timings: list[tuple[str, float]] = []  # (what, seconds) of each open / wait
        self._trace = bool(os.environ.get("UI_BROWSER_TRACE"))
        self._credentials: dict[str, tuple[str, str]] = {}
        self._inflight: dict[str, float] = {}  # the page's running requests: id -> start
        self._last_network = time.monotonic()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._handlers: dict[str, list[Callable[[dict, str | None], None]]] = {}
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._profile: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http = self._ws = self._reader = None
        self.session: str | None = None

    # ---------------------------------------------------------------- life cycle

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        started = time.monotonic()
        self._profile = tempfile.mkdtemp(prefix="cdp-profile-")
        args = [
            self.chromium,
            "--headless=new",
            "--no-sandbox",  # we run as root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={self._profile}",
            f"--window-size={self.width},{self.height}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--metrics-recording-only",
            "--mute-audio",
            "--hide-scrollbars",
            "--password-store=basic",
            "--use-mock-keychain",
            *self.extra_args,
            "about:blank",
        ]
        # stderr to an unbounded temp file (a pipe nobody reads could fill and stall
        # chromium); its own process group, so close() can end its helper processes too
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        ws_url = self._devtools_url()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._run(self._connect(ws_url))
        self.on("Fetch.requestPaused", self._on_request_paused)
        self.on("Fetch.authRequired", self._on_auth_required)
        self.on("Runtime.consoleAPICalled", self._on_console)
        self.on("Runtime.exceptionThrown", self._on_exception)
        self.on("Network.requestWillBeSent", self._on_request)
        for done in ("Network.loadingFinished", "Network.loadingFailed"):
            self.on(done, self._on_request_done)
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=None)
        attached = self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=None
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        self._timed("start chromium", time.monotonic() - started)

    def close(self) -> None:
        started = time.monotonic()
        if self._loop is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                self._run(self._disconnect(), timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
        self._loop = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # helpers left in its group
        self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._profile:
            for _ in range(10):  # helper processes may still write for a moment after exit
                shutil.rmtree(self._profile, ignore_errors=True)
                if not os.path.exists(self._profile):
                    break
                time.sleep(0.2)
            self._profile = None
        self._timed("close chromium", time.monotonic() - started)

    def _devtools_url(self) -> str:
        """ws://127.0.0.1:PORT/devtools/browser/ID, from DevToolsActivePort in the profile."""
        assert self._proc is not None and self._profile is not None
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace")
                raise CDPError(f"chromium exited with {self._proc.returncode}: {err[-2000:]}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                lines = marker.read_text().split()
                if len(lines) >= 2:
                    return f"ws://127.0.0.1:{int(lines[0])}{lines[1]}"
            time.sleep(0.05)
        raise CDPError(f"chromium did not write {marker} within {self.timeout}s")

    # ---------------------------------------------------------------- CDP plumbing

    def _run(self, coro, timeout: float | None = None):
        assert self._loop is not None, "browser is not started"
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout or self.timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _connect(self, ws_url: str) -> None:
        import aiohttp

        self._http = aiohttp.ClientSession()
        # max_msg_size=0: screenshots arrive as one large base64 message.
        self._ws = await self._http.ws_connect(ws_url, max_msg_size=0, autoping=True)
        self._reader = asyncio.ensure_future(self._read())

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    async def _read(self) -> None:
        import aiohttp

        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            for handler in self._handlers.get(data.get("method", ""), []):
                try:
                    handler(data.get("params", {}), data.get("sessionId"))
                except Exception as exc:  # a broken handler must not kill the reader
                    self.console.append(f"[handler error] {data.get('method')}: {exc!r}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CDPError("browser connection closed"))

    async def _send(self, method: str, params: dict | None, session: str | None) -> dict:
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        future = self._loop.create_future()
        self._pending[msg_id] = future
        await self._ws.send_str(json.dumps(message))
        reply = await future
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    _PAGE = object()

    def send(self, method: str, params: dict | None = None, *, session: Any = _PAGE) -> dict:
        """Send one CDP command (to the page's session unless session=None: the browser)."""
        target = self.session if session is Browser._PAGE else session
        return self._run(self._send(method, params, target))

    def _send_later(self, method: str, params: dict, session: str | None) -> None:
        """From an event handler (loop thread): send without waiting for the answer."""
        task = asyncio.ensure_future(self._send(method, params, session))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def on(self, event: str, handler: Callable[[dict, str | None], None]) -> None:
        """Call handler(params, session_id) on the loop thread for each CDP event (no blocking)."""
        self._handlers.setdefault(event, []).append(handler)

    # ---------------------------------------------------------------- event handlers

    def _on_request_paused(self, params: dict, session: str | None) -> None:
        self._send_later("Fetch.continueRequest", {"requestId": params["requestId"]}, session)

    def _on_auth_required(self, params: dict, session: str | None) -> None:
        challenge = params.get("authChallenge", {})
        creds = self._credentials.get(challenge.get("origin", "").rstrip("/"))
        if creds and challenge.get("source", "Server") == "Server":
            answer = {"response": "ProvideCredentials", "username": creds[0], "password": creds[1]}
        else:
            answer = {"response": "CancelAuth"}
        self._send_later(
            "Fetch.continueWithAuth",
            {"requestId": params["requestId"], "authChallengeResponse": answer},
            session,
        )

    def _on_request(self, params: dict, session: str | None) -> None:
        if params.get("type") not in ("WebSocket", "EventSource"):
            self._inflight.setdefault(params["requestId"], time.monotonic())
            self._last_network = time.monotonic()

    def _on_request_done(self, params: dict, session: str | None) -> None:
        self._inflight.pop(params["requestId"], None)
        self._last_network = time.monotonic()

    def _on_console(self, params: dict, session: str | None) -> None:
        texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
        self.console.append(f"[{params.get('type')}] {' '.join(texts)}"[:500])

    def _on_exception(self, params: dict, session: str | None) -> None:
        details = params.get("exceptionDetails", {})
        text = details.get("exception", {}).get("description") or details.get("text", "")
        self.console.append(f"[exception] {text}"[:500])

    # ---------------------------------------------------------------- page API

    def set_credentials(self, base_url: str, username: str, password: str) -> None:
        """Answer HTTP basic-auth challenges from base_url's origin with these credentials.

        Uses Fetch.enable(handleAuthRequests) limited to that origin, so the credentials go
        only to the server that asks for them (an Authorization header set with
        Network.setExtraHTTPHeaders would go to every site the page talks to).
        """
        self._credentials[_origin(base_url)] = (username, password)
        patterns = [{"urlPattern": f"{origin}/*"} for origin in self._credentials]
        self.send("Fetch.enable", {"patterns": patterns, "handleAuthRequests": True})

    def open(self, url: str, *, wait_load: bool = True, timeout: float | None = None) -> None:
        """Navigate the page to url; with wait_load, until document.readyState is complete."""
        self._timed(f"open {url}", 0.0)
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        if wait_load:
            self.wait_for(
                "document.readyState === 'complete'", timeout=timeout or self.timeout, what="load"
            )

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        """Value of a JavaScript expression in the page (JSON-serialisable results only)."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": await_promise},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"evaluating {expression[:80]!r}: {text}")
        return result.get("result", {}).get("value")

    def wait_for(
        self, expression: str, *, timeout: float = 30.0, interval: float = 0.25, what: str = ""
    ) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value (real time)."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            with contextlib.suppress(CDPError):  # during navigation the context may be gone
                if value := self.evaluate(expression):
                    self._timed(what or expression[:60], time.monotonic() - start)
                    return value
            if time.monotonic() > deadline:
                raise WaitTimeoutError(
                    f"timed out after {timeout}s waiting for {what or expression!r} on "
                    f"{self.url()}; page text starts: {self.text()[:600]!r}"
                )
            time.sleep(interval)

    def wait_network_idle(
        self, *, quiet: float = 0.5, timeout: float = 20.0, stale: float = 2.0
    ) -> bool:
        """Wait until no request has started or ended for `quiet` seconds and none is running
        but those older than `stale` seconds (workers, long polls: their ends never show on
        the page). False when timeout comes first (a page that polls); not an error."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            now = time.monotonic()
            running = [t for t in list(self._inflight.values()) if now - t < stale]
            if not running and now - self._last_network >= quiet:
                self._timed("network idle", time.monotonic() - start)
                return True
            time.sleep(0.1)
        self._timed("network never idle", timeout)
        return False

    def _timed(self, what: str, seconds: float) -> None:
        self.timings.append((what, seconds))
        if self._trace:
            print(f"[ui_browser] {seconds:6.2f}s {what}", file=sys.stderr)

    def text(self) -> str:
        """document.body.innerText (what a user can read), '' before there is a body."""
        with contextlib.suppress(CDPError):
            return self.evaluate("document.body ? document.body.innerText : ''") or ""
        return ""

    def url(self) -> str:
        with contextlib.suppress(CDPError):
            return self.evaluate("location.href") or ""
        return ""

    def wait_for_text(self, *texts: str, timeout: float = 30.0, any_of: bool = False) -> str:
        """Wait until all texts (or, with any_of, one of them) appear in document.body.innerText.

        Returns the page text at that moment. Raises WaitTimeoutError (with the page text) on
        timeout.
        """
        needles = json.dumps(list(texts))
        test = "some" if any_of else "every"
        self.wait_for(
            f"(() => {{ const t = document.body ? document.body.innerText : '';"
            f" return {needles}.{test}(n => t.includes(n)); }})()",
            timeout=timeout,
            what=f"{'any of' if any_of else 'all of'} {list(texts)}",
        )
        return self.text()

    def click(self, selector: str, text: str | None = None, *, timeout: float = 10.0) -> None:
        """Click the first element matching a CSS selector (and, if given, whose innerText,
        trimmed, equals text), waiting up to timeout for it to appear."""
        find = (
            f"[...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => {json.dumps(text)} === null || e.innerText.trim() === {json.dumps(text)})"
        )
        self.wait_for(
            f"(() => {{ const e = {find}; if (e) {{ e.scrollIntoView({{block: 'center'}});"
            f" e.click(); return true; }} return false; }})()",
            timeout=timeout,
            what=f"{selector} {text!r}" if text else selector,
        )

    def fill(self, selector: str, value: str, *, timeout: float = 10.0) -> None:
        """Type value into an <input> the way React notices (native setter + input event)."""
        self.wait_for(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false;"
            " const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;"
            f" set.call(e, {json.dumps(value)});"
            " e.dispatchEvent(new Event('input', {bubbles: true}));"
            " e.dispatchEvent(new Event('change', {bubbles: true})); return true; })()",
            timeout=timeout,
            what=selector,
        )

    def press(self, key: str = "Escape") -> None:
        """Press and release a key (real input events, e.g. to close a drop-down)."""
        codes = {"Escape": 27, "Enter": 13, "Tab": 9}
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": codes.get(key, 0)},
            )

    def set_local_storage(self, url: str, items: dict[str, str]) -> None:
        """Put items into localStorage of url's origin (opens url to get there)."""
        self.open(url)
        self.evaluate(
            f"Object.entries({json.dumps(items)}).forEach(([k, v]) => localStorage.setItem(k, v))"
        )

    def local_storage(self) -> dict[str, str]:
        """The page origin's localStorage as a dict."""
        return json.loads(self.evaluate("JSON.stringify(Object.assign({}, localStorage))"))

    def screenshot(self, path: str | os.PathLike, *, full_page: bool = False) -> Path:
        """Save a PNG of the viewport (or, with full_page, the whole scrollable page), once
        the page's network has gone quiet (images and late data in)."""
        self.wait_network_idle(timeout=5)
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            )
        started = time.monotonic()
        data = self.send("Page.captureScreenshot", params)["data"]
        self._timed(f"screenshot {Path(path).name}", time.monotonic() - started)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


# ---------------------------------------------------------------- site recipes

# On a browser's first visit MLflow 3 opens its "MLflow Assistant" side panel (a third of the
# page) and the model registry shows a "new Model Registry UI" pop-up; these localStorage
# entries say both were seen and closed (for screenshots; never for fresh-browser checks).
MLFLOW_FIRST_VISIT_DISMISSED = {
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
    "_mlflow_model_registry_promo_modal_dismissed_v1": "true",
}
# The sidebar's GenAI / Model training switch as a user who clicked "Model training" leaves
# it (key and JSON value as MLflow 3.17/3.18 store them; absent means GenAI).
MLFLOW_MODEL_TRAINING_MODE = {"mlflow.workflowType_v1": '"machine_learning"'}


def mlflow_experiment_url(
    base_url: str, experiment_id: str, *, run_id: str | None = None, tab: str = "runs"
) -> str:
    """A link that opens an experiment's training runs (or one run) in the Model-training UI.

    MLflow 3.17/3.18 keep the sidebar's GenAI / Model training switch in localStorage
    (mlflow.workflowType, default GENAI) and ignore the experiment's mlflow.experimentKind
    (mlflow/mlflow#24498), so a bare #/experiments/ID sends a fresh browser to the GenAI
    overview. The workflowType query parameter overrides localStorage for the page it is on.
    """
    page = f"runs/{run_id}" if run_id else tab
    base = base_url.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def mlflow_toggle_columns(browser: Browser, *names: str, timeout: float = 15.0) -> None:
    """In an MLflow runs table, click columns on or off in the Columns drop-down, as a user
    does (MLflow 3 shows no metric columns by default; "Dataset", on by default, is wide).

    The drop-down is a virtualised tree: rows exist only while scrolled into view and the
    Metrics / Parameters groups may start collapsed, so each poll clicks the column if it is
    rendered, else opens a closed group, else scrolls the tree one screen further.
    """
    browser.click("button", "Columns")
    for name in names:
        step = f"""(() => {{
            const holder = document.querySelector('.du-bois-light-tree-list-holder');
            if (!holder) return false;
            const nodes = [...document.querySelectorAll('.du-bois-light-tree-treenode')];
            const hit = nodes.find(n => n.innerText.trim() === {json.dumps(name)});
            if (hit) {{
                hit.querySelector('.du-bois-light-tree-node-content-wrapper').click();
                return true;
            }}
            const closed = holder.querySelector('.du-bois-light-tree-switcher_close');
            if (closed) closed.click();
            else if (holder.scrollTop + holder.clientHeight < holder.scrollHeight)
                holder.scrollTop += holder.clientHeight;
            else holder.scrollTop = 0;
            return false;
        }})()"""
        browser.wait_for(step, timeout=timeout, interval=0.2, what=f"column {name!r}")
    browser.press("Escape")


def mlflow_sidebar_mode(browser: Browser) -> str:
    """'genai' or 'machine_learning': which sidebar MLflow shows (from its entries)."""
    text = browser.text()
    if "Model registry" in text and "Judges" not in text:
        return "machine_learning"
    if "Judges" in text or "Observability" in text:
        return "genai"
    return "unknown"


def mlflow_page_state(browser: Browser, experiment_id: str, timeout: float = 60.0) -> dict:
    """Where the MLflow UI settles after opening an experiment link, as a user sees it: the
    URL and tab it picked, its workflowType, the sidebar shown, the heading, localStorage."""
    browser.wait_for(
        f"/^#\\/experiments\\/{experiment_id}\\/[a-z-]+/.test(location.hash)",
        timeout=timeout,
        what="the experiment page to pick a tab",
    )
    browser.wait_network_idle(quiet=1.0, timeout=15)  # the tab's data is in
    hash_ = browser.evaluate("location.hash")
    storage = browser.local_storage()
    return {
        "url": browser.url(),
        "tab": hash_.split("?")[0].split("/")[3],
        "workflowType_param": browser.evaluate(
            "new URLSearchParams(location.hash.split('?')[1] || '').get('workflowType')"
        ),
        "sidebar": mlflow_sidebar_mode(browser),
        "heading": browser.evaluate("(document.querySelector('h1, h2') || {}).innerText || ''"),
        "localStorage_workflowType": {k: v for k, v in storage.items() if "workflowType" in k},
        "localStorage_keys": sorted(storage),
    }


def mlflow_breadcrumb(browser: Browser) -> str:
    """The page's breadcrumb trail as one line ('unclip Evaluations' / 'unclip Runs')."""
    return browser.evaluate(
        "[...document.querySelectorAll('[class*=breadcrumb], nav ol')]"
        ".map(e => e.innerText.replace(/\\s+/g, ' ').trim()).filter(Boolean)[0] || ''"
    )


def zenml_login(browser: Browser, base_url: str, username: str, password: str) -> None:
    """Log in through the ZenML dashboard's own form (sets its session cookie and the
    dashboard's isAuthenticated flag). A no-op when the server runs without auth.

    A user's first dashboard login lands on an onboarding survey that swallows every
    deep link; like a user who answered it, this marks it done for the user
    (PUT /api/v1/current-user: email_opted_in false, user_metadata.finished_onboarding_survey).
    """
    base = base_url.rstrip("/")
    browser.open(f"{base}/login")
    browser.wait_for(
        "location.pathname !== '/login' || !!document.querySelector('input[name=username]')",
        what="the ZenML login form",
    )
    if browser.evaluate("location.pathname") == "/login":
        # Under load the click can land before the form's handlers are attached, and the
        # server's password check can take long: submit again, up to three times.
        for attempt in range(3):
            browser.fill("input[name=username]", username)
            browser.fill("input[name=password]", password)
            browser.click("form button", "Login")
            try:
                browser.wait_for("location.pathname !== '/login'", what="ZenML login to finish")
                break
            except WaitTimeoutError:
                if browser.evaluate("location.pathname") != "/login":
                    break  # it finished just after the wait gave up
                if attempt == 2:
                    raise
    # Asked of the server, not read off the page: the dashboard first lands on /projects and
    # only then redirects to the survey (ZenML 0.98).
    status = browser.evaluate(
        """(async () => {
            const me = await (await fetch('/api/v1/current-user?hydrate=true')).json();
            const meta = (me.metadata && me.metadata.user_metadata) || {};
            if (!me.id || meta.finished_onboarding_survey) return 200;  // no auth, or done
            const r = await fetch('/api/v1/current-user', {
                method: 'PUT', headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({email_opted_in: false,
                    user_metadata: {...meta, finished_onboarding_survey: true}})});
            return r.status;
        })()""",
        await_promise=True,
    )
    if status != 200:
        raise CDPError(f"could not skip the ZenML onboarding survey: HTTP {status}")
