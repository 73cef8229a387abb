"""Will it fit? What a build and its verification need of this machine, estimated from the config
alone, and checked before anything large is loaded or written: one line with both figures and what
would fit, instead of an allocation failure or a full disk an hour in."""

from __future__ import annotations

import shutil
from pathlib import Path

from dsv3_export.core.config import ModelConfig
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.describe import human_bytes, parameter_counts
from dsv3_export.exporter.stage_plan import model_bytes

REFERENCE_MARGIN = 2 << 30  # activations, the tokenizer, the engine being compared: beyond the fp32 weights
# The disk a build holds at its peak, per byte of stored weights: the weights once (the engine step
# writes nothing, engines/ort.py), plus the graphs, the tokenizer and the report.
BUILD_DISK_FACTOR = 1.1


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (MemAvailable), None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_disk(folder: Path) -> int:
    """Free bytes on the filesystem that will hold `folder` (its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def reference_bytes(cfg: ModelConfig) -> int:
    """The fp32 PyTorch reference verification loads: every parameter (MTP included) in 4 bytes."""
    counts = parameter_counts(cfg)
    return (counts["total"] + counts["mtp"]) * 4 + REFERENCE_MARGIN


def build_bytes(cfg: ModelConfig, precision: str, keep_fp=None, mtp: bool = True) -> int:
    return int(model_bytes(cfg, precision, keep_fp, mtp=mtp) * BUILD_DISK_FACTOR)


def check_reference_fits(cfg: ModelConfig, what: str = "verify") -> None:
    need, have = reference_bytes(cfg), available_memory()
    if have is not None and need > have:
        raise ExportError(f"{what} needs about {human_bytes(need)} of memory for the fp32 PyTorch reference of this "
                          f"model; this machine has {human_bytes(have)} available: build with --no-verify, and "
                          "verify on a machine with more memory")


def check_build_fits(cfg: ModelConfig, out: Path, precision: str, keep_fp=None, mtp: bool = True) -> None:
    need, have = build_bytes(cfg, precision, keep_fp, mtp), free_disk(out)
    if need > have:
        smallest = build_bytes(cfg, "int4-wo", None, mtp)
        hint = f"; --precision int4-wo needs about {human_bytes(smallest)}" if precision != "int4-wo" else ""
        raise ExportError(f"{out}: the {precision} build needs about {human_bytes(need)} of disk, the filesystem has "
                          f"{human_bytes(have)} free: free some space, or build elsewhere{hint}")
