"""Progress where there is no terminal: the Python API logs a record per stage (logger
dsv3_export.progress, INFO), and a piped CLI prints periodic lines inside a long stage."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from dsv3_export.core.progress import Reporter
from tests.helpers import ROOT


def test_a_stage_logs_its_start_progress_eta_and_end(caplog):
    reporter = Reporter(period=0.05)
    with caplog.at_level(logging.INFO, logger="dsv3_export"):
        advance = reporter.stage("writing weights", total=4)
        advance(1)
        time.sleep(0.3)
        reporter.stage("tracing")
        time.sleep(0.3)
        reporter.done("tracing")
        reporter.done("writing weights")
    lines = [r.getMessage() for r in caplog.records if r.name == "dsv3_export.progress"]
    assert lines[0] == "writing weights (4 steps)" and "tracing" in lines
    assert any(line.startswith("writing weights: 1/4 (25%)") and "left" in line for line in lines)
    assert any(line.startswith("tracing: still running") for line in lines)
    assert lines[-2].startswith("tracing: done in") and lines[-1].startswith("writing weights: done in")


def test_the_python_api_reports_every_stage_through_logging(tmp_path, caplog):
    import dsv3_export

    with caplog.at_level(logging.INFO, logger="dsv3_export"):
        dsv3_export.build("tiny", tmp_path / "out", verify=False, mtp=False)
    done = [r.getMessage() for r in caplog.records if r.name == "dsv3_export.progress" and ": done in" in r.getMessage()]
    assert [d.split(":")[0] for d in done] == ["tracing model.onnx", "writing model.onnx weights",
                                               "building the ONNX Runtime engine"]


def test_a_piped_build_prints_progress_inside_its_stages(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DSV3_PROGRESS_SECONDS": "0.2"}
    done = subprocess.run([sys.executable, "-m", "dsv3_export.cli.main", "build", "tiny", "-o", str(tmp_path / "out"),
                           "--no-verify", "--no-mtp"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert any("tracing model.onnx: still running" in line for line in lines), done.stderr[-2000:]
    assert any(line.endswith("building the ONNX Runtime engine") for line in lines)
