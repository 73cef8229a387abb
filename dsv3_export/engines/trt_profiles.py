"""The TensorRT backend's pure logic: build options, optimization profiles from a graph's inputs,
the choice of profile for given input shapes, the build directory's profile table and manifest
entry. No TensorRT here: tests/engines/test_trt.py runs all of it anywhere. engines/trt.py builds
and runs plans with it (and re-exports it).

Why two profiles: one graph serves prefill (many tokens over an empty cache) and decode (a few
tokens over a long cache); their shapes pull TensorRT's tactic choice in opposite directions, so a
single profile spanning both would be tuned for neither.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

from dsv3_export.core.build_dir import takes_buffers
from dsv3_export.core.errors import ExportError
from dsv3_export.plugins import DOMAIN

PLAN_SUFFIX = ".plan"
PROFILES_FILE = "profiles.json"
PROFILES_FORMAT = 1
TIMING_CACHE = "timing.cache"
PROFILE_NAMES = ("prefill", "decode")
DIM_ROLES = ("batch", "seq", "past")  # the exporter's dynamic dim names (exporter/export.py)
# Real contexts (163,840 tokens for V3) would size TensorRT's activation memory for shapes nobody
# runs on one GPU; a build covers this much unless told otherwise (--max-seq-len).
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_BATCH = 8
# Prefill activations scale with batch x tokens x vocab (the logits): cap the prompt separately.
DEFAULT_MAX_PREFILL = 2048
DEFAULT_OPT_PREFILL = 128
# Decode feeds 1 token, MTP speculation verifies 2; a little headroom for longer drafts.
DEFAULT_DECODE_SEQ = 4
DEFAULT_WORKSPACE_GIB = 8.0
ATTENTION_IMPLS = ("aot", "jit")


# ---- options ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrtOptions:
    """What the engine must accept. None fields are filled from the model by `resolve`."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_seq_len: int | None = None  # past + new tokens; default min(model's max_seq_len, 4096)
    max_prefill: int | None = None  # prompt tokens in one call; default min(max_seq_len, 2048)
    opt_batch: int = 1
    opt_prefill: int | None = None  # the prompt length TensorRT tunes for; default min(max_prefill, 128)
    decode_seq: int = DEFAULT_DECODE_SEQ  # tokens per call after the prefill
    workspace_gib: float = DEFAULT_WORKSPACE_GIB
    attention_impl: str = "aot"  # LatentAttention plugin: "aot" (kernel in the plan) or "jit" (Python)
    optimization_level: int | None = None  # TensorRT's builder optimization level (None: its default)
    require_plugins: bool = True  # every dsv3 node must become a plugin layer, else the build fails

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "TrtOptions":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ExportError(f"unknown TensorRT option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resolved(self) -> bool:
        return None not in (self.max_seq_len, self.max_prefill, self.opt_prefill)

    def resolve(self, model_max_seq_len: int) -> "TrtOptions":
        """Concrete, checked options for a model whose context is `model_max_seq_len` tokens."""
        def need(ok: bool, message: str):
            if not ok:
                raise ExportError(message)

        for name in ("max_batch", "opt_batch", "decode_seq"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{'--max-batch' if name == 'max_batch' else name} must be a positive integer, "
                 f"got {getattr(self, name)!r}")
        need(self.opt_batch <= self.max_batch, f"opt_batch ({self.opt_batch}) exceeds --max-batch ({self.max_batch})")
        max_seq = self.max_seq_len if self.max_seq_len is not None else min(model_max_seq_len, DEFAULT_MAX_SEQ_LEN)
        need(isinstance(max_seq, int) and max_seq >= 2, f"--max-seq-len must be an integer >= 2, got {max_seq!r}")
        need(max_seq <= model_max_seq_len, f"--max-seq-len {max_seq} exceeds the model's context length "
                                           f"(max_seq_len {model_max_seq_len})")
        prefill = self.max_prefill if self.max_prefill is not None else min(max_seq, DEFAULT_MAX_PREFILL)
        need(isinstance(prefill, int) and 1 <= prefill <= max_seq,
             f"--max-prefill must be between 1 and --max-seq-len ({max_seq}), got {prefill!r}")
        opt_prefill = self.opt_prefill if self.opt_prefill is not None else min(prefill, DEFAULT_OPT_PREFILL)
        need(isinstance(opt_prefill, int) and 1 <= opt_prefill <= prefill,
             f"opt_prefill must be between 1 and max_prefill ({prefill}), got {opt_prefill!r}")
        need(self.decode_seq < max_seq, f"decode_seq ({self.decode_seq}) must be below --max-seq-len ({max_seq})")
        need(isinstance(self.workspace_gib, (int, float)) and self.workspace_gib > 0,
             f"workspace_gib must be > 0, got {self.workspace_gib!r}")
        need(self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attention_impl!r}")
        return dataclasses.replace(self, max_seq_len=max_seq, max_prefill=prefill, opt_prefill=opt_prefill)


def dim_ranges(options: TrtOptions, buffered: bool = False) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of each dynamic dim role, per profile. Decode's past starts at 1: a call with
    an empty cache is a prefill (any length up to max_prefill), so the two profiles never overlap and
    the choice between them is never ambiguous. past + seq <= max_seq_len is the runtime's check
    (a profile bounds each dim on its own). `buffered` (graph contract v2): "past" is the cache
    buffer's capacity, which holds the new rows too, so a prefill's is at least its seq."""
    if not options.resolved:
        raise ValueError("TrtOptions must be resolved against the model (TrtOptions.resolve) first")
    batch = (1, options.opt_batch, options.max_batch)
    past_max = options.max_seq_len - 1
    prefill_past = (1, options.opt_prefill, options.max_seq_len) if buffered else (0, 0, 0)
    decode_past = (1, max(1, past_max // 2), options.max_seq_len if buffered else past_max)
    return {
        "prefill": {"batch": batch, "seq": (1, options.opt_prefill, options.max_prefill), "past": prefill_past},
        "decode": {"batch": batch, "seq": (1, 1, options.decode_seq), "past": decode_past},
    }


def make_profiles(inputs: Sequence[Mapping[str, Any]], options: TrtOptions) -> list[dict[str, Any]]:
    """The optimization profiles of one graph from its inputs ({"name", "shape"} as
    core.build_dir.graph_io gives them: ints or the dim names batch / seq / past)."""
    out = []
    buffered = takes_buffers({"inputs": inputs})
    for profile, ranges in dim_ranges(options, buffered).items():
        shapes = {}
        for inp in inputs:
            lo, opt, hi = [], [], []
            for i, dim in enumerate(inp["shape"]):
                if isinstance(dim, int) and dim > 0:
                    r = (dim, dim, dim)
                elif dim in ranges:
                    r = ranges[dim]
                else:
                    raise ExportError(f"input {inp['name']}: dimension {i} is {dim!r}; TensorRT profiles are "
                                      f"made for the dims {', '.join(DIM_ROLES)} and fixed sizes")
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            shapes[inp["name"]] = {"min": lo, "opt": opt, "max": hi}
        out.append({"name": profile, "ranges": {k: list(v) for k, v in ranges.items()}, "inputs": shapes})
    return out


def describe_profile(profile: Mapping[str, Any]) -> str:
    """'decode: batch 1..8, seq 1..4, past 1..4095' (or per-input bounds without role ranges)."""
    if profile.get("ranges"):
        parts = [f"{k} {lo}..{hi}" if lo != hi else f"{k} {lo}" for k, (lo, _, hi) in profile["ranges"].items()]
    else:
        parts = [f"{n} {s['min']}..{s['max']}" for n, s in profile["inputs"].items()]
    return f"{profile.get('name', '?')}: {', '.join(parts)}"


def _misfit(profile: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Why `shapes` (complete, right ranks) do not fit `profile`, or None when they do."""
    for name, bounds in profile["inputs"].items():
        for i, (d, lo, hi) in enumerate(zip(shapes[name], bounds["min"], bounds["max"])):
            if not lo <= d <= hi:
                return f"{name} dim {i} is {d}, outside {lo}..{hi}"
    return None


def max_batch(profiles: Sequence[Mapping[str, Any]]) -> int:
    """The most sequences one call can take: the largest batch any profile admits (the first input's
    leading dimension, input_ids or a stage's hidden_in)."""
    return max(int(next(iter(p["inputs"].values()))["max"][0]) for p in profiles)


def select_profile(profiles: Sequence[Mapping[str, Any]], shapes: Mapping[str, Sequence[int]],
                   graph: str = "model") -> int:
    """Index of the first profile that admits every input shape, else an ExportError that lists the
    profiles and says which option to raise."""
    if not profiles:
        raise ExportError(f"{graph}: the engine has no optimization profiles")
    wanted = profiles[0]["inputs"]  # every profile covers the same inputs with the same ranks
    extra = sorted(set(shapes) - set(wanted))
    missing = [n for n in wanted if n not in shapes]
    if extra or missing:
        what = [f"missing input(s) {', '.join(missing)}"] if missing else []
        what += [f"unexpected input(s) {', '.join(extra)}"] if extra else []
        raise ExportError(f"{graph}: {'; '.join(what)} (the engine takes {', '.join(wanted)})")
    for name, bounds in wanted.items():
        if len(shapes[name]) != len(bounds["min"]):
            raise ExportError(f"{graph}: input {name} has rank {len(shapes[name])}, the engine wants "
                              f"{len(bounds['min'])}")
    reasons = []
    for i, profile in enumerate(profiles):
        why = _misfit(profile, shapes)
        if why is None:
            return i
        reasons.append(f"{describe_profile(profile)} ({why})")
    shown = ", ".join(f"{n} {list(s)}" for n, s in list(shapes.items())[:2])
    raise ExportError(f"{graph}: input shapes ({shown}, ...) fit no optimization profile of the TensorRT engine "
                      f"[{'; '.join(reasons)}]; rebuild with larger --max-batch / --max-seq-len / --max-prefill")


def check_profiles_match(expected: Sequence[Mapping[str, Any]], actual: Sequence[Mapping[str, Any]],
                         where: str) -> None:
    """profiles.json must describe the plan it sits next to: same count, same min/max per input."""
    if len(expected) != len(actual):
        raise ExportError(f"{where}: {PROFILES_FILE} lists {len(expected)} profiles, the engine has {len(actual)}; "
                          "the build directory is inconsistent, rebuild it")
    for i, (e, a) in enumerate(zip(expected, actual)):
        for name, bounds in e["inputs"].items():
            got = a["inputs"].get(name)
            if got is None or list(got["min"]) != list(bounds["min"]) or list(got["max"]) != list(bounds["max"]):
                raise ExportError(f"{where}: profile {i} ({e.get('name', '?')}) input {name}: {PROFILES_FILE} says "
                                  f"{bounds['min']}..{bounds['max']}, the engine "
                                  f"{'lacks it' if got is None else str(got['min']) + '..' + str(got['max'])}; "
                                  "rebuild")


def polygraphy_profiles(profiles: Sequence[Mapping[str, Any]]) -> list:
    """Our profile dicts as polygraphy.backend.trt.Profile objects (no TensorRT needed to make them)."""
    from polygraphy.backend.trt import Profile

    out = []
    for p in profiles:
        prof = Profile()
        for name, s in p["inputs"].items():
            prof.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
        out.append(prof)
    return out


# ---- the build directory -------------------------------------------------------------------------------
def plan_name(graph: str) -> str:
    """model.onnx -> model.plan."""
    stem = graph[: -len(".onnx")] if graph.endswith(".onnx") else graph
    return stem + PLAN_SUFFIX


def profiles_document(options: TrtOptions, engines: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """profiles.json: the options the plans were built with and, per plan, its graph and profiles."""
    return {"format": PROFILES_FORMAT, "options": options.to_dict(), "engines": dict(engines)}


def load_profiles(build_dir: str | Path) -> dict[str, Any] | None:
    """profiles.json of a build, or None when it has none."""
    path = Path(build_dir) / PROFILES_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("engines"), dict):
        raise ExportError(f"{path}: not a dsv3-export profile table (no 'engines')")
    if doc.get("format", 1) > PROFILES_FORMAT:
        raise ExportError(f"{path}: format {doc['format']} is newer than this dsv3-export reads; upgrade it")
    return doc


def count_dsv3_nodes(onnx_path: str | Path) -> dict[str, int]:
    """op_type -> count of the top-level dsv3-domain nodes: the plugin layers TensorRT must create."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_portable(onnx_path: str | Path) -> None:
    """TensorRT parses standard ONNX and the dsv3 plugins; a graph lowered for ONNX Runtime
    (com.microsoft.MoE, ...) is refused here with what to do, not deep in the parser."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx", DOMAIN)})
    if foreign:
        raise ExportError(f"{Path(onnx_path).name} holds ONNX Runtime-only ops ({', '.join(foreign)}) that TensorRT "
                          "cannot parse; a graph lowered for --backend ort is one: build with --backend trt "
                          "(or --no-lower)")


def manifest_entry(options: TrtOptions, graphs: Mapping[str, Mapping[str, Any]], *, tensorrt_version: str,
                   device: str | None, seconds: float) -> dict[str, Any]:
    """The manifest's "engine" entry for a TensorRT build (the counterpart of engines.ort.prepare's)."""
    return {
        "kind": "tensorrt",
        "tensorrt": tensorrt_version,
        "strongly_typed": True,
        "attention_impl": options.attention_impl,
        "device": device,  # plans run on the GPU model (and TensorRT version) that built them
        "options": options.to_dict(),
        "profiles": PROFILES_FILE,
        "timing_cache": TIMING_CACHE,
        "graphs": dict(graphs),
        "seconds": round(seconds, 2),
    }
