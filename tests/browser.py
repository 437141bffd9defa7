"""Headless-browser UI checks for tests: Selenium driving Debian's Chromium and chromedriver.

    from browser import chromium_available, open_browser, wait_for_text  # pytest puts tests/ on sys.path

    reason = chromium_available()
    if reason:
        pytest.skip(reason)
    with open_browser() as driver:
        driver.get(f"{prefect_url}/deployments/deployment/{deployment_id}")
        text = wait_for_text(driver, ["release-deploy", "Prompt length, tokens"])

Nothing leaves 127.0.0.1: Selenium Manager is kept offline (we always name the Debian
chromedriver and chromium binaries, and set SE_OFFLINE), and Chromium sends every request for a
host other than loopback to a dead proxy, resolves no other host name, and has its background
services (sync, component updates, safe browsing, metrics) turned off.

Both Prefect's and MLflow's UIs are single-page apps: the HTML arrives empty and the text shows up
after their API calls return, so read pages with `wait_for_text`, never straight after `get`.
`document.body.innerText` leaves out what is typed in form fields; `input_values` reads those.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # selenium is imported lazily: a machine without it skips, it does not fail.
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

# Never let Selenium Manager look for (or download) a browser or driver.
os.environ.setdefault("SE_OFFLINE", "true")

CHROMIUM = os.environ.get("LORALINE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LORALINE_CHROMEDRIVER", "/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"

# Hosts other than loopback go to this proxy, where nothing listens: their requests fail at once.
_DEAD_PROXY = "http://127.0.0.1:9"

_CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # we run as root in CI
    "--disable-dev-shm-usage",  # /dev/shm is small in containers
    "--disable-gpu",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-default-apps",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication",
    "--no-pings",
    "--metrics-recording-only",
    "--safebrowsing-disable-auto-update",
    "--password-store=basic",
    "--use-mock-keychain",
    "--hide-scrollbars",
    "--lang=en-US",
    # Loopback bypasses the proxy implicitly; everything else is sent to the dead proxy.
    f"--proxy-server={_DEAD_PROXY}",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]


def chromium_available() -> str | None:
    """Why a browser check cannot run here (a reason for `pytest.skip`), or None when it can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return (
                f"{path} not found: apt-get install -y --no-install-recommends chromium chromium-driver"
                f" (Debian package {package})"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install 'selenium>=4.11'"
    return None


@contextlib.contextmanager
def open_browser(
    width: int = 1400, height: int = 1000, *, record_network: bool = False
) -> Iterator[WebDriver]:
    """A headless Chromium under chromedriver, quit (with its processes) however the block ends.

    The viewport (what `screenshot` captures, `window.innerWidth/innerHeight`) is `width`x`height`.
    With `record_network`, `network_requests(driver)` lists every request the browser made.
    """
    reason = chromium_available()
    if reason:
        raise RuntimeError(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in _CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    if record_network:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # The explicit executable_path keeps Selenium Manager out of it (it never runs, never downloads).
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        # --window-size is the outer window; headless Chromium keeps ~140px of it for its (unseen)
        # toolbar. Grow the window so the viewport is what was asked for.
        inner_w, inner_h = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        if (inner_w, inner_h) != (width, height):
            driver.set_window_size(2 * width - inner_w, 2 * height - inner_h)
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(30)
        driver._loraline_requests = []  # type: ignore[attr-defined]
        driver._loraline_request_ids = {}  # type: ignore[attr-defined]
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()


def network_requests(driver: WebDriver) -> list[dict]:
    """Every request the browser has made so far (needs `open_browser(record_network=True)`):
    dicts with `url`, `page` (the document that made it), `status` (HTTP status, or None) and
    `error` (Chromium's net error, e.g. 'net::ERR_PROXY_CONNECTION_FAILED', or None)."""
    import json

    log: list[dict] = driver._loraline_requests  # type: ignore[attr-defined]
    by_id: dict[str, dict] = driver._loraline_request_ids  # type: ignore[attr-defined]
    for entry in driver.get_log("performance"):  # drains Chromium's log: keep what it held
        msg = json.loads(entry["message"])["message"]
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Network.requestWillBeSent":  # a redirect reuses the requestId: a new entry
            if "redirectResponse" in params and params["requestId"] in by_id:
                # (Chromium's own http->https upgrades are "307 Internal Redirect"s: never sent)
                by_id[params["requestId"]]["status"] = params["redirectResponse"].get("status")
            req = {"url": params["request"]["url"], "page": params.get("documentURL"),
                   "status": None, "error": None}
            log.append(req)
            by_id[params["requestId"]] = req
        elif method == "Network.responseReceived" and params.get("requestId") in by_id:
            by_id[params["requestId"]]["status"] = params["response"].get("status")
        elif method == "Network.loadingFailed" and params.get("requestId") in by_id:
            by_id[params["requestId"]]["error"] = params.get("errorText")
    return list(log)


def foreign_requests(driver: WebDriver) -> list[dict]:
    """`network_requests` for hosts other than loopback (data:, blob: and the like left out).
    With the dead proxy none of these left the machine: each ends with `error` set
    ('net::ERR_PROXY_CONNECTION_FAILED') or in a redirect Chromium made itself (status 307)."""
    from urllib.parse import urlsplit

    out = []
    for req in network_requests(driver):
        parts = urlsplit(req["url"])
        if parts.scheme not in ("http", "https", "ws", "wss", "ftp"):
            continue
        if parts.hostname in ("127.0.0.1", "localhost", "::1"):
            continue
        out.append(req)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:120] or "page"


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the visible viewport as `<repo>/test-artifacts/screenshots/<name>.png`; return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{_slug(name)}.png"
    driver.save_screenshot(str(path))
    return path


def body_text(driver: WebDriver) -> str:
    """What a reader sees: `document.body.innerText` ('' before the body exists)."""
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def wait_for_text(
    driver: WebDriver, texts: list[str], timeout: float = 60, *, name: str | None = None
) -> str:
    """Wait until every one of `texts` is in the page's visible text; return that text.

    On timeout a screenshot is saved (named `name`, else after the URL) and AssertionError lists
    the missing texts and the start of the page text.
    """
    deadline = time.monotonic() + timeout
    text, missing = "", list(texts)
    while True:
        with contextlib.suppress(Exception):  # a page mid-navigation may refuse scripts briefly
            text = body_text(driver)
        missing = [t for t in texts if t not in text]
        if not missing:
            return text
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    shot = None
    with contextlib.suppress(Exception):
        shot = screenshot(driver, name or f"timeout-{driver.current_url}")
    raise AssertionError(
        f"after {timeout:g}s on {driver.current_url} these texts are missing: {missing!r}\n"
        f"screenshot: {shot}\n--- page text (first 2000 chars) ---\n{text[:2000]}"
    )


_INPUT_VALUES_JS = """
const out = [];
for (const el of document.querySelectorAll('input, textarea, select')) {
  if (el.type === 'hidden' || el.type === 'password') continue;
  if ((el.type === 'checkbox' || el.type === 'radio')) { if (el.checked) out.push(el.value); continue; }
  if (el.value !== undefined && el.value !== '') out.push(String(el.value));
}
// Code editors (JSON parameters) keep their text in the DOM, not in an input.
for (const el of document.querySelectorAll('.cm-content, .CodeMirror-code, .monaco-editor .view-lines')) {
  const t = el.innerText.trim();
  if (t) out.push(t);
}
return out;
"""


def input_values(driver: WebDriver) -> list[str]:
    """The values of the page's form fields (inputs, text areas, selects, code editors) —
    which `document.body.innerText` leaves out — in document order, empty ones skipped."""
    return list(driver.execute_script(_INPUT_VALUES_JS) or [])


def wait_for_input_values(driver: WebDriver, values: list[str], timeout: float = 60) -> list[str]:
    """Wait until each of `values` is contained in some form-field value; return all the values."""
    deadline = time.monotonic() + timeout
    got: list[str] = []
    while True:
        with contextlib.suppress(Exception):
            got = input_values(driver)
        missing = [v for v in values if not any(v in g for g in got)]
        if not missing:
            return got
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    shot = None
    with contextlib.suppress(Exception):
        shot = screenshot(driver, f"timeout-inputs-{driver.current_url}")
    raise AssertionError(
        f"after {timeout:g}s on {driver.current_url} no form field holds {missing!r}; "
        f"fields hold {got!r}\nscreenshot: {shot}"
    )


_FIND_BY_TEXT_JS = """
const root = arguments[1] ? document.querySelector(arguments[1]) : document.body;
if (!root) return null;
const want = arguments[0].replace(/\\s+/g, ' ').trim();
const norm = s => (s || '').replace(/\\s+/g, ' ').trim();
const visible = e => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length) &&
  getComputedStyle(e).visibility !== 'hidden';
const clickable = 'button, a, summary, label, [role=tab], [role=button], [role=link], [role=menuitem],'
  + ' [role=option], [tabindex], li, td, th';
const own = [], whole = [];
for (const e of [root, ...root.querySelectorAll('*')]) {
  if (['SCRIPT', 'STYLE', 'OPTION', 'TITLE'].includes(e.tagName) || !visible(e)) continue;
  // The element's own text (Vue and React put empty text nodes and comments between).
  const direct = norm([...e.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join(' '));
  if (direct === want) own.push(e);
  else if (e.matches(clickable) && norm(e.innerText) === want) whole.push(e);
}
const pick = list => list.find(e => e.matches(clickable)) || list.find(e => e.closest(clickable)) || list[0];
let el = pick(own) || pick(whole);
if (el && !el.matches(clickable) && el.closest(clickable)) el = el.closest(clickable);
return el || null;
"""


def find_text(driver: WebDriver, text: str, within: str | None = None) -> WebElement | None:
    """The first visible element labelled `text` (its own text, whitespace normalised), preferring
    clickable ones (buttons, links, tabs, list items), or None. `within`: a CSS selector to
    search under (e.g. '[role=tablist]') when the label also appears elsewhere."""
    return driver.execute_script(_FIND_BY_TEXT_JS, text, within)


def click_text(driver: WebDriver, text: str, timeout: float = 30, *, within: str | None = None) -> None:
    """Click the visible button, link or tab labelled `text` (waiting for it to render); see
    `find_text`. Prefect's tabs are `<li class="p-tab">` without role=tab: they are found too."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        el = None
        with contextlib.suppress(Exception):
            el = find_text(driver, text, within)
        if el is not None:
            try:
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
                el.click()
                return
            except Exception as exc:  # covered by an overlay, or re-rendered: retry
                last = exc
                with contextlib.suppress(Exception):
                    driver.execute_script("arguments[0].click();", el)
                    return
        time.sleep(0.25)
    shot = None
    with contextlib.suppress(Exception):
        shot = screenshot(driver, f"timeout-click-{text}")
    raise AssertionError(
        f"no clickable {text!r} on {driver.current_url} after {timeout:g}s ({last!r}); screenshot: {shot}\n"
        f"--- page text ---\n{body_text(driver)[:2000]}"
    )


def scroll_to_text(driver: WebDriver, text: str, timeout: float = 30) -> None:
    """Scroll the element labelled `text` to the middle of the viewport (before a screenshot:
    `innerText` holds text below the fold, a screenshot shows only the viewport)."""
    deadline = time.monotonic() + timeout
    while True:
        el = None
        with contextlib.suppress(Exception):
            el = find_text(driver, text)
        if el is None:
            # Not an element's own text (e.g. split over several): find the smallest element holding it.
            with contextlib.suppress(Exception):
                el = driver.execute_script(
                    "let best=null; for (const e of document.body.querySelectorAll('*'))"
                    " if (e.innerText && e.innerText.includes(arguments[0]) && e.offsetHeight) best=e;"
                    " return best;",
                    text,
                )
        if el is not None:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
            time.sleep(0.2)
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{text!r} not on {driver.current_url} after {timeout:g}s")
        time.sleep(0.25)


def close_mlflow_assistant(driver: WebDriver) -> None:
    """MLflow 3's UI opens its 'MLflow Assistant' side panel (a third of the width) on a browser's
    first visit; close it, and remember that in the page's localStorage for later loads."""
    driver.execute_script(
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        "const b = document.querySelector("
        "  'button[data-component-id=\"mlflow.assistant.chat_panel.close\"]');"
        "if (b) b.click();"
    )
    time.sleep(0.3)


__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "SCREENSHOTS",
    "body_text",
    "chromium_available",
    "click_text",
    "find_text",
    "input_values",
    "open_browser",
    "screenshot",
    "network_requests",
    "foreign_requests",
    "close_mlflow_assistant",
    "scroll_to_text",
    "wait_for_input_values",
    "wait_for_text",
]
