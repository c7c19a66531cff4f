"""Headless Chromium (Debian's `chromium`) for the pages we produce.

A page is served from a real HTTP server on loopback next to a small harness page that loads
it in an iframe (same origin), waits for it, and writes what a person would see into the DOM:
every image decoded (naturalWidth > 0), the visible headings, no broken references. Chromium's
``--dump-dom`` then prints the harness DOM for the test to assert on.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_HARNESS = """<!doctype html><html><body><pre id="out">pending</pre>
<iframe id="f" src="PAGE" style="width:1200px;height:900px"></iframe>
<script>
const f = document.getElementById('f');
f.addEventListener('load', () => {
  const d = f.contentDocument;
  const imgs = [...d.images];
  const wait = imgs.map(i => i.complete ? Promise.resolve() : new Promise(r => { i.onload = r; i.onerror = r; }));
  Promise.all(wait).then(() => {
    const out = {
      title: d.title,
      headings: [...d.querySelectorAll('h1,h2')].map(h => h.textContent.trim()),
      images: imgs.length,
      decoded: imgs.filter(i => i.naturalWidth > 0 && i.naturalHeight > 0).length,
      broken: imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
      tables: d.querySelectorAll('table').length,
      text_length: d.body.innerText.length,
      // review pages: the cards, their decoded thumbnails, the CSV export after filling in
      // the first card, and what the page itself caught going wrong
      cards: d.querySelectorAll('.card').length,
      card_images: [...d.querySelectorAll('.card img')].filter(i => i.naturalWidth > 0).length,
      csv: null,
      errors: (f.contentWindow.__pageErrors || []).slice(),
    };
    if (typeof f.contentWindow.reviewCsv === 'function') {
      const first = d.querySelector('.card input.label');
      if (first) { first.value = '3.5'; d.querySelector('.card input.note').value = 'a, "quoted" note'; }
      const who = d.getElementById('reviewer');
      if (who) who.value = 'tester';
      try { out.csv = f.contentWindow.reviewCsv(); } catch (e) { out.errors.push(String(e)); }
    }
    document.getElementById('out').textContent = 'RESULT' + JSON.stringify(out) + 'END';
  });
});
</script></body></html>"""


def chromium_flags(user_dir: str) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_dir}",
    ]


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (an ephemeral port); yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def inspect_page(page: Path, *, screenshot: Path | None = None, timeout: float = 90) -> dict:
    """Load ``page`` in headless Chromium; return what the harness saw (see module doc)."""
    if CHROMIUM is None:
        raise RuntimeError("Debian chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="airatings-browser-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        shutil.copy(page, site / "page.html")
        (site / "harness.html").write_text(_HARNESS.replace("PAGE", "page.html"))
        with serve(site) as base:
            flags = chromium_flags(str(Path(tmp) / "profile"))
            dom = subprocess.run(
                [
                    CHROMIUM,
                    *flags,
                    "--virtual-time-budget=10000",
                    "--dump-dom",
                    f"{base}/harness.html",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
            ).stdout
            if screenshot is not None:
                subprocess.run(
                    [
                        CHROMIUM,
                        *flags,
                        "--window-size=1200,1600",
                        f"--screenshot={screenshot}",
                        f"{base}/page.html",
                    ],
                    capture_output=True,
                    timeout=timeout,
                    check=True,
                )
    m = re.search(r"RESULT(.*?)END", dom, re.S)
    if not m:
        raise AssertionError(f"the harness did not finish; DOM was:\n{dom[:2000]}")
    # --dump-dom serializes the harness's text with HTML escapes (&lt; &gt; &amp; ...)
    return json.loads(html.unescape(m.group(1)))
