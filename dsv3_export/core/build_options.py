"""What a build is asked to be: one `BuildOptions` for `dsv3_export.build(...)` and
`dsv3-export build` alike, and the names each of its choices may take.

Pure data, light to import: the CLI checks its flags against it before loading torch or ONNX.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from dsv3_export.core.errors import ExportError

PRECISIONS = ("fp32", "fp8", "int8", "int8-wo", "int4-wo")
BACKENDS = ("ort", "trt")  # the engines a build can hold
MLA_FORMS = ("absorbed", "naive")
MOE_FORMS = ("fused", "per-expert")  # how a lowered ONNX Runtime graph runs its experts
# Where `build` writes and `run`, `serve`, `bench` look by default: not `build/`, which setuptools
# and many other tools use for their own output.
DEFAULT_BUILD_DIR = "dsv3-build"
TRT_FIELDS = ("max_batch", "max_seq_len", "max_prefill")  # the TensorRT profile limits `build` takes as flags


def _choice(flag: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ExportError(f"{flag} {value!r} is not supported (choose from {', '.join(choices)})")


@dataclass(frozen=True)
class BuildOptions:
    """Everything `dsv3-export build` takes besides SOURCE and OUT (docs/build.md).

    precision: the stored weight format (docs/precision.md); keep_fp: fnmatch patterns of weights
    left in high precision (None: the precision's defaults); backend: ort or trt; mla: absorbed
    (latent cache) or naive; moe_form: fused or per-expert experts in a lowered ORT graph; lower:
    ONNX Runtime's native kernels in place of the portable bodies; mtp: export mtp.onnx when the
    checkpoint has the layer; verify: compare with the PyTorch reference; force: replace OUT;
    seed: a preset's random weights; revision: of a Hugging Face id (default: main); stages:
    pipeline-stage graphs; trt: TensorRT options
    (engines.trt.TrtOptions fields, e.g. {"max_batch": 4}), backend trt only."""

    precision: str = "fp32"
    keep_fp: tuple[str, ...] | None = None
    backend: str = "ort"
    mla: str = "absorbed"
    moe_form: str = "fused"
    lower: bool = True
    mtp: bool = True
    verify: bool = True
    force: bool = False
    seed: int = 0
    revision: str | None = None
    stages: int = 1
    trt: Mapping[str, Any] | None = None

    def __post_init__(self):
        if self.keep_fp is not None and not isinstance(self.keep_fp, tuple):
            object.__setattr__(self, "keep_fp", tuple(self.keep_fp) or None)
        trt = {k: v for k, v in (self.trt or {}).items() if v is not None}
        object.__setattr__(self, "trt", trt or None)

    @classmethod
    def of(cls, options: "BuildOptions | None" = None, **changes) -> "BuildOptions":
        """`options` (default: the defaults) with `changes`; an unknown name is one ExportError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ExportError(f"unknown build option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return dataclasses.replace(options or cls(), **changes)

    def check(self) -> "BuildOptions":
        """Every choice among its names and every number in range, else one ExportError naming the
        flag. Needs no checkpoint: what depends on the model is checked when it is opened."""
        _choice("--precision", self.precision, PRECISIONS)
        _choice("--backend", self.backend, BACKENDS)
        _choice("--mla", self.mla, MLA_FORMS)
        _choice("--moe", self.moe_form, MOE_FORMS)
        if not isinstance(self.stages, int) or isinstance(self.stages, bool) or self.stages < 1:
            raise ExportError(f"--stages must be a positive integer, got {self.stages!r}")
        if self.stages > 1 and self.mla != "absorbed":
            raise ExportError("--stages needs --mla absorbed (the stages pass cache buffers, graph contract v2)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ExportError(f"--seed must be an integer in 0..2**63-1, got {self.seed!r}")
        if self.trt and self.backend != "trt":
            raise ExportError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(self.trt))}: TensorRT options, "
                              "for --backend trt only")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["keep_fp"] = list(self.keep_fp) if self.keep_fp is not None else None
        out["trt"] = dict(self.trt) if self.trt else None
        return out
