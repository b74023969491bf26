"""The built website works in a real browser, offline, as a reader sees it.

Serves ``_build/html`` on 127.0.0.1 and opens every page in headless Chromium (the
Debian package, driven by Playwright's Python API; no browser is downloaded), in a
window 1280 px wide and in one 390 px wide (a phone). Each page must load with no
console error, no failed request, no request leaving 127.0.0.1, every formula
typeset by the locally served MathJax, and every image decoded; and what a reader
sees must be right:

- nothing is wider than the text column unless it scrolls inside its own box; at
  1280 px no display equation and no code block scrolls at all, and at 390 px an
  equation that scrolls keeps its number visible beside it;
- no raw Markdown or LaTeX in the text (tables, ``$``-math, fences, roles);
- every exercise's solution is hidden until its title is clicked, then shown.

Search is tested over HTTP: a query returns results with text snippets.
``SITE_SCREENSHOTS=DIR`` saves a screenshot of every page at both widths there.

Without a built site or without Chromium the tests skip with the reason; with
``REQUIRE_SITE_TEST=1`` (as ``.ci/run`` sets it) they fail instead. Build the site
first with ``jupyter-book build .``.
"""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import re
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
# (name, viewport): a laptop window and a phone
WIDTHS = {
    "1280px": {"width": 1280, "height": 900},
    "390px": {"width": 390, "height": 844},
}
SCREENSHOTS = os.environ.get("SITE_SCREENSHOTS")


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
# `fit` (true at 1280 px) requires display equations and code blocks to fit the
# column without scrolling; otherwise they may scroll inside their own box.
CHECK_PAGE_JS = r"""
async (fit) => {
  const report = {mathjax: false, math: 0, untypeset: [], merror: 0, undefined: [],
                  raw: [], images: 0, broken: [], layout: [], exercises: 0,
                  solutions: [], shown: []};
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

  // Raw Markdown or LaTeX in the text a reader sees (code is allowed to show it).
  const rawPatterns = [
    ['LaTeX', /\$\$|\\\(|\\\[|\\begin\{/],
    ['Markdown table', /(^|\n)\s*\|.*\|\s*($|\n)|\|\s*:?-{3,}:?\s*\|/],
    ['$-math', /(^|[^\\\w$])\$[^$\s](?:[^$\n]*[^$\s\\])?\$(?![\w$])/],
    ['code fence', /```/],
    ['MyST role', /\{[a-z:-]+\}`/],
    ['bold markers', /\*\*[^*\s][^*]*\*\*/],
  ];
  const skip = 'PRE, CODE, SCRIPT, STYLE, TEXTAREA, MJX-CONTAINER, KBD, SAMP';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement && node.parentElement.closest(skip)) continue;
    const text = node.textContent;
    for (const [what, pattern] of rawPatterns) {
      if (pattern.test(text)) report.raw.push(`${what}: ${text.trim().slice(0, 80)}`);
    }
  }

  const images = Array.from(document.images);
  report.images = images.length;
  await Promise.all(images.map((img) => {
    img.loading = 'eager';
    return img.decode().catch(() => null);
  }));
  report.broken = images.filter((img) => !(img.complete && img.naturalWidth > 0))
                        .map((img) => img.getAttribute('src'));
  // drawn without distortion, and described: an alt text that is not a file name
  for (const img of images) {
    const box = img.getBoundingClientRect();
    if (img.naturalWidth > 0 && box.width > 0) {
      const drawn = box.height / box.width;
      const natural = img.naturalHeight / img.naturalWidth;
      if (Math.abs(drawn / natural - 1) > 0.02) {
        report.layout.push(`image ${img.getAttribute('src')} is distorted`);
      }
    }
    const alt = (img.getAttribute('alt') || '').trim();
    const content = (img.getAttribute('src') || '').includes('_images/');
    if (content && (alt.length < 15 || /\.(png|jpe?g|svg)$/.test(alt))) {
      report.layout.push(`image ${img.getAttribute('src')} has no alt text: ${alt}`);
    }
  }

  // Layout: the text column is the article; nothing may stick out of it unless
  // it sits in a box that scrolls horizontally.
  const article = document.querySelector('article.bd-article');
  const page = document.scrollingElement;
  if (page.scrollWidth > window.innerWidth + 1) {
    report.layout.push(`the page scrolls sideways (${page.scrollWidth} px wide)`);
  }
  if (article) {
    const col = article.getBoundingClientRect();
    const inside = (r) => r.left >= col.left - 1 && r.right <= col.right + 1;
    const scrolls = (el) => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX);
    const scrollBox = (el) => {
      for (let e = el; e && e !== article; e = e.parentElement) {
        if (scrolls(e)) return e;
      }
      return null;
    };
    const name = (el) => {
      const labelled = el.closest('[id]');
      const where = labelled ? `#${labelled.id}` : el.tagName.toLowerCase();
      return `${where} "${el.textContent.trim().replace(/\s+/g, ' ').slice(0, 50)}"`;
    };
    for (const mjx of article.querySelectorAll('mjx-container[display="true"]')) {
      const box = mjx.getBoundingClientRect();
      const what = `equation ${name(mjx.closest('div.math') || mjx)}`;
      if (!inside(box)) report.layout.push(`${what} sticks out of the column`);
      if (mjx.scrollWidth > mjx.clientWidth + 1) {
        if (fit) report.layout.push(`${what} is wider than the column`);
        else if (!scrolls(mjx)) report.layout.push(`${what} is cut off`);
      }
      const eqno = mjx.parentElement.querySelector(':scope > span.eqno');
      if (eqno) {
        const num = eqno.getBoundingClientRect();
        const overlaps = num.left < box.right - 1 && num.right > box.left + 1 &&
                         num.top < box.bottom && num.bottom > box.top;
        if (!inside(num) || num.width === 0) {
          report.layout.push(`${what}: its number is not visible`);
        } else if (overlaps) {
          report.layout.push(`${what}: its number is drawn over the formula`);
        }
      }
    }
    for (const pre of article.querySelectorAll('pre')) {
      const what = `code block ${name(pre)}`;
      if (!inside(pre.getBoundingClientRect())) {
        report.layout.push(`${what} sticks out of the column`);
      }
      if (pre.scrollWidth > pre.clientWidth + 1) {
        if (fit) report.layout.push(`${what} scrolls sideways`);
        else if (!scrollBox(pre)) report.layout.push(`${what} is cut off`);
      }
    }
    // anything else: tables, images, long words
    for (const el of article.querySelectorAll('*')) {
      if (el.closest('mjx-container, pre')) continue;
      const r = el.getBoundingClientRect();
      if (r.width === 0 || inside(r)) continue;
      if (scrollBox(el.parentElement || el)) continue;
      const tag = el.tagName.toLowerCase();
      report.layout.push(`${tag} ${name(el)} sticks out of the column`);
      if (report.layout.length > 40) break;
    }
  }

  // At 1280 px the "on this page" list shows each name on one line, unbroken.
  if (fit) {
    for (const code of document.querySelectorAll('.bd-sidebar-secondary code')) {
      if (code.getClientRects().length > 1) {
        report.layout.push(`contents entry broken over lines: ${code.textContent}`);
      }
    }
  }

  // Exercises: every solution starts hidden.
  const visible = (el) => el.getBoundingClientRect().height > 0 &&
    el.checkVisibility({visibilityProperty: true, opacityProperty: true});
  report.exercises = document.querySelectorAll('div.exercise').length;
  for (const sol of document.querySelectorAll('div.solution')) {
    report.solutions.push(sol.id);
    const body = Array.from(sol.children)
      .filter((c) => !c.classList.contains('admonition-title'));
    if (body.length === 0 || body.some(visible)) {
      report.shown.push(sol.id);
    }
  }
  return report;
}
"""

SOLUTION_SHOWN_JS = r"""
(id) => {
  const sol = document.getElementById(id);
  const body = Array.from(sol.children)
    .filter((c) => !c.classList.contains('admonition-title'));
  const visible = (el) => el.getBoundingClientRect().height > 0 &&
    el.checkVisibility({visibilityProperty: true, opacityProperty: true});
  return body.length > 0 && body.every(visible);
}
"""


def _problems(report: dict) -> list[str]:
    problems = []
    if report["math"] and not report["mathjax"]:
        problems.append(f"{report['math']} formulas but MathJax did not load")
    problems += [f"formula not typeset: {text!r}" for text in report["untypeset"]]
    if report["merror"]:
        problems.append(f"{report['merror']} MathJax errors (mjx-merror)")
    problems += [f"undefined LaTeX macro: {name}" for name in report["undefined"]]
    problems += [f"raw text: {text!r}" for text in report["raw"]]
    problems += [f"image not decoded: {src}" for src in report["broken"]]
    problems += report["layout"]
    problems += [f"solution {sol} is shown before a click" for sol in report["shown"]]
    return problems


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("page_path", PAGES or ["<no pages>"])
def test_page_as_a_reader_sees_it(server, browser, page_path, width):
    """The page loads cleanly, is typeset, fits its column, hides its solutions.

    A solution opens with the toggle button of its title.
    """
    if page_path == "<no pages>":
        _unavailable(f"no HTML pages under {SITE}")
    context = browser.new_context(viewport=WIDTHS[width])
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log = PageLog(page, server)
    try:
        page.goto(server + page_path, wait_until="load")
        report = page.evaluate(CHECK_PAGE_JS, width == "1280px")
        # late requests (fonts MathJax asks for while typesetting) must succeed too
        page.wait_for_load_state("networkidle")
        if SCREENSHOTS:
            shot = pathlib.Path(SCREENSHOTS) / width / (page_path[:-5] + ".png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
        # a click on its title shows each solution
        not_opened = []
        for sol in report["solutions"]:
            if sol in report["shown"]:
                continue
            button = page.locator(f'[id="{sol}"] > .admonition-title button')
            button.scroll_into_view_if_needed()
            button.click()
            page.wait_for_timeout(100)
            if not page.evaluate(SOLUTION_SHOWN_JS, sol):
                not_opened.append(sol)
    finally:
        context.close()

    problems = list(log.problems) + _problems(report)
    problems += [f"solution {sol} stays hidden after a click" for sol in not_opened]
    if page_path.startswith("chapters/"):
        if not report["exercises"]:
            problems.append("a chapter without exercises")
        if len(report["solutions"]) != report["exercises"]:
            problems.append(
                f"{report['exercises']} exercises but "
                f"{len(report['solutions'])} solutions"
            )
    if problems:
        shown = problems[:25]
        if len(problems) > 25:
            shown.append(f"... and {len(problems) - 25} more")
        pytest.fail(f"{page_path} at {width}:\n  " + "\n  ".join(shown), pytrace=False)


def test_search_shows_results_with_snippets(server, browser):
    """Over HTTP, searching finds pages and shows a snippet of each."""
    context = browser.new_context(viewport=WIDTHS["1280px"])
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log = PageLog(page, server)
    try:
        page.goto(server + "search.html?q=deformable+offsets", wait_until="load")
        page.wait_for_selector("ul.search li p.context", state="attached")
        page.wait_for_load_state("networkidle")
        results = page.locator("ul.search li").count()
        snippets = [
            text.strip()
            for text in page.locator("ul.search li p.context").all_inner_texts()
        ]
    finally:
        context.close()
    assert results >= 1, "no search results"
    assert any(len(text) > 20 for text in snippets), f"no snippets: {snippets}"
    assert not log.problems, "\n".join(log.problems)


def test_sidebar_numbers_chapters_after_their_files(server, browser):
    """The sidebar shows "N. Title" for chapters/NN_*.ipynb, numbered by the file."""
    context = browser.new_context(viewport=WIDTHS["1280px"])
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(server + "book/intro.html", wait_until="load")
        links = page.eval_on_selector_all(
            "nav.bd-docs-nav a.reference",
            "els => els.map(e => [e.getAttribute('href'), e.textContent.trim()])",
        )
    finally:
        context.close()
    chapters = [(href, text) for href, text in links if "chapters/" in href]
    assert chapters, f"no chapter links in the sidebar: {links}"
    for href, text in chapters:
        number = int(href.split("chapters/")[1][:2])
        assert text.startswith(f"{number}. "), f"{href} is listed as {text!r}"


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
        entries = list(part.get("chapters", []))
        while entries:
            entry = entries.pop(0)
            files.append(entry["file"])
            entries += entry.get("sections", [])
    missing = [f for f in files if not (SITE / f"{f}.html").is_file()]
    assert not missing, f"pages in _toc.yml that were not built: {missing}"


def test_downloads_are_served(server):
    """The wheel and the zip of the chapters that the setup page links to."""
    import io
    import urllib.request
    import zipfile

    setup = (SITE / "book" / "setup.html").read_text(encoding="utf-8")
    links = sorted(set(re.findall(r'href="\.\./(downloads/[^"]+)"', setup)))
    assert len(links) == 2, f"setup page download links: {links}"
    for link in links:
        with urllib.request.urlopen(server + link) as response:
            archive = zipfile.ZipFile(io.BytesIO(response.read()))
        names = archive.namelist()
        if link.endswith(".whl"):
            assert "refimpl/__init__.py" in names, names
        else:
            chapters = [
                n for n in names if n.startswith("dynamic-convolution/chapters/")
            ]
            built = [p.name for p in (ROOT / "chapters").glob("*.ipynb")]
            assert sorted(n.rsplit("/", 1)[1] for n in chapters) == sorted(built)
            assert "dynamic-convolution/refimpl/__init__.py" in names


def test_status_page_reports_every_chapter():
    """The status page: a row per chapter, with time, machine and versions."""
    if not (SITE / "book" / "status.html").is_file():
        _unavailable("the site is not built with its status page")
    import json

    page = (SITE / "book" / "status.html").read_text(encoding="utf-8")
    page = page[page.index('<table class="status-table') :]  # not the sidebar
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        status = json.loads(notebook.read_text(encoding="utf-8"))["metadata"][
            "book_status"
        ]
        seconds = f"{status['execution_seconds']:.0f} s"
        row = re.search(
            rf'href="\.\./chapters/{notebook.stem}\.html".*?</tr>', page, re.S
        )
        assert row, f"no row for {notebook.name}"
        assert seconds in row.group(0) and status["torch"] in row.group(0)
    import importlib.metadata

    torch = importlib.metadata.version("torch")
    assert f"<p>{torch}</p>" in page, "the build's torch version is not listed"


def test_api_pages_have_no_namedtuple_boilerplate():
    """Named-tuple fields are documented by their docstrings, not "Alias for ..."."""
    pages = sorted((SITE / "book" / "api").glob("*.html"))
    if not pages:
        _unavailable(f"the site is not built ({SITE / 'book' / 'api'} is missing)")
    noisy = [p.name for p in pages if "Alias for field number" in p.read_text("utf-8")]
    assert not noisy, f"API pages with named-tuple boilerplate: {noisy}"
