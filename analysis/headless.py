"""Headless Chromium for the reports: PNG export (kaleido) and a render check (DevTools).

* :func:`find_chromium` -- the Chrome/Chromium kaleido would use (``$BROWSER_PATH``,
  then ``PATH`` and the usual places; choreographer's own search), or None.
* :func:`write_pngs` -- ``figures/<name>.png`` for every figure via
  ``plotly.io.write_images`` (kaleido 1.x, one browser for the batch); without a
  browser it writes nothing and returns a one-line notice.
* :func:`render_page` -- open an HTML file in headless Chromium through the DevTools
  protocol (choreographer, kaleido's browser driver): JavaScript exceptions and console
  errors, every network request that is not the file itself, the trace names of every
  plotly figure as rendered, and a PNG screenshot of the whole page.

Run as a script to screenshot a report::

    python -m analysis.headless runs/search/NAME/sensitivity/report.html shot.png [--width 1280] [--scale 0.5]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
_FIGURES_JS = ("JSON.stringify(Object.fromEntries(Array.from(document.querySelectorAll('.plotly-graph-div'))"
               ".map(d => [d.id, {rendered: !!d._fullLayout, traces: (d.data || []).map(t => t.name || '')}])))")


def find_chromium() -> str | None:
    """Path of the Chrome/Chromium that kaleido would start, or None when there is none."""
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return None
    try:
        return Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - a broken install counts as "no browser"
        return None


def write_pngs(figures: dict, folder: Path, width: int = 1000, height: int | None = None) -> str | None:
    """Write ``folder/<name>.png`` for each ``name -> go.Figure``; returns a one-line notice
    instead (and writes nothing) when no Chrome/Chromium is available or kaleido fails."""
    if not figures:
        return None
    if find_chromium() is None:
        return "no Chrome/Chromium found: figures/*.png not written (install the Debian package 'chromium')"
    import plotly.io as pio

    folder.mkdir(parents=True, exist_ok=True)
    names = list(figures)
    try:
        pio.write_images([figures[n] for n in names], [folder / f"{n}.png" for n in names], width=width,
                         height=[figures[n].layout.height or 450 for n in names] if height is None else height)
    except Exception as e:  # noqa: BLE001 - PNGs are a by-product; the HTML report is the result
        return f"figures/*.png not written: kaleido failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


@dataclass
class PageCheck:
    """What headless Chromium saw: ``errors`` (JS exceptions, console/log errors),
    ``requests`` (URLs fetched that are not local), ``figures`` (div id -> {rendered,
    traces}), ``png`` (screenshot bytes) and the page's CSS ``size`` (width, height)."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    png: bytes = b""
    size: tuple[int, int] = (0, 0)


def render_page(html: str | Path, width: int = 1280, scale: float = 1.0, max_height: int = 16000,
                timeout: float = 90.0) -> PageCheck:
    """Load ``html`` in headless Chromium, wait for every plotly figure, take a screenshot.

    The screenshot covers the whole page (at most ``max_height`` CSS pixels) at ``scale``.
    Raises RuntimeError when no browser is found, TimeoutError when the page or its figures
    do not finish within ``timeout`` seconds.
    """
    path = find_chromium()
    if path is None:
        raise RuntimeError("no Chrome/Chromium found")
    url = Path(html).resolve().as_uri()
    return asyncio.run(asyncio.wait_for(_render(path, url, width, scale, max_height), timeout))


async def _render(path: str, url: str, width: int, scale: float, max_height: int) -> PageCheck:
    import choreographer as choreo

    out = PageCheck()

    async def on_exception(msg):
        d = msg["params"]["exceptionDetails"]
        out.errors.append(((d.get("exception") or {}).get("description") or d.get("text", "exception")).splitlines()[0])

    async def on_console(msg):
        p = msg["params"]
        if p.get("type") in ("error", "assert"):
            out.errors.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                    for a in p.get("args", [])))

    async def on_log(msg):
        e = msg["params"]["entry"]
        if e.get("level") == "error":
            out.errors.append(f"{e.get('source', 'log')}: {e.get('text', '')} {e.get('url', '')}".strip())

    async def on_request(msg):
        u = msg["params"]["request"]["url"]
        if not u.startswith(LOCAL_SCHEMES):
            out.requests.append(u)

    async with choreo.Browser(path=path, headless=True) as browser:
        tab = await browser.create_tab("")
        tab.subscribe("Runtime.exceptionThrown", on_exception)
        tab.subscribe("Runtime.consoleAPICalled", on_console)
        tab.subscribe("Log.entryAdded", on_log)
        tab.subscribe("Network.requestWillBeSent", on_request)
        for domain in ("Page", "Runtime", "Log", "Network"):
            await tab.send_command(f"{domain}.enable")
        await tab.send_command("Emulation.setDeviceMetricsOverride",
                               params={"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        loaded = tab.subscribe_once("Page.loadEventFired")
        await tab.send_command("Page.navigate", params={"url": url})
        await loaded
        while True:  # every plotly div drawn (newPlot is synchronous for these figures, but be safe)
            figs = json.loads(await _eval(tab, _FIGURES_JS))
            if all(f["rendered"] for f in figs.values()):
                break
            await asyncio.sleep(0.2)
        out.figures = figs
        await asyncio.sleep(0.3)  # let late errors and layout settle
        m = (await tab.send_command("Page.getLayoutMetrics"))["result"]
        size = m.get("cssContentSize") or m["contentSize"]
        out.size = (int(size["width"]), int(size["height"]))
        clip = {"x": 0, "y": 0, "width": out.size[0], "height": min(out.size[1], max_height), "scale": scale}
        shot = await tab.send_command("Page.captureScreenshot",
                                      params={"format": "png", "captureBeyondViewport": True, "clip": clip})
        out.png = base64.b64decode(shot["result"]["data"])
    return out


async def _eval(tab, expression: str):
    r = await tab.send_command("Runtime.evaluate", params={"expression": expression, "returnByValue": True})
    return r["result"]["result"].get("value")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.headless", description="Screenshot an HTML report in "
                                "headless Chromium; prints JavaScript errors and network requests.")
    p.add_argument("html")
    p.add_argument("png")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--max-height", type=int, default=16000)
    a = p.parse_args(argv)
    if not Path(a.html).is_file():
        print(f"{p.prog}: error: {a.html}: no such file", file=sys.stderr)
        return 2
    if find_chromium() is None:
        print(f"{p.prog}: error: no Chrome/Chromium found (install the Debian package 'chromium')", file=sys.stderr)
        return 2
    check = render_page(a.html, width=a.width, scale=a.scale, max_height=a.max_height)
    Path(a.png).write_bytes(check.png)
    print(f"{a.png}: page {check.size[0]}x{check.size[1]} CSS px, {len(check.figures)} figures, "
          f"{len(check.errors)} JavaScript errors, {len(check.requests)} network requests")
    for e in check.errors + [f"request: {u}" for u in check.requests]:
        print("  " + e)
    return 1 if check.errors or check.requests else 0


if __name__ == "__main__":
    sys.exit(main())
