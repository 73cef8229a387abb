"""engines/ort.py `share_weights`: the optimized graph references the exported graph's weights
(model.onnx.data) instead of keeping a second copy, and runs bit-identically to the two-copy form."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from tests.helpers import buffered_feed, layer_pasts

GRAPHS = ("model", "mtp")


def _external(path: Path) -> list[tuple[onnx.TensorProto, dict[str, str]]]:
    model = onnx.load(str(path), load_external_data=False)
    return [(t, {e.key: e.value for e in t.external_data}) for t in _get_all_tensors(model) if uses_external_data(t)]


def _bytes(folder: Path, info: dict[str, str]) -> bytes:
    with open(folder / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]))


@pytest.fixture(scope="module")
def two_copy(tiny_build, tmp_path_factory):
    """The tiny build's exported graphs prepared again without sharing (the layout before it)."""
    from dsv3_export.engines import ort as eo

    out = tmp_path_factory.mktemp("two-copy")
    for f in tiny_build.iterdir():
        if ".ort.onnx" not in f.name:
            shutil.copy2(f, out / f.name)
    entry = eo.prepare(out, {f"{g}.onnx": out / f"{g}.onnx" for g in GRAPHS}, share=False)
    assert entry["deduplicated_bytes"] == 0
    return out


@pytest.mark.parametrize("graph", GRAPHS)
def test_optimized_graph_references_exported_weights(tiny_build, two_copy, graph):
    source = {hashlib.sha256(_bytes(tiny_build, info)).hexdigest()
              for _, info in _external(tiny_build / f"{graph}.onnx")}
    tensors = _external(tiny_build / f"{graph}.ort.onnx")
    shared = [(t, i) for t, i in tensors if i["location"] == f"{graph}.onnx.data"]
    own = [(t, i) for t, i in tensors if i["location"] != f"{graph}.onnx.data"]
    assert {i["location"] for _, i in own} <= {f"{graph}.ort.onnx.data"}
    # Every tensor whose bytes are one of the exported graph's is shared; the others (weights the
    # optimizer folded into new values, such as transposes) are not in model.onnx.data at all.
    for t, info in own:
        assert hashlib.sha256(_bytes(tiny_build, info)).hexdigest() not in source, t.name
    shared_bytes = sum(int(i["length"]) for _, i in shared)
    own_bytes = sum(int(i["length"]) for _, i in own)
    assert shared_bytes > own_bytes  # most of the weights (embedding, experts) are shared
    # The same tensors as the two-copy optimized graph, byte for byte.
    before = {t.name: hashlib.sha256(_bytes(two_copy, i)).hexdigest() for t, i in _external(two_copy / f"{graph}.ort.onnx")}
    after = {t.name: hashlib.sha256(_bytes(tiny_build, i)).hexdigest() for t, i in tensors}
    assert after == before
    # The optimized graph's own data file holds only the unshared tensors (plus alignment).
    own_file = tiny_build / f"{graph}.ort.onnx.data"
    size = own_file.stat().st_size if own_file.is_file() else 0
    assert own_bytes <= size < own_bytes + 4096 * max(len(own), 1)
    assert size < (two_copy / f"{graph}.ort.onnx.data").stat().st_size - shared_bytes + 4096 * len(tensors)


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _weight_bytes(folder: Path) -> int:
    return sum((folder / f"{g}.onnx.data").stat().st_size for g in GRAPHS)


def test_build_is_smaller_than_two_copy(tiny_build, two_copy):
    data = sum(f.stat().st_size for f in tiny_build.glob("*.data"))
    data_before = sum(f.stat().st_size for f in two_copy.glob("*.data"))
    assert data < data_before
    import json

    engine = json.loads((tiny_build / "manifest.json").read_text())["engine"]
    assert data_before - data >= engine["deduplicated_bytes"] - 4096 * 64
    print(f"tiny build: {_dir_bytes(two_copy)} -> {_dir_bytes(tiny_build)} bytes "
          f"(weights {_weight_bytes(tiny_build)}; external data {data_before} -> {data})")


def test_shared_engine_is_bit_identical(tiny_build, two_copy):
    from dsv3_export.engines import ort as eo
    from dsv3_export.exporter import load_reference

    cfg = load_reference("tiny").cfg
    a, b = eo.session(tiny_build, "model", threads=1), eo.session(two_copy, "model", threads=1)
    assert a.dsv3_model_path.name == b.dsv3_model_path.name == "model.ort.onnx"
    names = [o.name for o in a.get_outputs()]
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size, size=(2, 7))
    past = [np.zeros((2, 0, cfg.latent_dim), np.float32) for _ in range(cfg.n_layers)]
    for step in range(3):
        feeds = buffered_feed(ids, layer_pasts(past))
        out_a = dict(zip(names, a.run(None, feeds)))
        out_b = dict(zip(names, b.run(None, feeds)))
        for n in names:
            assert np.array_equal(out_a[n], out_b[n]), (step, n)
        past = [out_a[f"present_latent.{i}"] for i in range(cfg.n_layers)]
        ids = out_a["logits"][:, -1:].argmax(-1)
    ma, mb = eo.session(tiny_build, "mtp", threads=1), eo.session(two_copy, "mtp", threads=1)
    ids = rng.integers(2, cfg.vocab_size, size=(1, 5))
    hidden = rng.standard_normal((1, 5, cfg.dim)).astype(np.float32)
    feeds = buffered_feed(ids, {"past_latent.mtp": np.zeros((1, 0, cfg.latent_dim), np.float32)}, hidden_states=hidden)
    for x, y in zip(ma.run(None, feeds), mb.run(None, feeds)):
        assert np.array_equal(x, y)
