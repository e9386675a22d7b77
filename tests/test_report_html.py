"""report.html in a real browser (Debian's Chromium, headless): the table sorts, both plots
and the Pareto front are there; plus the numbers behind them."""

import shutil
import struct
import subprocess

import pytest

from edgellm.bandwidth import copy_bandwidth_gbs, decode_ceiling
from edgellm.report import pareto_front
from edgellm.report_html import render_html

VARIANTS = [  # name, size MB, ppl, decode tok/s
    ("reference", 538.1, 28.14, 17.6), ("gguf-f16", 270.9, 28.15, 84.2),
    ("gguf-q8_0", 144.8, 28.30, 150.5), ("gguf-q4_0", 91.7, 35.41, 200.1),
    ("onnx-int4", 103.2, 36.0, 102.1),  # bigger and worse than q4_0: off the front
]


def synthetic_report() -> dict:
    rows = []
    for name, size_mb, ppl, tps in VARIANTS:
        ceiling = decode_ceiling(26.5, int(size_mb * 1e6))
        rows.append({"name": name, "format": name.split("-")[0], "weights": name.split("-")[-1],
                     "runtime": "x", "size_bytes": int(size_mb * 1e6), "size_mb": size_mb,
                     "ppl": ppl, "ppl_delta_pct": 100 * (ppl / 28.14 - 1), "decode_tps": tps,
                     "decode_ceiling_tps": ceiling, "decode_pct_of_ceiling": 100 * tps / ceiling})
    front = pareto_front(rows)
    for row in rows:
        row["pareto_front"] = row["name"] in front
    return {"model": {"source": "test"},
            "eval": {"text": "t", "sha256": "0" * 64, "tokens_scored": 100, "windows": 1,
                     "ctx": 512, "decode_tokens": 8},
            "machine": {"threads": 2, "omp_wait_policy": "default", "cpu": "cpu",
                        "physical_cores": 2, "memory_gb": 24, "os": "Linux", "python": "3.11",
                        "memory_bandwidth_gbs": 26.5},
            "variants": rows}


def chromium(*args) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium")
    assert browser, "Debian's chromium is missing: run `make test-tools`"
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(render_html(synthetic_report()))
    return path


def test_pareto_front_keeps_only_the_undominated():
    assert pareto_front(synthetic_report()["variants"]) == {
        "reference", "gguf-f16", "gguf-q8_0", "gguf-q4_0"}


def test_bandwidth_is_measured_and_sets_the_ceiling():
    bandwidth = copy_bandwidth_gbs(size=32 << 20, repeats=2)
    assert 0.5 < bandwidth < 2000
    assert decode_ceiling(20.0, 100_000_000) == pytest.approx(200.0)


def test_the_browser_renders_the_table_plots_and_sorts(page):
    result = chromium("--dump-dom", f"{page.as_uri()}#sort=size%20MB")
    assert result.returncode == 0, result.stderr
    dom = result.stdout
    assert dom.count("<svg") == 2 and "Pareto front" in dom
    assert "decode speed vs memory-bandwidth ceiling" in dom and "% of BW ceiling" in dom
    order = [name for name, *_ in VARIANTS]
    positions = {name: dom.index(f"<td>{name}</td>") for name in order}
    by_size = sorted(VARIANTS, key=lambda v: v[1])
    assert sorted(positions, key=positions.get) == [v[0] for v in by_size]  # sorted by the script
    assert 'class="desc"' not in dom and 'class="asc"' in dom


def test_a_screenshot_of_the_page(page, tmp_path):
    png = tmp_path / "report.png"
    result = chromium("--hide-scrollbars", "--window-size=1400,1500", f"--screenshot={png}",
                      page.as_uri())
    assert result.returncode == 0, result.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 1500) and len(data) > 30_000  # not a blank page
