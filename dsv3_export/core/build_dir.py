"""The build directory: the one owner of manifest.json, the files' hashes, the graphs' I/O
description and the cache layout a build's graphs declare (docs/design.md, "The build directory").

A build directory holds model.onnx (+ .data), mtp.onnx (+ .data), tokenizer.json, the backend's
engine files, verify/ and manifest.json: the config, precision, backend, the source it was made
from, each graph's inputs and outputs, and every file's size and sha256. `pipeline.build` writes
it, `verification.verify` updates it (the report's files and verdict), everyone else reads it here.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dsv3_export.core.build_options import BACKENDS
from dsv3_export.core.errors import ExportError

MANIFEST = "manifest.json"
MAIN_GRAPH = "model.onnx"  # the main model (a one-graph build); a --stages N build has stage{k}.onnx instead
MTP_GRAPH = "mtp.onnx"  # the multi-token-prediction layer's graph, when the checkpoint has one
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # the checkpoint's chat template and special tokens, when it has one
VERIFY_DIR = "verify"  # verification's report
FORMAT_VERSION = 1  # the newest manifest format written and read
HASH_CHUNK = 16 * 2**20
# Marks a build's temporary folder as ours while it is written (pipeline/output_dir.py); never listed.
TMP_MARK = ".dsv3-export-tmp"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ExportError(f"--backend {backend!r} is not supported (choose from {', '.join(BACKENDS)})")
    return backend


# ---- the manifest's typed view ----------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """manifest.json as readers see it: each entry a property with its default for older builds,
    so that no reader spells a key or a default of its own. `raw` is the JSON itself."""

    raw: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.raw["config"]

    @property
    def precision(self) -> str:
        return self.raw.get("precision", "fp32")

    @property
    def backend(self) -> str:
        return self.raw.get("backend", "ort")

    @property
    def mla(self) -> str:
        return self.raw.get("mla", "absorbed")

    @property
    def lowered(self) -> bool:
        return bool(self.raw.get("lowered", False))

    @property
    def moe_form(self) -> str | None:
        """How a lowered graph runs its experts ("fused", "per-expert"); None when not lowered."""
        return self.raw.get("moe_form")

    @property
    def stages(self) -> list[dict[str, Any]] | None:
        """A `--stages N` build's stage entries (file, layers, embed, head, weight_bytes); None unstaged."""
        return self.raw.get("stages") or None

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.raw.get("quantization")

    @property
    def source(self) -> dict[str, Any]:
        return self.raw.get("source") or {}

    @property
    def io(self) -> dict[str, dict[str, list[dict]]]:
        return self.raw.get("io") or {}

    @property
    def engine(self) -> dict[str, Any]:
        return self.raw.get("engine") or {}

    @property
    def verify(self) -> dict[str, Any] | None:
        verdict = self.raw.get("verify")
        return verdict if isinstance(verdict, dict) else None

    @property
    def disk(self) -> dict[str, Any] | None:
        return self.raw.get("disk")

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.raw["files"]

    @property
    def cache_bytes_per_token(self) -> dict[str, int]:
        return self.raw.get("cache_bytes_per_token") or {}

    @property
    def build_seconds(self) -> float | None:
        return self.raw.get("build_seconds")


# ---- writing ----------------------------------------------------------------------------------------
def _dump(path: Path, manifest: dict[str, Any]) -> None:
    """Write through a temporary sibling and rename: a reader never sees half a manifest."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def disk_usage(out_dir: Path, graphs: list[str]) -> dict[str, Any]:
    """What the build directory holds against what it must: the exported graphs' weights (their
    external data files) and every file of the build; their ratio is the cost of the layout."""
    files = [p for p in out_dir.rglob("*") if p.is_file() and p.name not in (MANIFEST, TMP_MARK)]
    weights = sum((out_dir / f"{g}.data").stat().st_size for g in graphs if (out_dir / f"{g}.data").is_file())
    total = sum(p.stat().st_size for p in files)
    return {"weight_bytes": weights, "build_bytes": total, "ratio": round(total / weights, 3) if weights else None}


def write_manifest(out_dir: Path, info: dict[str, Any]) -> Manifest:
    """manifest.json for a finished build: `info` plus every file's size and sha256."""
    files = {f.relative_to(out_dir).as_posix(): file_entry(f)
             for f in sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name not in (MANIFEST, TMP_MARK))}
    manifest = {"format": FORMAT_VERSION, **info, "files": files}
    _dump(out_dir / MANIFEST, manifest)
    return Manifest(manifest)


def update_manifest(build_dir: Path, subdir: str, fields: dict[str, Any]) -> None:
    """Re-list the files under `subdir` (e.g. verify/, rewritten after the build) and set `fields`
    in a finished build's manifest, so that the hash check keeps passing. No manifest: nothing to do."""
    found = find_manifest(build_dir)
    if found is None:
        return
    manifest = found.raw
    prefix = f"{subdir}/"
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(prefix)}
    for f in sorted(p for p in (build_dir / subdir).rglob("*") if p.is_file()):
        files[f.relative_to(build_dir).as_posix()] = file_entry(f)
    manifest["files"] = dict(sorted(files.items()))
    manifest.update(fields)
    _dump(build_dir / MANIFEST, manifest)


# ---- reading ----------------------------------------------------------------------------------------
def read_manifest(build_dir: str | Path) -> Manifest:
    """The manifest of a build directory, or one ExportError saying why it is not one."""
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST
    if not build_dir.is_dir():
        raise ExportError(f"{build_dir}: no such build directory")
    if not path.is_file():
        raise ExportError(f"{build_dir}: not a build directory (no {MANIFEST}); make one with dsv3-export build")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "config" not in manifest:
        raise ExportError(f"{path}: not a dsv3-export manifest (no 'files' or 'config')")
    fmt = manifest.get("format", 1)
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise ExportError(f"{path}: format {fmt!r} is newer than this dsv3-export reads ({FORMAT_VERSION}); upgrade it")
    return Manifest(manifest)


def find_manifest(build_dir: str | Path) -> Manifest | None:
    """read_manifest, or None for a directory without manifest.json (bare graphs, e.g. mid-build)."""
    return read_manifest(build_dir) if (Path(build_dir) / MANIFEST).is_file() else None


def check_file_hashes(build_dir: str | Path, manifest: Manifest) -> None:
    """Every file listed in the manifest exists with its size and sha256, else an ExportError naming
    the first bad one. Sizes first (cheap), then the hashes, several files at once (hashlib
    releases the GIL on large buffers)."""
    build_dir = Path(build_dir)
    root = build_dir.resolve()
    entries = []
    for rel, info in sorted(manifest.files.items()):
        path = build_dir / rel
        if root not in path.resolve().parents:
            raise ExportError(f"{build_dir / MANIFEST}: file entry {rel!r} points outside the build directory")
        if not isinstance(info, dict) or "sha256" not in info:
            raise ExportError(f"{build_dir / MANIFEST}: file entry {rel!r} has no sha256")
        if not path.is_file():
            raise ExportError(f"{path}: missing (manifest.json lists it); the build is incomplete, rebuild it")
        size = path.stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise ExportError(f"{path}: {size} bytes, manifest.json says {info['bytes']}; "
                              "the file was modified or truncated, rebuild it")
        entries.append((path, info["sha256"]))
    if not entries:
        return
    with ThreadPoolExecutor(max_workers=min(4, len(entries))) as pool:
        digests = list(pool.map(lambda e: sha256_file(e[0]), entries))
    for (path, want), got in zip(entries, digests):
        if got != want:
            raise ExportError(f"{path}: sha256 does not match manifest.json; the file was modified or "
                              "corrupted, rebuild it")


# ---- the graphs' contract ---------------------------------------------------------------------------
def graph_io(path: Path) -> dict[str, list[dict]]:
    """Inputs and outputs of a saved graph (names, dtypes, symbolic shapes), read without its weights;
    ExportError naming the file when it is not an ONNX graph."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, or an OSError
        raise ExportError(f"{path}: not a readable ONNX graph ({type(e).__name__})") from None

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def takes_buffers(io: dict[str, list[dict]]) -> bool:
    """Whether a graph's I/O is graph contract v2: cache buffers written in place and their lengths
    (`cache_lengths`), not cached prefixes (version 1: `--mla naive`, older builds)."""
    return any(i["name"] == "cache_lengths" for i in io.get("inputs", []))


def cache_layout(io: dict[str, list[dict]], default_width: int) -> tuple[tuple[int, ...], np.dtype]:
    """(trailing dims, dtype) of one layer's cache as a graph's I/O declares it (`past_latent.0`, or
    `past_latent.mtp` for the MTP graph): the latent row [C], or per-head K|V [H, K+V] for a
    `--mla naive` build. Without a cache input: ((default_width,), float32)."""
    spec = next((i for i in io.get("inputs", []) if i.get("name") in ("past_latent.0", "past_latent.mtp")), None)
    if spec is None:
        return (default_width,), np.dtype(np.float32)
    return tuple(int(d) for d in spec["shape"][2:]), np.dtype(spec.get("dtype", "float32"))


# ---- pipeline stages --------------------------------------------------------------------------------
def stage_graphs(manifest: Manifest) -> list[dict[str, Any]]:
    """The main model's graphs in call order, each {"file", "layers": [first, end]}: the stages of a
    `--stages N` build (manifest "stages"), or model.onnx over every layer. Stage k takes input_ids
    (k = 0) or hidden_in [B, S, D] (k > 0), cache_lengths and its layers' past_latent.{i} (global
    layer numbers); it returns hidden_out [B, S, D] (not last) or logits and hidden_states (last),
    and its layers' present_latent.{i} (docs/design.md, "Pipeline stages")."""
    stages = manifest.stages
    if not stages:
        return [{"file": MAIN_GRAPH, "layers": [0, int(manifest.config["n_layers"])]}]
    return [{"file": s["file"], "layers": list(s["layers"])} for s in stages]


def find_stages(build_dir: str | Path) -> list[dict[str, Any]]:
    """stage_graphs of a build's manifest or, in a build directory without one (a build being
    written, before its manifest), of the graphs it holds: its stage{k}.onnx files (each one's layers
    read from its cache inputs), else model.onnx."""
    build_dir = Path(build_dir)
    manifest = find_manifest(build_dir)
    if manifest is not None:
        return stage_graphs(manifest)
    files = sorted(build_dir.glob("stage*.onnx"), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit() else -1)
    files = [f for f in files if f.stem[5:].isdigit()]
    if not files:
        io = graph_io(build_dir / MAIN_GRAPH) if (build_dir / MAIN_GRAPH).is_file() else {"inputs": []}
        return [{"file": MAIN_GRAPH, "layers": [0, sum(i["name"].startswith("past_latent.") for i in io["inputs"])]}]
    out = []
    for f in files:
        layers = [int(i["name"].rsplit(".", 1)[1]) for i in graph_io(f)["inputs"] if i["name"].startswith("past_latent.")]
        out.append({"file": f.name, "layers": [min(layers), max(layers) + 1] if layers else [0, 0]})
    return out


def chain_io(ios: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """The I/O of graphs called in a chain as one graph's: the first one's token inputs, the last
    one's outputs, and every graph's caches in order (the stages of a `--stages N` build)."""
    if len(ios) == 1:
        return ios[0]
    inputs = [i for i in ios[0]["inputs"] if not i["name"].startswith("past_latent.")]
    outputs = [o for o in ios[-1]["outputs"] if not o["name"].startswith("present_latent.")]
    inputs += [i for g in ios for i in g["inputs"] if i["name"].startswith("past_latent.")]
    outputs += [o for g in ios for o in g["outputs"] if o["name"].startswith("present_latent.")]
    return {"inputs": inputs, "outputs": outputs}


def main_io(manifest: Manifest) -> dict[str, list[dict]]:
    """The main model's contract as one graph: model.onnx's I/O, or for a staged build the chain's."""
    return chain_io([manifest.io[s["file"]] for s in stage_graphs(manifest)])
