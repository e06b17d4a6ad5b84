"""The sensitivity report in a real headless Chromium: no JavaScript error, no network
request, every figure drawn, a non-blank screenshot; and figures/*.png via kaleido.

Skipped (with the reason) only when no Chrome/Chromium is installed and not in CI;
in CI (``CI=true``; ``.ci/run`` installs the Debian package) a missing browser fails.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

from analysis import sensitivity
from analysis.headless import find_chromium, render_page
from fake_search import PARAMS, importance_search

PIL = pytest.importorskip("PIL.Image", reason="pillow (the dev extra) decodes the screenshot")


@pytest.fixture(scope="module", autouse=True)
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI: no Chrome/Chromium found; .ci/run must install the Debian package 'chromium'")
        pytest.skip("no Chrome/Chromium installed (apt-get install chromium); the render check needs one")
    return path


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    folder = importance_search(tmp_path_factory.mktemp("render") / "search")
    rc = sensitivity.run_main(sensitivity.main, ["--study", str(folder)], prog="sensitivity.py")
    assert rc == 0
    return folder / "sensitivity"


def _nonblank(png: bytes) -> tuple[float, int]:
    img = PIL.open(io.BytesIO(png)).convert("RGB")
    small = img.resize((max(1, img.width // 4), max(1, img.height // 4)))
    px = np.asarray(small).reshape(-1, 3)
    non_white = float((px.min(axis=1) < 235).mean())
    return non_white, len(np.unique(px, axis=0))


def test_report_renders_without_errors_and_is_not_blank(report_dir):
    check = render_page(report_dir / "report.html", width=1200, scale=0.5, max_height=6000)
    assert check.errors == []
    assert check.requests == [], "the report must not fetch anything"
    names = {k.removeprefix("fig-") for k in check.figures}
    assert {f"axis_{k}" for k in PARAMS} | {"importance", "history", "curves", "parallel"} <= names
    assert all(f["rendered"] for f in check.figures.values())
    assert check.figures["fig-axis_cl_weight"]["traces"] == ["completed", "stopped early (ASHA)", "failed", "best trial"]
    assert check.size[1] > 3000  # the whole report, not an empty page
    non_white, colours = _nonblank(check.png)
    assert non_white > 0.02 and colours > 50, (non_white, colours)


def test_pngs_are_written_with_kaleido(report_dir):
    pngs = sorted(p.name for p in (report_dir / "figures").glob("*.png"))
    assert {f"axis_{k}.png" for k in PARAMS} | {"importance.png", "history.png", "curves.png"} <= set(pngs)
    for name in ("importance.png", "axis_cl_weight.png"):
        non_white, colours = _nonblank((report_dir / "figures" / name).read_bytes())
        assert non_white > 0.01 and colours > 20


def test_the_render_check_catches_a_script_error_and_a_network_request(tmp_path):
    """Control: the checks above can fail."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>undefinedFunction();</script>"
                   "<img src='http://192.0.2.1/x.png'></body></html>")
    check = render_page(bad, timeout=60)
    assert any("undefinedFunction" in e for e in check.errors)
    assert check.requests == ["http://192.0.2.1/x.png"]
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    non_white, colours = _nonblank(render_page(blank).png)
    assert non_white == 0.0 and colours == 1
