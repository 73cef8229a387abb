"""The ONNX Runtime engine: the exported graphs, optimized once at build time and saved.

`prepare` runs ONNX Runtime's graph optimizer over each graph (model.onnx, mtp.onnx) and saves the
result next to it (model.ort.onnx), so every later load skips optimization: `session` loads that
file with optimizations off. Without it, the raw graph is loaded and optimized online, as usual.
The optimized graph keeps one copy of the weights on disk: each of its external tensors whose bytes
equal one of the exported graph's references model.onnx.data (same folder) directly; only the
tensors the optimizer changed (folded, fused) stay in model.ort.onnx.data, which is left out when
empty (`share_weights`).

Why ORT_ENABLE_EXTENDED and not ORT_ENABLE_ALL: "all" adds layout optimizations (NCHWc blocking)
whose block size comes from the vector width of the CPU that runs the optimizer (AVX2 vs AVX-512),
so a model saved with them is tied to that CPU, and ONNX Runtime warns against saving it. The
extended level (constant folding, redundant-node elimination, MatMul/LayerNorm/GELU fusions into
com.microsoft ops) gives the same graph on every x86 or Arm CPU, so the saved file can be copied
with the build directory. The optimization runs on the CPU provider: fusions are assigned per
provider, so the saved file is the CPU engine; a session on another provider (CUDA) loads the raw
graph and lets ONNX Runtime optimize it for that provider online.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from dsv3_export.core.build_dir import find_manifest
from dsv3_export.core.errors import ExportError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPTIMIZATION_LEVEL = "extended"
OPTIMIZED_SUFFIX = ".ort.onnx"
# Initializers at least this large go to the external data file; small ones (shapes, scalars,
# norms) stay in the graph where the optimizer folded them.
EXTERNAL_MIN_BYTES = 1024
# The providers the saved (offline-optimized) graphs were optimized for.
PREPARED_PROVIDERS = (CPU,)
# Offsets of the tensors kept in the optimized graph's own data file are aligned like ONNX Runtime
# aligns them when it writes that file (so they can be memory-mapped).
DATA_ALIGNMENT = 4096


def optimized_name(graph: str) -> str:
    """model.onnx -> model.ort.onnx (its weights: model.ort.onnx.data)."""
    stem = graph[: -len(".onnx")] if graph.endswith(".onnx") else graph
    return stem + OPTIMIZED_SUFFIX


@contextlib.contextmanager
def _quiet():
    """Silence ONNX Runtime while probing providers: its C++ logger writes errors to fd 2 and its
    Python fallback path prints to stdout, whatever the log level."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        devnull = None
    try:
        if devnull is not None:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(devnull, fd)
                except OSError:
                    pass
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if devnull is not None:
            os.close(devnull)


def _probe_model() -> bytes:
    """A one-node graph (Identity) to test-load a provider with."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@functools.lru_cache(maxsize=None)
def _provider_loads(provider: str) -> bool:
    if provider == CPU:
        return True
    if provider not in ort.get_available_providers():
        return False
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        with _quiet():
            sess = ort.InferenceSession(_probe_model(), so, providers=[provider, CPU])
            return provider in sess.get_providers()
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def available_providers() -> tuple[str, ...]:
    """The execution providers that really work here, best first: TensorRT and CUDA only when their
    libraries load and a device answers (ONNX Runtime lists them whenever the wheel has them),
    CPU always. Probed once per process, silently."""
    listed = ort.get_available_providers()
    return tuple(p for p in (TENSORRT, CUDA) if p in listed and _provider_loads(p)) + (CPU,)


def default_providers() -> list[str]:
    """What an "ort" engine runs on when not told: CUDA when it works, else the CPU. (ORT's TensorRT
    provider is left out: TensorRT engines are the "trt" backend's business.)"""
    return [CUDA, CPU] if CUDA in available_providers() else [CPU]


def _check_providers(providers: Iterable[str] | None) -> list[str]:
    if providers is None:
        return default_providers()
    providers = list(providers)
    if not providers:
        raise ExportError("no execution provider given")
    working = available_providers()
    for p in providers:
        if p not in working:
            raise ExportError(f"execution provider {p} does not work on this machine "
                              f"(working: {', '.join(working)})")
    return providers


def _graph_path(build_dir: Path, graph: str) -> Path:
    return build_dir / (graph if graph.endswith(".onnx") else f"{graph}.onnx")


def prepare(build_dir: str | Path, graphs: dict[str, Path], share: bool = True) -> dict:
    """Optimize each graph with ONNX Runtime (extended level, CPU provider) and save the result next
    to it, weights in external data: those equal to the exported graph's are referenced in its data
    file (`share_weights`; `share=False`: the optimized graph keeps its own copy of every weight, as
    builds before it did). Returns the manifest's "engine" entry, with the bytes deduplicated."""
    build_dir = Path(build_dir)
    started = time.time()
    saved = {}
    for name, path in graphs.items():
        path = Path(path)
        out = build_dir / optimized_name(path.name)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out)
        # Relative to the optimized model's folder.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(EXTERNAL_MIN_BYTES))
        t0 = time.time()
        try:
            ort.InferenceSession(str(path), so, providers=list(PREPARED_PROVIDERS))
        except Exception as e:  # ORT raises its own exception types with a multi-line message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{path.name}: ONNX Runtime cannot load it: {first}") from e
        shared = share_weights(out, path) if share else {"shared_tensors": 0, "deduplicated_bytes": 0}
        files = [out.name] + ([out.name + ".data"] if (build_dir / (out.name + ".data")).is_file() else [])
        saved[name] = {"optimized": out.name, "files": files, "shared": shared,
                       "seconds": round(time.time() - t0, 2)}
    return {
        "kind": "onnxruntime",
        "onnxruntime": ort.__version__,
        "graph_optimization_level": OPTIMIZATION_LEVEL,
        "providers": list(PREPARED_PROVIDERS),
        "graphs": saved,
        "deduplicated_bytes": sum(g["shared"]["deduplicated_bytes"] for g in saved.values()),
        "seconds": round(time.time() - started, 2),
    }


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _key(tensor: TensorProto, length: int) -> tuple:
    # Not the dims: a folded Reshape of a weight is the same bytes under other dims, and external
    # data is bytes only, so it shares them as well.
    return tensor.data_type, length


CHUNK_BYTES = 16 << 20  # share_weights reads and copies tensors in pieces of this size


class _DataFile:
    """An external data file read by offset with pread, a piece at a time: hashing or copying a
    tensor holds CHUNK_BYTES, and no mapped page of the file counts in this process's memory."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def span(self, info: dict[str, str]) -> tuple[int, int]:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else self.size - offset
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ExportError(f"{self.path.name}: an external tensor lies outside the file "
                              f"(offset {offset}, length {length}, file {self.size} bytes)")
        return offset, length

    def pieces(self, offset: int, length: int):
        end = offset + length
        while offset < end:
            piece = os.pread(self.fd, min(CHUNK_BYTES, end - offset), offset)
            if not piece:
                raise ExportError(f"{self.path.name}: ends before offset {end}")
            offset += len(piece)
            yield piece

    def digest(self, offset: int, length: int) -> str:
        h = hashlib.sha256()
        for piece in self.pieces(offset, length):
            h.update(piece)
        return h.hexdigest()


def share_weights(optimized: Path, source: Path) -> dict:
    """Make the optimized graph `optimized` (model.ort.onnx) reference the weights it has in common
    with the exported graph `source` (model.onnx) in the source's data file (model.onnx.data)
    instead of its own copy, so the build directory holds each weight once. A tensor is shared when
    its dtype, dims and bytes (sha256) equal one of the source's external tensors; the others are
    rewritten, in order, into a new (smaller) optimized data file, which is deleted when nothing is
    left in it. Tensors are read a piece at a time (pread, CHUNK_BYTES: no mapped pages, no copy of
    the weights in memory).
    Returns counts: tensors and bytes shared (deduplicated) and kept in the optimized data file."""
    optimized, source = Path(optimized), Path(source)
    folder = optimized.parent
    report = {"shared_tensors": 0, "deduplicated_bytes": 0, "own_tensors": 0, "own_bytes": 0}
    model = onnx.load(str(optimized), load_external_data=False)
    ext = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    if not ext:
        return report
    locations = {_external_info(t).get("location") for t in ext}
    if len(locations) != 1:
        raise ExportError(f"{optimized.name}: external data in several files: {sorted(map(str, locations))}")
    own_name = locations.pop()
    own_path = folder / own_name
    src_model = onnx.load(str(source), load_external_data=False)
    src_ext = [t for t in _get_all_tensors(src_model) if uses_external_data(t)]
    # Candidates by (dtype, dims, length); only those are hashed.
    src_by_key: dict[tuple, list[tuple[str, int, int]]] = {}
    for t in src_ext:
        info = _external_info(t)
        if "length" not in info:
            continue
        loc, offset, length = info["location"], int(info.get("offset", 0)), int(info["length"])
        src_by_key.setdefault(_key(t, length), []).append((loc, offset, length))
    src_files = {loc for entries in src_by_key.values() for loc, _, _ in entries}
    if len(src_files) > 1 or (src_files and Path(next(iter(src_files))).name != next(iter(src_files))):
        src_by_key = {}  # only a single data file next to the source graph is shared
    new_path = folder / (own_name + ".tmp")
    tmp_graph = folder / (optimized.name + ".tmp")
    try:
        _rewrite(model, ext, own_path, source, src_by_key, src_files, new_path, report)
        onnx.save_model(model, str(tmp_graph))
    except BaseException:
        for p in (new_path, tmp_graph):
            with contextlib.suppress(OSError):
                p.unlink()
        raise
    if report["own_tensors"]:
        os.replace(new_path, own_path)
    else:
        new_path.unlink()
        own_path.unlink()
    os.replace(tmp_graph, optimized)
    return report


def _rewrite(model, ext, own_path, source, src_by_key, src_files, new_path, report) -> None:
    """share_weights' loop: point each tensor at its match in the source's data file or copy it
    into `new_path`, one tensor at a time."""
    own_name = own_path.name
    src_hashes: dict[tuple[int, int], str] = {}
    own = _DataFile(own_path)
    src = _DataFile(source.parent / next(iter(src_files))) if src_by_key else None
    try:
        with open(new_path, "wb") as out:
            for t in ext:
                offset, length = own.span(_external_info(t))
                match = None
                candidates = src_by_key.get(_key(t, length), [])
                if candidates:
                    digest = own.digest(offset, length)
                    for loc, s_offset, s_length in candidates:
                        if (s_offset, s_length) not in src_hashes:
                            src_hashes[(s_offset, s_length)] = src.digest(*src.span(
                                {"offset": str(s_offset), "length": str(s_length)}))
                        if src_hashes[(s_offset, s_length)] == digest:
                            match = (loc, s_offset, s_length)
                            break
                if match is not None:
                    _set_external(t, *match)
                    report["shared_tensors"] += 1
                    report["deduplicated_bytes"] += length
                else:
                    pad = -out.tell() % DATA_ALIGNMENT
                    if pad:
                        out.write(b"\0" * pad)
                    at = out.tell()
                    for piece in own.pieces(offset, length):
                        out.write(piece)
                    _set_external(t, own_name, at, length)
                    report["own_tensors"] += 1
                    report["own_bytes"] += length
    finally:
        own.close()
        if src is not None:
            src.close()


def session(build_dir: str | Path, graph: str = "model", providers: Iterable[str] | None = None,
            threads: int | None = None, spin: bool = True) -> "ort.InferenceSession":
    """An InferenceSession for one graph of a build ("model" or "mtp"). Loads the saved optimized
    graph (optimizations off: they are already applied) when it exists and the providers are the
    ones it was optimized for; otherwise the raw graph, optimized online. `threads`: intra-op
    threads (None: ONNX Runtime's default, one per physical core). `spin=False`: the intra-op
    threads sleep between runs instead of busy-waiting (for a session that alternates with another
    one, as the MTP graph does with the main graph in speculative decoding). The path loaded is in
    `session.dsv3_model_path`."""
    build_dir = Path(build_dir)
    providers = _check_providers(providers)
    raw = _graph_path(build_dir, graph)
    optimized = build_dir / optimized_name(raw.name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        if threads < 0:
            raise ExportError(f"threads must be >= 0 (0 = ONNX Runtime's default), got {threads}")
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    manifest = find_manifest(build_dir)
    if manifest is not None and manifest.moe_form == "per-expert":
        # ONNX Runtime's static memory-reuse plan is quadratic in a graph's values: 2.9 s of session
        # start for `small`'s per-expert graph, 0.16 s without it (its arena still recycles memory
        # at run time; decode measured no slower, docs/performance.md).
        so.enable_mem_reuse = False
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized.is_file() and tuple(providers) == PREPARED_PROVIDERS:
        path = optimized
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif raw.is_file():
        path = raw
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    else:
        raise ExportError(f"{raw}: no such graph in the build directory")
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path.name}: ONNX Runtime cannot load it: {first}") from e
    sess.dsv3_model_path = path
    return sess


def shared_value(array: np.ndarray) -> "ort.OrtValue":
    """An OrtValue over a C-contiguous numpy array's own memory (no copy): bound as both a graph's
    input and output, the graph writes into the array."""
    if not array.flags.c_contiguous:
        raise ValueError("shared_value needs a C-contiguous array")
    return ort.OrtValue.ortvalue_from_numpy(array)


def run_in_place(session, inputs: dict[str, np.ndarray], buffers: dict[str, np.ndarray],
                 outputs: Sequence[str]) -> list[np.ndarray]:
    """One run of `session` with each cache buffer (past name -> array) bound as both its past
    input and its present output (past_latent.X -> present_latent.X), so the graph's TensorScatter
    writes the new rows into the array itself; `inputs` are bound as they are, `outputs` come back
    as new arrays, in order. A session without I/O binding (TensorRT) runs normally and the presents
    are copied back into the buffers."""
    if not hasattr(session, "io_binding"):
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(None, {**inputs, **buffers})))
        for past, b in buffers.items():
            b[...] = out[past.replace("past_", "present_", 1)]
        return [out[n] for n in outputs]
    binding = session.io_binding()
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value)
    values = {name: shared_value(b) for name, b in buffers.items()}  # kept alive until the run returns
    for name, v in values.items():
        binding.bind_ortvalue_input(name, v)
        binding.bind_ortvalue_output(name.replace("past_", "present_", 1), v)
    for name in outputs:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    return [o.numpy() for o in binding.get_outputs()[-len(outputs):]]
