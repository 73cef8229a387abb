"""deploy.triton_repo: the repository's files, every config.pbtxt parsed against Triton's schema
(tritonclient's model_config_pb2) and checked against the build's graph contract; the refusals."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsv3_export import engines
from dsv3_export.cli.main import main
from dsv3_export.core.build_dir import MANIFEST, check_file_hashes, read_manifest, stage_graphs, write_manifest
from dsv3_export.core.errors import ExportError
from dsv3_export.deploy import model_config as mc
from dsv3_export.deploy.triton_repo import MARKER, MODELS_DIR, external_files, write_repository
from tests.helpers import assert_clean_error

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}


def configs(repo: Path) -> dict:
    """Every model's config.pbtxt, parsed by protobuf against Triton's schema (not by our code)."""
    out = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == path.parent.name
        out[cfg.name] = cfg
    return out


def dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def assert_matches_contract(cfg, io: dict) -> None:
    """Names, data types and dims (-1 for the symbolic batch / seq / past) as the graph declares them."""
    for got, want in ((cfg.input, io["inputs"]), (cfg.output, io["outputs"])):
        assert [t.name for t in got] == [w["name"] for w in want]
        assert [dtype_name(t.data_type) for t in got] == [TYPES[w["dtype"]] for w in want]
        assert [list(t.dims) for t in got] == [[d if isinstance(d, int) else -1 for d in w["shape"]] for w in want]
    assert cfg.max_batch_size == 0


def listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_cpu_repository_follows_the_graphs(pipeline_build, tmp_path):
    manifest = read_manifest(pipeline_build)
    stages = stage_graphs(manifest)
    before = listing(pipeline_build)
    repo = tmp_path / "repo"
    write_repository(pipeline_build, repo, instances=2, threads=1)
    cfgs = configs(repo)
    assert sorted(cfgs) == sorted(["dsv3"] + [f"dsv3_stage{k}" for k in range(len(stages))])
    for k, stage in enumerate(stages):
        cfg = cfgs[f"dsv3_stage{k}"]
        assert cfg.backend == "python" and not cfg.platform
        assert_matches_contract(cfg, manifest.io[stage["file"]])
        [group] = cfg.instance_group
        assert (model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind), group.count) == ("KIND_CPU", 2)
        params = {key: v.string_value for key, v in cfg.parameters.items()}
        assert params == {"build_dir": str(pipeline_build.resolve()), "graph": stage["file"], "threads": "1"}
        assert (repo / f"dsv3_stage{k}/1/model.py").read_bytes() == (MODELS_DIR / "stage.py").read_bytes()
    text = cfgs["dsv3"]
    assert text.backend == "python" and text.model_transaction_policy.decoupled
    inputs = {t.name: (dtype_name(t.data_type), list(t.dims), t.optional) for t in text.input}
    assert inputs == {"text_input": ("TYPE_STRING", [1], False), "max_tokens": ("TYPE_INT32", [1], True),
                      "temperature": ("TYPE_FP32", [1], True), "top_p": ("TYPE_FP32", [1], True),
                      "top_k": ("TYPE_INT32", [1], True), "min_p": ("TYPE_FP32", [1], True),
                      "seed": ("TYPE_INT64", [1], True), "repetition_penalty": ("TYPE_FP32", [1], True),
                      "presence_penalty": ("TYPE_FP32", [1], True), "frequency_penalty": ("TYPE_FP32", [1], True),
                      "stop": ("TYPE_STRING", [-1], True),
                      "stream": ("TYPE_BOOL", [1], True)}
    assert [(t.name, dtype_name(t.data_type)) for t in text.output] == [("text_output", "TYPE_STRING")]
    assert (repo / "dsv3/1/model.py").read_bytes() == (MODELS_DIR / "dsv3.py").read_bytes()
    assert os.path.samefile(repo / "dsv3/1/tokenizer.json", pipeline_build / "tokenizer.json")
    pipeline = json.loads((repo / "dsv3/1/pipeline.json").read_text())
    assert [(s["model"], s["layers"]) for s in pipeline["stages"]] == [
        (f"dsv3_stage{k}", s["layers"]) for k, s in enumerate(stages)]
    assert pipeline["stages"][0]["first_input"] == "input_ids"
    marker = json.loads((repo / MARKER).read_text())
    assert sorted(marker["paths"]) == sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")
                                             if p.name != MARKER)
    assert listing(pipeline_build) == before  # nothing written into the build, and it still checks
    check_file_hashes(pipeline_build, manifest)


def test_gpu_repository_pins_one_stage_per_gpu_and_clones_the_graphs(pipeline_build, tmp_path):
    manifest = read_manifest(pipeline_build)
    stages = stage_graphs(manifest)
    gpus = [5, 3, 1, 7][:len(stages)]
    repo = tmp_path / "gpu-repo"
    write_repository(pipeline_build, repo, device="gpu", gpus=gpus)
    cfgs = configs(repo)
    for k, stage in enumerate(stages):
        cfg = cfgs[f"dsv3_stage{k}"]
        assert cfg.backend == "onnxruntime"
        assert_matches_contract(cfg, manifest.io[stage["file"]])
        [group] = cfg.instance_group
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
        assert list(group.gpus) == [gpus[k]]
        version = repo / f"dsv3_stage{k}/1"
        graph = pipeline_build / stage["file"]
        # Cloned (or copied), never hard-linked: ONNX Runtime refuses external data with two links.
        assert filecmp.cmp(version / "model.onnx", graph, shallow=False) and not os.path.samefile(version / "model.onnx", graph)
        data = external_files(graph)
        assert data and sorted(p.name for p in version.iterdir()) == sorted(["model.onnx", *data])
        for name in data:
            assert filecmp.cmp(version / name, pipeline_build / name, shallow=False)
            assert (pipeline_build / name).stat().st_nlink == 1
    assert cfgs["dsv3"].model_transaction_policy.decoupled
    engines.load(pipeline_build)  # the build still loads: nothing of it is linked from the repository


def test_tensorrt_build_gives_tensorrt_plan_models(demo_build, tmp_path):
    """A TensorRT build's plans (made up here: the layout, not the engine, is what is checked)."""
    build = tmp_path / "trt-build"
    shutil.copytree(demo_build, build)  # copies: a hard link would give demo_build's data two links
    (build / MANIFEST).unlink()
    manifest = read_manifest(demo_build)
    (build / "model.plan").write_bytes(b"not a real plan")
    (build / "profiles.json").write_text(json.dumps({"engines": {"model.plan": {"profiles": [{}, {}]}}}))
    write_manifest(build, {k: v for k, v in manifest.raw.items() if k not in ("files", "format")} | {"backend": "trt"})
    repo = tmp_path / "trt-repo"
    write_repository(build, repo, device="gpu", gpus=[2])
    cfg = configs(repo)["dsv3_stage0"]
    assert cfg.platform == "tensorrt_plan" and not cfg.backend
    assert_matches_contract(cfg, manifest.io["model.onnx"])
    assert list(cfg.instance_group[0].gpus) == [2] and list(cfg.instance_group[0].profile) == ["0", "1"]
    assert os.path.samefile(repo / "dsv3_stage0/1/model.plan", build / "model.plan")


def test_gpus_must_name_one_gpu_per_stage(pipeline_build, tmp_path):
    n = len(stage_graphs(read_manifest(pipeline_build)))
    too_many = ",".join(str(g) for g in range(n + 1))
    result = CliRunner().invoke(main, ["triton", str(pipeline_build), "-o", str(tmp_path / "r"), "--device", "gpu",
                                       "--gpus", too_many])
    assert_clean_error(result, "--gpus", f"{n} stage")
    with pytest.raises(ExportError, match="--gpus applies to --device gpu"):
        write_repository(pipeline_build, tmp_path / "r", gpus=[0])
    assert not (tmp_path / "r").exists()


def test_refusals_leave_everything_as_it_was(demo_build, tmp_path):
    with pytest.raises(ExportError, match="no such build directory"):
        write_repository(tmp_path / "missing", tmp_path / "r")
    (tmp_path / "bare").mkdir()
    with pytest.raises(ExportError, match="not a build directory"):
        write_repository(tmp_path / "bare", tmp_path / "r")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a Triton repository dsv3-export wrote"):
        write_repository(demo_build, theirs, force=True)
    assert listing(theirs) == {"notes.txt": 4}
    with pytest.raises(ExportError, match="must not contain each other"):
        write_repository(demo_build, demo_build / "repo")
    repo = tmp_path / "repo"
    write_repository(demo_build, repo)
    with pytest.raises(ExportError, match="--force"):
        write_repository(demo_build, repo)
    first = listing(repo)
    (repo / "dsv3/1/__pycache__").mkdir()  # what Triton's stub leaves when it imports our model.py
    (repo / "dsv3/1/__pycache__/model.cpython-311.pyc").write_bytes(b"")
    write_repository(demo_build, repo, force=True, instances=3)
    assert listing(repo).keys() == first.keys()
    assert "count: 3" in (repo / "dsv3_stage0/config.pbtxt").read_text()
    (repo / "dsv3" / "extra.txt").write_text("added by hand")
    with pytest.raises(ExportError, match="dsv3/extra.txt"):
        write_repository(demo_build, repo, force=True)
    assert (repo / "dsv3" / "extra.txt").read_text() == "added by hand"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "repo", "theirs"]  # no temporary left
    check_file_hashes(demo_build, read_manifest(demo_build))


def test_a_config_the_schema_rejects_is_never_written(demo_build, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="not a valid Triton model config"):
        mc.validate('name: "x" backend: "python" no_such_field: 1')
    with pytest.raises(ExportError, match="dims"):
        mc.render("x", backend="python", inputs=[mc.tensor("a", "TYPE_FP32", [0])], outputs=[],
                  instances=mc.instance_group("KIND_CPU"))
    real = mc.render

    def broken(name, **kw):  # the text model's config comes out wrong: nothing may be left behind
        return real(name, **kw) if name != "dsv3" else real(name, **{**kw, "instances": "instance_group [ { kind: X } ]"})

    monkeypatch.setattr(mc, "render", broken)
    with pytest.raises(ExportError, match="dsv3: not a valid Triton model config"):
        write_repository(demo_build, tmp_path / "repo")
    assert list(tmp_path.iterdir()) == []
