"""Check a `deepfm compare` report in a real browser: headless Chromium loads it, every <img> must decode
(naturalWidth > 0), and a full-page screenshot is taken. Also checks that the page is self-contained (images
are data URIs; no http(s) URL in any src/href; no external script or style sheet).

    python scripts/check_report.py OUT/report.html --screenshot OUT/report.png

Exit status 0 when every check passes, 1 when one fails, 2 when Chromium is missing or fails to run.
Needs Debian's `chromium` (`apt-get install -y chromium`), or $CHROMIUM pointing at a Chrome/Chromium binary.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

MARK = "__deepfm_report_check__"
PROBE = f"""
<script>
window.addEventListener("load", function () {{
  var height = Math.max(document.body.scrollHeight, document.documentElement.scrollHeight);
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0); }})
                   .map(function (i) {{ return i.alt || i.src.slice(0, 60); }});
  var sizes = imgs.map(function (i) {{ return [i.naturalWidth, i.naturalHeight]; }});
  var out = document.createElement("pre");
  out.id = "{MARK}";
  out.textContent = JSON.stringify({{images: imgs.length, broken: broken, sizes: sizes,
    height: height, title: document.title}});
  document.body.appendChild(out);
}});
</script>
"""


def chromium_binary() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def run_chromium(binary: str, args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def static_checks(page: str) -> list[str]:
    """Self-containment: what the page would fetch from elsewhere."""
    problems = []
    for attr, url in re.findall(r"""\b(src|href)\s*=\s*["']?\s*(https?:[^"'\s>]*)""", page, flags=re.I):
        problems.append(f"{attr} points outside the file: {url[:80]}")
    for src in re.findall(r"""<img\b[^>]*\bsrc\s*=\s*["']([^"']*)""", page, flags=re.I):
        if not src.startswith("data:image/"):
            problems.append(f"<img> is not an embedded data URI: {src[:80]}")
    if re.search(r"<script\b[^>]*\bsrc\s*=", page, flags=re.I):
        problems.append("the page loads an external script")
    if re.search(r"<link\b[^>]*rel\s*=\s*[\"']?stylesheet", page, flags=re.I):
        problems.append("the page loads an external style sheet")
    if re.search(r"@import\b|url\(\s*[\"']?https?:", page, flags=re.I):
        problems.append("the style sheet imports something from elsewhere")
    return problems


def png_size(path: Path) -> tuple[int, int] | None:
    head = path.read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", head[16:24])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="the report.html written by `deepfm compare`")
    ap.add_argument("--screenshot", type=Path, help="full-page PNG (default: REPORT next to it, .png)")
    ap.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    args = ap.parse_args()
    report = args.report.resolve()
    if not report.is_file():
        print(f"error: {report}: no such file", file=sys.stderr)
        return 1
    binary = chromium_binary()
    if binary is None:
        print("error: no chromium found (apt-get install -y chromium, or set $CHROMIUM)", file=sys.stderr)
        return 2
    page = report.read_text(encoding="utf-8")
    problems = static_checks(page)
    shot = (args.screenshot or report.with_suffix(".png")).resolve()
    with tempfile.TemporaryDirectory(prefix="deepfm-report-check-") as tmp:
        tmp = Path(tmp)
        probe = tmp / "probe.html"  # a copy with the probe script; the report itself stays untouched
        probe.write_text(page.replace("</body>", PROBE + "</body>") if "</body>" in page else page + PROBE,
                         encoding="utf-8")
        r = run_chromium(binary, ["--virtual-time-budget=15000", "--dump-dom", probe.as_uri()], tmp / "profile1")
        m = re.search(rf'<pre id="{MARK}">(.*?)</pre>', r.stdout, flags=re.S)
        if r.returncode != 0 or not m:
            print(f"error: chromium did not render the page (exit {r.returncode}): {r.stderr.strip()[-800:]}",
                  file=sys.stderr)
            return 2
        dom = json.loads(html.unescape(m.group(1)))
        if dom["images"] == 0:
            problems.append("the page has no <img>")
        for name in dom["broken"]:
            problems.append(f"image did not decode in the browser: {name}")
        height = max(600, min(int(dom["height"]) + 40, 20000))
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.unlink(missing_ok=True)
        r = run_chromium(binary, [f"--window-size={args.width},{height}", f"--screenshot={shot}",
                                  "--virtual-time-budget=15000", report.as_uri()], tmp / "profile2")
    size = png_size(shot) if shot.exists() else None
    if size is None:
        problems.append(f"no screenshot was written (chromium exit {r.returncode}: {r.stderr.strip()[-400:]})")
    print(f"{report}: {dom['images']} image(s) {[tuple(s) for s in dom['sizes']]}, page height {dom['height']} px; "
          f"screenshot {shot} {size[0]}x{size[1]}" if size else f"{report}: {dom['images']} image(s)")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        print("ok: every image decoded, the page is self-contained")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
