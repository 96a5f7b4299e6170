"""Render a page in a real headless browser (Debian's `chromium`) and report what a reader would meet.

`check_page(html_file)` loads a copy of the page with a small script injected first into <head>: it records
every error event (a resource that fails to load, an uncaught script error) and every console.error, and on
`load` lists the images that did not resolve (not complete, or no natural width). Chromium runs with every
host name mapped to NOTFOUND, so a page that needed the network would show broken resources too.
`screenshot(html_file, png)` saves what the page looks like.

The browser tests skip only when no chromium is installed AND KANO_REQUIRE_BROWSER is not 1 (CI sets it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHECK_SCRIPT = """<script>
window.__kano = {errors: []};
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__kano.errors.push(t && t !== window && (t.src || t.href) ? 'resource: ' + (t.src || t.href) : 'script: ' + e.message);
}, true);
var __kanoConsoleError = console.error;
console.error = function () { window.__kano.errors.push('console: ' + Array.from(arguments).join(' ')); __kanoConsoleError.apply(console, arguments); };
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.getAttribute('src'); });
  var out = document.createElement('pre'); out.id = 'kano-check';
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, errors: window.__kano.errors,
                                    svgs: document.querySelectorAll('svg').length, title: document.title});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("KANO_REQUIRE_BROWSER") == "1":
            pytest.fail("KANO_REQUIRE_BROWSER=1 but no chromium is installed (apt-get install -y chromium)")
        pytest.skip("no chromium installed (apt-get install -y chromium; CI sets KANO_REQUIRE_BROWSER=1)")
    return path


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    exe = require_chromium()
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp}", "--virtual-time-budget=5000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=120)


def check_page(page: Path) -> dict:
    """{'images': n, 'broken': [src...], 'errors': [...], 'svgs': n, 'title': str} as the browser saw the page."""
    page = Path(page)
    probe = page.with_name("_browser_check_" + page.name)  # beside the page, so its relative links resolve alike
    probe.write_text(page.read_text().replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    try:
        p = _chromium(["--dump-dom", probe.resolve().as_uri()], page.parent / "_browser_profile")
    finally:
        probe.unlink()
        shutil.rmtree(page.parent / "_browser_profile", ignore_errors=True)
    m = re.search(r'<pre id="kano-check">(.*?)</pre>', p.stdout, re.S)
    assert m, f"the page never finished loading in chromium (rc {p.returncode}): {p.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(m.group(1)))


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2400) -> Path:
    profile = Path(png).parent / "_browser_profile_shot"
    try:
        p = _chromium([f"--screenshot={png}", f"--window-size={width},{height}", "--hide-scrollbars", Path(page).resolve().as_uri()], profile)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert Path(png).is_file(), p.stderr[-2000:]
    return Path(png)


def no_external_references(text: str) -> list[str]:
    """src/href/url() values that would need the network (the SVG namespace URI is a name, not a fetch)."""
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text) + re.findall(r"url\(([^)]*)\)", text)
    return [r for r in refs if re.match(r"\s*['\"]?(https?:)?//", r)]
