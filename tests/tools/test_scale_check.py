"""tools/scale_check.py: the child's own peak memory and disk, and a table for a real build."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import scale_check  # noqa: E402


def test_measured_sees_the_childs_peak_memory_and_disk(tmp_path):
    child = (f"import os; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); "
             f"open({str(tmp_path / 'f')!r}, 'wb').write(os.urandom(64 << 20)); import time; time.sleep(1.2)")
    r = scale_check.measured([sys.executable, "-c", child], tmp_path)
    assert r["rc"] == 0
    assert 300 << 20 <= r["peak_rss"] < 600 << 20  # its own peak, not the test process's
    assert r["peak_disk"] >= 60 << 20


def test_table_of_a_tiny_build(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "scale_check.py"), "--source", "tiny",
                          "--precisions", "int4-wo", "--work", str(tmp_path), "--run"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| int4-wo |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0" and cells[3].endswith("GiB") and float(cells[3].split()[0]) > 0.1
    assert float(cells[-1].split()[0]) > 0  # decode tok/s parsed from run
    assert not (tmp_path / "build-int4-wo").exists()  # the build is deleted unless --keep
