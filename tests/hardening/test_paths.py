"""Reading outside the checkpoint (issue 16, item 2): index entries, symlinks, FIFOs, and the
Hugging Face cache layout that must keep working."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from dsv3_export.core.config import preset
from dsv3_export.core.errors import CheckpointError
from dsv3_export.exporter import open_source
from dsv3_export.exporter.checkpoint import Checkpoint
from dsv3_export.exporter.checkpoint_writer import write_hf
from dsv3_export.exporter.weights import RandomWeights
from tests.hardening.common import inspect
from tests.helpers import assert_clean_error


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """tiny in several shards with model.safetensors.index.json (and a tokenizer beside it)."""
    d = tmp_path_factory.mktemp("sharded") / "ckpt"
    d.mkdir()
    write_hf(RandomWeights(preset("tiny"), seed=0), d, shard_bytes=200_000)
    (d / "tokenizer.json").write_text("{}")
    return d


def _copy(src, dest):
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _retarget(d, to: str, tensor: str | None = None):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    k = tensor or next(iter(index["weight_map"]))
    index["weight_map"][k] = to
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return k


@pytest.mark.parametrize("target, needle", [
    ("../elsewhere/x.safetensors", "outside the checkpoint"),
    ("/etc/passwd", "absolute path"),
    ("sub/../../x.safetensors", "outside the checkpoint"),
])
def test_index_entry_outside_is_refused(sharded, tmp_path, target, needle):
    d = _copy(sharded, tmp_path / "c")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(next(d.glob("model-*.safetensors")), tmp_path / "elsewhere" / "x.safetensors")
    _retarget(d, target)
    with pytest.raises(CheckpointError, match=needle) as e:
        open_source(d)
    assert "model.safetensors.index.json" in str(e.value) and target in str(e.value)
    assert "\n" not in str(e.value)
    assert_clean_error(inspect(d), "model.safetensors.index.json", needle)


def test_shard_symlink_outside_is_refused(sharded, tmp_path):
    d = _copy(sharded, tmp_path / "c")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as e:
        Checkpoint.open(d)
    assert shard.name in str(e.value)
    assert_clean_error(inspect(d), shard.name, "outside")


def test_single_file_symlink_outside_is_refused(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    shutil.move(d / "model.safetensors", tmp_path / "w.safetensors")
    (d / "model.safetensors").symlink_to(tmp_path / "w.safetensors")
    assert_clean_error(inspect(d), "model.safetensors", "outside")


def test_symlink_inside_the_checkpoint_is_fine(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "c")
    (d / "store").mkdir()
    shutil.move(d / "model.safetensors", d / "store" / "w.safetensors")
    (d / "model.safetensors").symlink_to("store/w.safetensors")
    assert Checkpoint.open(d).layout == "hf"


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_metadata_symlink_outside_is_refused(tiny_ckpt, tmp_path, name):
    d = _copy(tiny_ckpt, tmp_path / "c")
    outside = tmp_path / f"outside-{name}"
    if (d / name).exists():
        shutil.move(d / name, outside)
    else:
        outside.write_text("{}")
    (d / name).symlink_to(outside)
    if name == "config.json":
        with pytest.raises(CheckpointError, match="outside the checkpoint"):
            Checkpoint.open(d)
        return
    ckpt = Checkpoint.open(d)
    with pytest.raises(CheckpointError, match=f"{name}: resolves to .*outside the checkpoint"):
        ckpt.file(name)


def test_file_accessor(tiny_ckpt, tmp_path):
    ckpt = Checkpoint.open(tiny_ckpt)
    assert ckpt.file("tokenizer.json") == tiny_ckpt / "tokenizer.json"
    assert ckpt.file("tokenizer_config.json", required=False) is None
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.file("tokenizer_config.json")
    for bad in ("../x", "/etc/passwd"):
        with pytest.raises(CheckpointError, match="outside|absolute"):
            ckpt.file(bad)
    d = _copy(tiny_ckpt, tmp_path / "c")
    (d / "tokenizer_config.json").symlink_to(d / "nowhere")
    with pytest.raises(CheckpointError, match="broken symlink"):
        Checkpoint.open(d).file("tokenizer_config.json")


def _hf_cache(root, src):
    """src laid out as the Hugging Face hub cache does: snapshots/<rev>/NAME -> ../../blobs/<hash>."""
    repo = root / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return repo, snap


def test_hugging_face_cache_layout_keeps_working(tiny_ckpt, tmp_path):
    repo, snap = _hf_cache(tmp_path, tiny_ckpt)
    ckpt = open_source(snap)
    assert ckpt.layout == "hf" and ckpt.file("tokenizer.json").is_symlink()
    assert inspect(snap).exit_code == 0


def test_hugging_face_cache_of_another_repo_is_refused(tiny_ckpt, tmp_path):
    repo, snap = _hf_cache(tmp_path, tiny_ckpt)
    other = tmp_path / "models--evil--other" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(tiny_ckpt / "model.safetensors", other / "f")
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(os.path.relpath(other / "f", snap))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        open_source(snap)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_regular_safetensors_refused_without_hanging(tiny_ckpt, tmp_path, kind):
    d = _copy(tiny_ckpt, tmp_path / "c")
    bad = d / "zz-extra.safetensors"
    os.mkfifo(bad) if kind == "fifo" else bad.mkdir()
    out = {}

    def target():
        out["result"] = inspect(d)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the test process can end
        with open(bad, "wb"):
            pass
        pytest.fail("inspect hung on a FIFO named *.safetensors")
    assert_clean_error(out["result"], "zz-extra.safetensors", "FIFO" if kind == "fifo" else "directory")


@pytest.mark.parametrize("name", ["v3", "tiny", "demo"])
def test_a_folder_named_like_a_preset_is_never_shadowed(tmp_path, monkeypatch, name):
    """`build v3` in a folder holding a checkpoint `v3/` must not build the preset's random weights
    (tens of GB for v3): the ambiguity is refused in one line; ./v3 names the folder."""
    from dsv3_export.core.config import load_config
    from dsv3_export.core.errors import ExportError

    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    with pytest.raises(ExportError, match=f"{name}: both a preset and a folder in this directory"):
        open_source(name)
    if name != "demo":
        with pytest.raises(ExportError, match="both a preset and a folder"):
            load_config(name)
    with pytest.raises(ExportError, match="no .safetensors files|no config.json"):
        open_source(f"./{name}")  # the folder, as asked: an empty one is no checkpoint
