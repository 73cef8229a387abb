"""Will it fit: a build or a verification that this machine cannot hold is refused in one line,
before anything large is loaded or written. The machine's size is set here (the real one varies);
the estimates and the checks are the code's own."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dsv3_export.cli.main import main
from dsv3_export.core.config import preset
from dsv3_export.exporter import resources
from dsv3_export.exporter.describe import parameter_counts
from tests.helpers import assert_clean_error

GiB = 1 << 30


def test_the_estimates():
    v2 = preset("v2-lite")
    counts = parameter_counts(v2)
    assert resources.reference_bytes(v2) == (counts["total"] + counts["mtp"]) * 4 + resources.REFERENCE_MARGIN
    assert 55 * GiB < resources.reference_bytes(v2) < 70 * GiB  # the 63 GB an fp32 V2-Lite takes
    fp32, int4 = resources.build_bytes(v2, "fp32"), resources.build_bytes(v2, "int4-wo")
    assert int4 < fp32 / 4 and fp32 > counts["total"] * 4


def test_verify_that_cannot_fit_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * GiB)
    r = CliRunner().invoke(main, ["build", "v2-lite", "-o", str(tmp_path / "out"), "--precision", "int4-wo"])
    assert_clean_error(r, "the build's verification needs about", "this machine has 8.00 GiB available",
                       "build with --no-verify")
    assert not (tmp_path / "out").exists()


def test_a_build_that_cannot_fit_on_disk_is_refused_naming_both_figures(monkeypatch, tmp_path):
    monkeypatch.setattr(resources, "free_disk", lambda folder: 50 * GiB)
    r = CliRunner().invoke(main, ["build", "v3", "-o", str(tmp_path / "out"), "--precision", "fp8", "--no-verify"])
    assert_clean_error(r, f"{tmp_path / 'out'}: the fp8 build needs about", "the filesystem has 50.00 GiB free",
                       "--precision int4-wo needs about")
    assert not (tmp_path / "out").exists()


def test_a_build_that_fits_passes(monkeypatch, tmp_path):
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * GiB)
    resources.check_reference_fits(preset("tiny"))
    resources.check_build_fits(preset("tiny"), tmp_path / "out", "fp32")
    with pytest.raises(Exception, match="verify needs about"):
        resources.check_reference_fits(preset("v2-lite"))
