"""`verify` refuses what `run` refuses, before any other work (issue 16, item 3), and a finished
build that fails verification is marked so in its manifest."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from dsv3_export.cli.main import main
from dsv3_export.core.build_dir import MANIFEST
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter import open_source
from dsv3_export.verification.verify import verify
from tests.helpers import assert_clean_error


@pytest.fixture
def build(tiny_build, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_build, out)
    return out


def _flip_byte(path, at=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(build, fn):
    m = json.loads((build / MANIFEST).read_text())
    fn(m)
    (build / MANIFEST).write_text(json.dumps(m))


def _flip(b):
    _flip_byte(b / "model.onnx.data")


def _newer(b):
    _edit_manifest(b, lambda m: m.__setitem__("format", 99))


def _outside(b):
    (b.parent / "secret").write_text("x")
    _edit_manifest(b, lambda m: m["files"].__setitem__("../secret", {"sha256": "0" * 64, "bytes": 1}))


def _truncate(b):
    (b / "model.onnx.data").write_bytes((b / "model.onnx.data").read_bytes()[:100])


CASES = [
    (_flip, "model.onnx.data: sha256 does not match manifest.json"),
    (_truncate, "model.onnx.data: 100 bytes, manifest.json says"),
    (_newer, "format 99 is newer than this dsv3-export reads"),
    (_outside, "file entry '../secret' points outside the build directory"),
]


@pytest.mark.parametrize("damage, message", CASES, ids=["flipped-byte", "truncated", "newer-format", "outside"])
def test_verify_refuses_what_run_refuses(build, damage, message):
    damage(build)
    before = (build / MANIFEST).read_bytes()
    with pytest.raises(ExportError, match=message):
        verify(build, "tiny", decode_steps=1, greedy_tokens=1)
    assert (build / MANIFEST).read_bytes() == before  # nothing rewritten
    r = CliRunner().invoke(main, ["verify", str(build), "--decode-steps", "1", "--greedy-tokens", "1"])
    assert_clean_error(r, message)
    assert (build / MANIFEST).read_bytes() == before


def test_failed_verification_is_recorded_in_the_manifest(build):
    result = verify(build, open_source("tiny", seed=1), decode_steps=1, greedy_tokens=2, backends=["ort"])
    assert not result["passed"]
    verdict = json.loads((build / MANIFEST).read_text())["verify"]
    assert verdict["passed"] is False and verdict["report"] == "verify/report.json"
    assert (build / "verify" / "report.md").is_file()


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["config"].__setitem__("n_layers", m["config"]["n_layers"] + 1), "the manifest gives it layers 0..3"),
    (lambda m: m["io"]["model.onnx"]["inputs"].pop(), "the inputs it records for model.onnx are not the graph's"),
    (lambda m: m.__setitem__("stages", [{"file": "model.onnx", "layers": [0, 1]},
                                        {"file": "model.onnx", "layers": [1, 3]}]), "takes the caches of layers"),
    (lambda m: m.__setitem__("stages", [{"file": "model.onnx", "layers": [0, 2]}]), "not 0..2 .config n_layers."),
], ids=["n_layers", "io", "stages", "coverage"])
def test_a_manifest_that_disagrees_with_its_graphs_is_one_line(tiny_build, tmp_path, edit, needle):
    """engines.load checks the manifest's config, io and stages against the graphs it opens."""
    from dsv3_export import engines
    from dsv3_export.core.build_dir import MANIFEST, write_manifest

    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    manifest = json.loads((b / MANIFEST).read_text())
    edit(manifest)
    write_manifest(b, {k: v for k, v in manifest.items() if k not in ("files", "format")})
    with pytest.raises(ExportError, match=needle) as e:
        engines.load(b)
    assert "\n" not in str(e.value) and "rebuild it" in str(e.value)
