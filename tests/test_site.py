"""The built website works in a real browser, offline.

Serves ``_build/html`` on 127.0.0.1 and opens every page in headless Chromium (the
Debian package, driven by Playwright's Python API; no browser is downloaded). Each
page must load with no console error, no failed request, no request leaving
127.0.0.1, every formula typeset by the locally served MathJax, and every image
decoded.

Without a built site or without Chromium the tests skip with the reason; with
``REQUIRE_SITE_TEST=1`` (as ``.ci/run`` sets it) they fail instead. Build the site
first with ``jupyter-book build .``.
"""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import shutil
import threading
import urllib.parse

import pytest

pytestmark = pytest.mark.site

ROOT = pathlib.Path(__file__).resolve().parents[1]
SITE = ROOT / "_build" / "html"
REQUIRED = os.environ.get("REQUIRE_SITE_TEST") == "1"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Folders of assets, not pages; index.html is only a redirect (tested on its own).
NOT_PAGES = {"_static", "_sources", "_images", "jupyter_execute"}
TIMEOUT_MS = 30_000


def _site_pages() -> list[str]:
    if not SITE.is_dir():
        return []
    pages = []
    for path in sorted(SITE.rglob("*.html")):
        rel = path.relative_to(SITE)
        if rel.parts[0] in NOT_PAGES or rel.as_posix() == "index.html":
            continue
        pages.append(rel.as_posix())
    return pages


PAGES = _site_pages()


def _unavailable(reason: str):
    """Skip, or fail when the site test is mandatory (CI)."""
    if REQUIRED:
        pytest.fail(f"REQUIRE_SITE_TEST=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _chromium_path() -> str | None:
    candidate = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if pathlib.Path(candidate).is_file():
        return candidate
    return shutil.which("chromium")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture(scope="module")
def server():
    """Base URL of ``_build/html`` served on an ephemeral port of 127.0.0.1."""
    if not (SITE / "book" / "intro.html").is_file():
        _unavailable(
            f"the site is not built ({SITE} has no book/intro.html); "
            "run: jupyter-book build ."
        )
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium, launched once for all pages."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed")
    executable = _chromium_path()
    if executable is None:
        _unavailable("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


class PageLog:
    """Everything a page did wrong while loading."""

    def __init__(self, page, base: str):
        self.problems: list[str] = []
        self.host = urllib.parse.urlsplit(base).netloc
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.route("**/*", self._route)

    def _console(self, msg):
        if msg.type == "error":
            self.problems.append(f"console error: {msg.text} ({msg.location})")

    def _failed(self, request):
        self.problems.append(f"request failed: {request.url} ({request.failure})")

    def _response(self, response):
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def _route(self, route):
        url = urllib.parse.urlsplit(route.request.url)
        if url.scheme in ("data", "blob") or url.netloc == self.host:
            route.continue_()
        else:
            self.problems.append(f"off-site request: {route.request.url}")
            route.abort()


# Runs in the page after load: waits for MathJax, then reports what is wrong.
CHECK_PAGE_JS = r"""
async () => {
  const report = {mathjax: false, math: 0, untypeset: [], merror: 0, undefined: [],
                  raw: [], images: 0, broken: []};
  report.math = document.querySelectorAll('.math').length;
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    report.mathjax = true;
    await window.MathJax.startup.promise;
  }
  for (const el of document.querySelectorAll('.math')) {
    if (!el.querySelector('mjx-container')) {
      report.untypeset.push(el.textContent.trim().slice(0, 80));
    }
  }
  report.merror = document.querySelectorAll('mjx-merror, [data-mjx-error]').length;
  // MathJax shows an undefined macro as red text instead of an error
  report.undefined = Array.from(
    document.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]'))
    .map((el) => el.textContent).filter((text) => text.startsWith('\\'));
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const skip = 'PRE, CODE, SCRIPT, STYLE, TEXTAREA, MJX-CONTAINER, KBD, SAMP';
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent;
    if (!/\$\$|\\\(|\\\[|\\begin\{/.test(text)) continue;
    if (node.parentElement && node.parentElement.closest(skip)) continue;
    report.raw.push(text.trim().slice(0, 80));
  }
  const images = Array.from(document.images);
  report.images = images.length;
  await Promise.all(images.map((img) => {
    img.loading = 'eager';
    return img.decode().catch(() => null);
  }));
  report.broken = images.filter((img) => !(img.complete && img.naturalWidth > 0))
                        .map((img) => img.getAttribute('src'));
  return report;
}
"""


@pytest.mark.parametrize("page_path", PAGES or ["<no pages>"])
def test_page_renders_offline(server, browser, page_path):
    """The page loads cleanly, its math is typeset and its images are decoded."""
    if page_path == "<no pages>":
        _unavailable(f"no HTML pages under {SITE}")
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log = PageLog(page, server)
    try:
        page.goto(server + page_path, wait_until="load")
        report = page.evaluate(CHECK_PAGE_JS)
        # late requests (fonts MathJax asks for while typesetting) must succeed too
        page.wait_for_load_state("networkidle")
    finally:
        context.close()

    problems = list(log.problems)
    if report["math"] and not report["mathjax"]:
        problems.append(f"{report['math']} formulas but MathJax did not load")
    problems += [f"formula not typeset: {text!r}" for text in report["untypeset"]]
    if report["merror"]:
        problems.append(f"{report['merror']} MathJax errors (mjx-merror)")
    problems += [f"undefined LaTeX macro: {name}" for name in report["undefined"]]
    problems += [f"raw LaTeX left in the text: {text!r}" for text in report["raw"]]
    problems += [f"image not decoded: {src}" for src in report["broken"]]
    if problems:
        shown = problems[:25]
        if len(problems) > 25:
            shown.append(f"... and {len(problems) - 25} more")
        pytest.fail(f"{page_path}:\n  " + "\n  ".join(shown), pytrace=False)


def test_index_redirects_to_landing_page(server, browser):
    """The site root leads to the landing page."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log = PageLog(page, server)
    try:
        page.goto(server, wait_until="load")
        page.wait_for_url("**/book/intro.html")
        title = page.title()
    finally:
        context.close()
    assert "Dynamic Convolution" in title
    assert not log.problems, "\n".join(log.problems)


def test_every_toc_page_is_built():
    """Each file listed in ``_toc.yml`` became an HTML page."""
    if not SITE.is_dir():
        _unavailable(f"the site is not built ({SITE} is missing)")
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [entry["file"] for entry in part["chapters"]]
    missing = [f for f in files if not (SITE / f"{f}.html").is_file()]
    assert not missing, f"pages in _toc.yml that were not built: {missing}"
