"""core.build_dir: the manifest written, read, updated and checked; graph I/O and the cache layout."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dsv3_export.core.build_dir import (
    FORMAT_VERSION,
    MAIN_GRAPH,
    MANIFEST,
    cache_layout,
    check_backend,
    check_file_hashes,
    find_manifest,
    graph_io,
    read_manifest,
    sha256_file,
    stage_graphs,
    update_manifest,
    write_manifest,
)
from dsv3_export.core.errors import ExportError


@pytest.fixture
def build(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "verify").mkdir()
    (tmp_path / "verify" / "report.json").write_text("{}")
    write_manifest(tmp_path, {"config": {"n_layers": 1}, "backend": "ort"})
    return tmp_path


def test_the_typed_view_gives_older_builds_their_defaults(build):
    """A manifest without the newer entries reads as the build it was: fp32, ORT, absorbed MLA,
    one graph, not lowered; every reader gets these from the view, none spells its own."""
    m = read_manifest(build)
    assert (m.precision, m.backend, m.mla, m.lowered, m.moe_form, m.stages, m.quantization) == (
        "fp32", "ort", "absorbed", False, None, None, None)
    assert (m.source, m.engine, m.verify, m.disk, m.cache_bytes_per_token) == ({}, {}, None, None, {})
    assert stage_graphs(m) == [{"file": MAIN_GRAPH, "layers": [0, 1]}]


def test_written_manifest_lists_every_file_with_its_hash(build):
    m = read_manifest(build)
    assert m.raw["format"] == FORMAT_VERSION and m.backend == "ort"
    assert set(m.files) == {"model.onnx", "verify/report.json"}
    assert m.files["model.onnx"] == {"sha256": sha256_file(build / "model.onnx"), "bytes": 5}
    check_file_hashes(build, m)  # passes as written


def test_update_relists_a_folder_and_sets_fields(build):
    (build / "verify" / "report.json").write_text('{"passed": true}')
    (build / "verify" / "report.md").write_text("# ok")
    update_manifest(build, "verify", {"verify": {"passed": True}})
    m = read_manifest(build)
    assert set(m.files) == {"model.onnx", "verify/report.json", "verify/report.md"} and m.verify["passed"]
    check_file_hashes(build, m)
    assert not list(build.glob(f".{MANIFEST}.tmp"))  # written through a temporary, renamed


def test_update_without_a_manifest_does_nothing(tmp_path):
    update_manifest(tmp_path, "verify", {"verify": {}})
    assert find_manifest(tmp_path) is None and not (tmp_path / MANIFEST).exists()


@pytest.mark.parametrize("change,needle", [
    (lambda d: (d / "model.onnx").write_bytes(b"grapH"), "sha256 does not match"),
    (lambda d: (d / "model.onnx").write_bytes(b"graph!"), "6 bytes, manifest.json says 5"),
    (lambda d: (d / "model.onnx").unlink(), "missing"),
])
def test_damage_is_named(build, change, needle):
    change(build)
    with pytest.raises(ExportError, match=needle) as e:
        check_file_hashes(build, read_manifest(build))
    assert "model.onnx" in str(e.value)


def test_an_entry_outside_the_build_is_refused(build):
    m = read_manifest(build)
    m.files["../elsewhere"] = {"sha256": "0" * 64}
    with pytest.raises(ExportError, match="outside the build directory"):
        check_file_hashes(build, m)


@pytest.mark.parametrize("text,needle", [("{", "unreadable"), ("[]", "not a dsv3-export manifest"),
                                         ('{"files": {}, "config": {}, "format": 99}', "newer")])
def test_bad_manifests_are_named(tmp_path, text, needle):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(ExportError, match=needle):
        read_manifest(tmp_path)


def test_not_a_build_directory(tmp_path):
    with pytest.raises(ExportError, match="no such build directory"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ExportError, match="not a build directory"):
        read_manifest(tmp_path)
    with pytest.raises(ExportError, match="--backend 'cuda'"):
        check_backend("cuda")


def test_graph_io_and_cache_layout(tmp_path):
    past = helper.make_tensor_value_info("past_latent.0", TensorProto.FLOAT, ["batch", "past", 576])
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("present_latent.0", TensorProto.FLOAT, ["batch", "total", 576])
    graph = helper.make_graph([helper.make_node("Identity", ["past_latent.0"], ["present_latent.0"])], "g",
                              [ids, past], [out])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    io = graph_io(tmp_path / "model.onnx")
    assert io["inputs"][1] == {"name": "past_latent.0", "dtype": "float32", "shape": ["batch", "past", 576]}
    assert json.loads(json.dumps(io)) == io  # stored in the manifest as it is
    assert cache_layout(io, 7) == ((576,), np.dtype(np.float32))
    assert cache_layout({"inputs": []}, 7) == ((7,), np.dtype(np.float32))
    naive = {"inputs": [{"name": "past_latent.0", "dtype": "float16", "shape": ["batch", "past", 16, 320]}]}
    assert cache_layout(naive, 7) == ((16, 320), np.dtype(np.float16))
