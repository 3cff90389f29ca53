"""The HTML report in a real browser: Debian's chromium, headless, renders it to a PNG (not
blank, every plot decoded, no console error). chromium is installed by ``make browser`` when
missing."""
import shutil
import subprocess
from pathlib import Path

import pytest

from fewbits.report.html import REPORT_FORMAT, REPORT_VERSION, read_report_data, render, write_report

ROOT = Path(__file__).resolve().parents[2]


def _chromium() -> str:
    import fcntl
    import tempfile

    # one installer at a time: the test processes (pytest -n 2) share apt's lock
    with open(Path(tempfile.gettempdir()) / "fewbits-browser.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which("chromium") is None:
            done = subprocess.run(["make", "-C", str(ROOT), "browser"], capture_output=True, text=True)
            if done.returncode != 0 or shutil.which("chromium") is None:
                pytest.fail(f"chromium is needed and `make browser` could not install it:\n{done.stdout}{done.stderr}")
    return shutil.which("chromium")


def _run(page: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    """Messages the page logged to the console (chromium prints them as CONSOLE lines)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def _data() -> dict:
    layers = [{"name": f"features.{i}.conv", "type": "Conv2d", "format": ["w8a8", "w4a8", "float"][i % 3],
               "why_float": "kept float by the choice" if i % 3 == 2 else None,
               "sensitivity": {"float": 0.0, "w8a8": 1e-4 * (i + 1), "w4a8": 1e-2 * (i + 1)},
               "sqnr_db": 30.0 + i, "bytes": 1000 * (i + 1), "latency_s": 1e-5 * (i + 1)} for i in range(6)]
    return {"schema_version": REPORT_VERSION, "format": REPORT_FORMAT, "title": "a <test> report", "method": "loss",
            "summary": {"metric": "accuracy", "fp32": 90.0, "quantized": 89.5, "bytes_fp32": 4e6, "bytes": 1e6,
                        "latency_fp32_s": 1e-3, "latency_s": 6e-4, "latency_predicted_s": 6.2e-4,
                        "energy_fp32_pj": 5e6, "energy_pj": 1e6, "onnx_integer_gemms": "4/6"},
            "layers": layers, "front_key": "bytes",
            "front": [{"cost": 1e6 * k, "damage": 1e-2 / k} for k in (1, 2, 3)] + [{"cost": 4e6, "damage": 0.0}],
            "uniform": [{"name": "w8a8", "cost": 1.2e6, "damage": 4e-3}], "chosen": {"cost": 2e6, "damage": 5e-3},
            "trials": [{"cost": 2e6, "metric": 89.5, "ok": True}, {"cost": 1e6, "metric": 80.0, "ok": False}],
            "histograms": {"features.0.conv": {"edges": [0, 1, 2, 3], "counts": [10, 5, 1], "range": [0, 2.5],
                                               "clipped": 0.01}},
            "parity": {"simulated": [0.0, 1.0, 2.0], "deployed": [0.0, 1.01, 1.98], "max_abs_diff": 0.02},
            "latency_check": [{"name": "chosen", "predicted_s": 6.2e-4, "measured_s": 6e-4}]}


def test_the_report_renders_in_chromium(tmp_path):
    from PIL import Image

    page = write_report(_data(), tmp_path / "report.html")
    assert "a &lt;test&gt; report" in page.read_text()  # names are escaped
    shot = tmp_path / "report.png"
    done = _run(page, "--window-size=1300,3200", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    counts = Image.open(shot).convert("L").histogram()  # pixels per grey level
    dark = sum(counts[:200]) / sum(counts)
    assert 0.01 < dark < 0.9, f"the screenshot looks blank or black ({dark:.1%} dark pixels)"
    dom = _run(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-plots="5"' in dom.stdout  # the five plots decoded (the page counts them after load)
    assert not _console_errors(dom.stderr), _console_errors(dom.stderr)


def test_the_browser_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><img class=plot src='data:image/png;base64,AAAA'><script>undefined_call();"
                    "</script></body></html>")
    dom = _run(page, "--dump-dom")
    assert _console_errors(dom.stderr) and 'data-plots="' not in dom.stdout


def test_report_data_files_are_checked(tmp_path):
    path = tmp_path / "report_data.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not fewbits report data"):
        read_report_data(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not readable report data"):
        read_report_data(path)
    assert "<h1>" in render({"title": "empty"})  # a page with nothing measured still renders
