"""Property: a safetensors file with mutated bytes (its data, its JSON header, its length prefix,
or cut short) either loads as what its bytes say or is refused with our one-line CheckpointError:
never another exception, never a hang (each read runs in a thread joined with a timeout)."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsv3_export.exporter.names as names
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.checkpoint import Checkpoint
from dsv3_export.exporter.checkpoint_writer import make_checkpoint

READ_TIMEOUT = 30  # seconds, per example
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "I32": torch.int32, "I64": torch.int64, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}


@pytest.fixture(scope="module")
def original():
    """A small float checkpoint: the tiny preset cut to one layer (fast to read whole)."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    from dsv3_export.core.config import preset

    cfg = preset("tiny").replace(n_layers=2, n_mtp_layers=0, vocab_size=128)
    ckpt = make_checkpoint(cfg, root / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    yield ckpt, (ckpt / "model.safetensors").read_bytes()
    shutil.rmtree(root, ignore_errors=True)


def decode(data: bytes) -> dict[str, torch.Tensor] | None:
    """An independent reading of a safetensors file: what its bytes say, or None if they say nothing
    consistent."""
    try:
        if len(data) < 8:
            return None
        n = struct.unpack("<Q", data[:8])[0]
        if 8 + n > len(data):
            return None
        header = json.loads(data[8: 8 + n].decode("utf-8"))
        body = data[8 + n:]
        out = {}
        for k, info in header.items():
            if k == "__metadata__":
                continue
            dt = DTYPES[info["dtype"]]
            a, b = info["data_offsets"]
            shape = tuple(info["shape"])
            count = 1
            for s in shape:
                count *= s
            if not 0 <= a <= b <= len(body) or (b - a) != count * torch.empty(0, dtype=dt).element_size():
                return None
            out[k] = torch.frombuffer(bytearray(body[a:b]) or bytearray(1), dtype=torch.uint8)[: b - a].view(dt).reshape(shape)
        return out
    except Exception:
        return None


def read_all(d: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(d)
    return {names.to_hf(n): ckpt.get(n) for n in ckpt.names()}


def check(original, data: bytes) -> None:
    src, _ = original
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "c"
        d.mkdir()
        shutil.copy(src / "config.json", d / "config.json")
        (d / "model.safetensors").write_bytes(data)
        box: dict = {}

        def target():
            try:
                box["tensors"] = read_all(d)
            except BaseException as e:  # noqa: BLE001 - the property is about which ones escape
                box["error"] = e

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(READ_TIMEOUT)
        assert not t.is_alive(), "the checkpoint reader hung"
    if "error" in box:
        e = box["error"]
        assert isinstance(e, ExportError), f"{type(e).__name__}: {e}"
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        return
    expected = decode(data)
    assert expected is not None, "the reader accepted a file whose bytes are inconsistent"
    for k, got in box["tensors"].items():
        want = expected[k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)), k


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(where=st.floats(0, 1, exclude_max=True), byte=st.integers(0, 255))
def test_mutated_data_bytes(original, where, byte):
    _, data = original
    start = 8 + _header_len(data)
    i = start + int(where * (len(data) - start))
    check(original, data[:i] + bytes([byte]) + data[i + 1:])


HEADER_BYTES = st.sampled_from(list(b'0123456789"{}[],:-.eE ') + [0, 0xFF, ord("a"), ord("F"), ord("I")])


@SETTINGS
@given(where=st.floats(0, 1, exclude_max=True), byte=HEADER_BYTES, mode=st.sampled_from(["replace", "insert", "delete"]))
def test_mutated_header_bytes(original, where, byte, mode):
    _, data = original
    n = _header_len(data)
    i = 8 + int(where * n)
    if mode == "replace":
        mutated = data[:i] + bytes([byte]) + data[i + 1:]
    elif mode == "insert":  # the length prefix stays: the header now ends one byte early or the JSON shifts
        mutated = data[:i] + bytes([byte]) + data[i:]
    else:
        mutated = data[:i] + data[i + 1:]
    check(original, mutated)


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cut=st.floats(0, 1, exclude_max=True), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_cut_or_lying_length(original, cut, length):
    _, data = original
    if length is not None:
        data = struct.pack("<Q", length) + data[8:]
    else:
        data = data[: int(cut * len(data))]
    check(original, data)
