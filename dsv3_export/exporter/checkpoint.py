"""Checkpoints: config plus lazy, name-mapped tensors read through safetensors' mmap.

Two layouts: Hugging Face (`config.json`, `model.safetensors` or shards with
`model.safetensors.index.json`, FP8 `weight_scale_inv`, MTP under `model.layers.{n_layers}.`) and
DeepSeek's converted one (`model{rank}-mp{n}.safetensors` with a ModelArgs JSON; model-parallel shards
are merged back on read). Tensors are read one at a time; nothing holds a whole file.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

import dsv3_export.exporter.names as names
from dsv3_export.core.config import ModelConfig, from_hf_dict, from_modelargs_dict
from dsv3_export.core.errors import CheckpointError, read_json_object
from dsv3_export.core.fp8 import dequantize_blocks

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_MP_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors$")
INDEX = "model.safetensors.index.json"
MODELARGS_FILES = ("config.json", "params.json", "model_args.json")  # DeepSeek layout: the first present
# safetensors dtype names: what a weight may be stored as (FP8 only together with its scale).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def _safe_open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- the path rule (docs/reliability.md, "Files a checkpoint may read") ----------------------------
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _allowed_roots(root: Path) -> list[Path]:
    """Where a checkpoint's files may resolve to: the directory itself and, for a Hugging Face cache
    snapshot (.../models--org--name/snapshots/<rev>/), the blobs/ folder of that same repo."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def safe_file(root: str | Path, name: str, *, referrer: str | Path | None = None,
              required: bool = True) -> Path | None:
    """`root / name` if reading it stays within the checkpoint, else one CheckpointError.

    `name` must be a relative path without `..`; what it resolves to (symlinks followed) must be a
    regular file inside `root`, or inside the Hugging Face cache blobs of the repo `root` is a
    snapshot of. Nothing is opened to decide (a FIFO is refused without blocking). `referrer`: the
    file that named it (an index), for the message. Missing: None unless `required`."""
    root = Path(root)
    where = f"{referrer}: entry {name!r}" if referrer is not None else f"{root / name}"
    rel = Path(name)
    if not name or rel.is_absolute() or rel.drive:
        raise CheckpointError(f"{where} is an absolute path; a checkpoint file must be named relative to {root}")
    if ".." in rel.parts:
        raise CheckpointError(f"{where} points outside the checkpoint directory {root} ('..')")
    path = root / rel
    if not os.path.lexists(path):
        if required:
            raise CheckpointError(f"{path}: missing" + (f" (named in {Path(referrer).name})" if referrer else ""))
        return None
    try:
        target = path.resolve(strict=True)
        mode = os.stat(target).st_mode
    except (OSError, RuntimeError) as e:  # a broken or looping symlink
        raise CheckpointError(f"{path}: cannot be resolved ({_one_line(e)}); a broken symlink?") from None
    if not any(r == target.parent or r in target.parents for r in _allowed_roots(root)):
        raise CheckpointError(f"{path}: resolves to {target}, outside the checkpoint directory {root.resolve()} "
                              "(and not in its Hugging Face cache blobs); refused")
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")
        raise CheckpointError(f"{path}: is {kind}, not a regular file; refused without opening it")
    return path


@dataclass
class _Source:
    """Where one canonical tensor lives: a file and its stored name, or mp shards to concatenate."""
    files: tuple[Path, ...]
    stored: str
    cat_dim: int | None = None
    transform: str | None = None  # "rope_interleave" permutes rows stored in HF's half-split layout


class Checkpoint:
    def __init__(self, path: Path, config: ModelConfig, sources: dict[str, _Source], layout: str,
                 handles: dict[Path, object] | None = None):
        self.path = path
        self.config = config
        self._sources = sources
        self.layout = layout
        self._handles: dict[Path, object] = dict(handles or {})
        self.hub: dict | None = None  # {"id", "revision", "commit"} when opened by Hugging Face id (exporter.hub)
        self._validate()

    def file(self, name: str, *, required: bool = True) -> Path | None:
        """A file of the checkpoint (tokenizer.json, tokenizer_config.json, config.json, ...) by its
        name relative to the checkpoint directory, under the path rule (`safe_file`): a regular file
        inside the checkpoint or its Hugging Face cache blobs, else one CheckpointError. Missing:
        None, or a CheckpointError when `required`."""
        return safe_file(self.path, name, required=required)

    # ---- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickle checkpoints are refused (they can run code); convert to safetensors")
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        files = [safe_file(path, f.name) for f in sorted(path.glob("*.safetensors"))]
        if not files:
            pickles = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CheckpointError(f"{pickles[0]}: pickle checkpoints are refused (they can run code); convert to safetensors")
            raise CheckpointError(f"{path}: no .safetensors files")
        if all(_MP_FILE.search(f.name) for f in files):
            return cls._open_deepseek(path, files)
        return cls._open_hf(path, files)

    @classmethod
    def _open_hf(cls, path: Path, files: list[Path]) -> "Checkpoint":
        cfg_path = safe_file(path, "config.json", required=False)
        if cfg_path is None:
            raise CheckpointError(f"{path}: no config.json")
        cfg = from_hf_dict(_read_json(cfg_path), str(cfg_path))
        index = safe_file(path, INDEX, required=False)
        handles: dict[Path, object] = {}
        if index is not None:
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: no weight_map (an object of tensor name -> shard file name)")
            shard_of = {f: safe_file(path, f, referrer=index) for f in sorted(set(weight_map.values()))}
            for f, shard in shard_of.items():
                handles[shard] = h = _safe_open(shard)
                held = set(h.keys())
                for k in (k for k, v in weight_map.items() if v == f):
                    if k not in held:
                        raise CheckpointError(f"{index}: maps tensor {k!r} to {f}, which does not hold it")
            stored = {k: shard_of[f] for k, f in weight_map.items()}
        else:
            stored = {}
            for f in files:
                handles[f] = h = _safe_open(f)
                for k in h.keys():
                    if k in stored:
                        raise CheckpointError(f"{f}: tensor {k!r} is also in {stored[k]}; without {INDEX} "
                                              "a tensor must be in one shard only")
                    stored[k] = f
        permute = not cfg.extra.get("rope_interleave", True)
        sources: dict[str, _Source] = {}
        for hf_name, f in stored.items():
            if hf_name.endswith(("rotary_emb.inv_freq",)):
                continue
            name = names.from_hf(hf_name)
            transform = None
            if permute and re.search(r"\.attn\.(wq|wq_b|wkv_a)\.(weight|scale)$", name):
                transform = "rope_interleave"
            sources[name] = _Source((f,), hf_name, transform=transform)
        return cls(path, cfg, sources, "hf", handles)

    @classmethod
    def _open_deepseek(cls, path: Path, files: list[Path]) -> "Checkpoint":
        ranks = {int(m.group(1)): int(m.group(2)) for f in files if (m := _MP_FILE.search(f.name))}
        world = set(ranks.values())
        if len(world) != 1 or sorted(ranks) != list(range(next(iter(world)))):
            raise CheckpointError(f"{path}: model{{rank}}-mp{{n}}.safetensors files do not form one complete set")
        n = next(iter(world))
        cfg_path = next((p for c in MODELARGS_FILES if (p := safe_file(path, c, required=False)) is not None), None)
        if cfg_path is None:
            raise CheckpointError(f"{path}: DeepSeek layout needs a ModelArgs JSON (config.json) beside the shards")
        raw = _read_json(cfg_path)
        cfg = from_hf_dict(raw, str(cfg_path)) if "model_type" in raw else from_modelargs_dict(raw, str(cfg_path))
        shard_files = [safe_file(path, f"model{r}-mp{n}.safetensors") for r in range(n)]
        handles = {f: _safe_open(f) for f in shard_files}
        per_rank = [set(handles[f].keys()) for f in shard_files]
        sources: dict[str, _Source] = {}
        for r, keys in enumerate(per_rank):
            for k in sorted(keys):
                if k in sources:
                    continue
                dim = names.mp_shard_dim(k)
                if n > 1 and dim is not None:
                    missing = [shard_files[q].name for q in range(n) if k not in per_rank[q]]
                    if missing:
                        raise CheckpointError(f"{path / missing[0]}: tensor {k!r} missing from this shard")
                    sources[k] = _Source(tuple(shard_files), k, cat_dim=dim)
                else:
                    sources[k] = _Source((shard_files[r],), k)
                # Every copy (replicated) or slice (split along `dim`) must agree with the first one.
                holders = [f for q, f in enumerate(shard_files) if k in per_rank[q]]
                first = tuple(handles[holders[0]].get_slice(k).get_shape())
                for f in holders[1:]:
                    got = tuple(handles[f].get_slice(k).get_shape())
                    same = len(got) == len(first) and all(a == b for i, (a, b) in enumerate(zip(got, first))
                                                          if i != (dim if n > 1 else None))
                    if not same:
                        along = f" except along dim {dim}" if dim is not None else ""
                        raise CheckpointError(f"{holders[0]} and {f}: tensor {k!r} has shape {list(first)} in one and "
                                              f"{list(got)} in the other (model-parallel shards must agree{along})")
        return cls(path, cfg, sources, f"deepseek-mp{n}", handles)

    # ---- access ---------------------------------------------------------------------------------
    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = _safe_open(f)
        return self._handles[f]

    def release(self) -> None:
        """Close every open file. Tensors already read stay valid; the mapped pages of the files go,
        so a long streaming read holds only what it is working on."""
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def names(self) -> list[str]:
        return list(self._sources)

    def file_of(self, name: str) -> Path:
        return self._sources[name].files[0]

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._sources[name]
        shapes = [tuple(self._handle(f).get_slice(src.stored).get_shape()) for f in src.files]
        if src.cat_dim is None:
            return shapes[0]
        out = list(shapes[0])
        out[src.cat_dim] = sum(s[src.cat_dim] for s in shapes)
        return tuple(out)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored (fp8 stays fp8), read from the mmap; a NaN or Inf in it is refused."""
        if name not in self._sources:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing")
        src = self._sources[name]
        try:
            parts = [self._handle(f).get_tensor(src.stored) for f in src.files]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{src.files[0]}: cannot read tensor {src.stored!r} ({_one_line(e)})") from None
        for f, part in zip(src.files, parts):
            check_finite(part, f"{f}: tensor {src.stored!r}")
        t = parts[0] if src.cat_dim is None else torch.cat(parts, src.cat_dim)
        if src.transform == "rope_interleave":
            t = _interleave_rope_rows(t, self.config, name)
        return t

    def is_fp8(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len("weight")] + "scale" in self._sources

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.get(name)
        if self.is_fp8(name):
            w = dequantize_blocks(w, self.get(name[: -len("weight")] + "scale"), self.block, dtype)
            return check_finite(w, f"{self.file_of(name)}: tensor {self._sources[name].stored!r} dequantized")
        return w.to(dtype)

    @property
    def block(self) -> tuple[int, int]:
        return self.config.fp8_block or (128, 128)

    @property
    def has_mtp(self) -> bool:
        return self.config.n_mtp_layers > 0 and f"layers.{self.config.n_layers}.eh_proj.weight" in self

    def stored_dtypes(self) -> dict[str, int]:
        """Count of tensors per stored dtype (for `inspect`)."""
        counts: dict[str, int] = {}
        for name, src in self._sources.items():
            dt = self._handle(src.files[0]).get_slice(src.stored).get_dtype()
            counts[dt] = counts.get(dt, 0) + 1
        return counts

    def fingerprint(self) -> str:
        """sha256 over every file of the checkpoint (config and weights), streamed in 16 MiB chunks."""
        h = hashlib.sha256()
        config = self.file("config.json", required=False)
        for f in sorted({f for s in self._sources.values() if s for f in s.files} | ({config} if config else set())):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(16 * 2**20):
                    h.update(chunk)
        return h.hexdigest()

    # ---- validation -----------------------------------------------------------------------------
    def _validate(self) -> None:
        cfg = self.config
        mtp_prefix = f"layers.{cfg.n_layers}."
        has_mtp_tensors = any(n.startswith(mtp_prefix) for n in self._sources)
        if has_mtp_tensors and cfg.n_mtp_layers == 0:
            self.config = cfg = cfg.replace(n_mtp_layers=1)
        expected = names.expected_shapes(cfg, mtp=has_mtp_tensors)
        if not has_mtp_tensors and cfg.n_mtp_layers:
            # Transformers drops the MTP layer when it saves; the model is still complete without it.
            self.config = cfg = cfg.replace(n_mtp_layers=0)
        if cfg.tie_word_embeddings and "head.weight" not in self._sources:
            self._sources["head.weight"] = self._sources.get("embed.weight")  # type: ignore[assignment]
        for name, shape in expected.items():
            if name not in self._sources or self._sources[name] is None:
                if names.optional(name):
                    continue
                raise CheckpointError(f"{self.path}: tensor {name!r} missing (required by the config)")
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(
                    f"{self.file_of(name)}: tensor {name!r} has shape {list(got)}, the config implies {list(shape)}")
            if self.is_fp8(name):
                bo, bi = self.block
                want = (math.ceil(shape[0] / bo), math.ceil(shape[1] / bi))
                sname = name[: -len("weight")] + "scale"
                if self.shape(sname) != want:
                    raise CheckpointError(f"{self.file_of(sname)}: scale {sname!r} has shape {list(self.shape(sname))}, "
                                          f"expected {list(want)} for {bo}x{bi} blocks")
        self._check_dtypes(expected)
        unknown = [n for n in self._sources if n not in expected
                   and not (n.endswith(".scale") and n[: -len("scale")] + "weight" in expected)]
        if unknown:
            stored = self._sources[unknown[0]].stored
            shown = repr(unknown[0]) if stored == unknown[0] else f"{stored!r} ({unknown[0]})"
            raise CheckpointError(f"{self.file_of(unknown[0])}: tensor {shown} is not part of the configured model "
                                  f"({len(unknown)} such tensors; does config.json match the weights?)")

    def _check_dtypes(self, expected: dict) -> None:
        """Every tensor of the model stored as a float: FP8 only as a 2-D weight with its block scale,
        a scale only beside an FP8 weight. Nothing is cast silently."""
        for name in expected:
            if self._sources.get(name) is None:
                continue
            src, dt = self._sources[name], self._dtype(name)
            where = f"{src.files[0]}: tensor {src.stored!r}"
            if dt in FP8_DTYPES:
                if len(expected[name]) != 2:
                    raise CheckpointError(f"{where} is stored as {dt}; only 2-D weights may be FP8")
                if not self.is_fp8(name):
                    raise CheckpointError(f"{where} is stored as FP8 ({dt}) but has no scale tensor "
                                          f"({names.to_hf(name)[: -len('weight')]}weight_scale_inv); refused, not cast")
            elif dt not in FLOAT_DTYPES:
                raise CheckpointError(f"{where} is stored as {dt}; a float weight ({', '.join(FLOAT_DTYPES)}, "
                                      "or FP8 with its scale) is expected; refused, not cast")
            elif self.is_fp8(name):
                sname = name[: -len("weight")] + "scale"
                raise CheckpointError(f"{self.file_of(sname)}: tensor {self._sources[sname].stored!r} is a scale "
                                      f"for {src.stored!r}, which is stored as {dt}, not FP8")
            if self.is_fp8(name):
                sname = name[: -len("weight")] + "scale"
                sdt = self._dtype(sname)
                if sdt not in FLOAT_DTYPES:
                    raise CheckpointError(f"{self.file_of(sname)}: tensor {self._sources[sname].stored!r} is stored "
                                          f"as {sdt}; a float scale is expected")

    def _dtype(self, name: str) -> str:
        src = self._sources[name]
        return self._handle(src.files[0]).get_slice(src.stored).get_dtype()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._sources:
            yield name, self.get(name)


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` if it holds no NaN or Inf (float and FP8 dtypes; others pass), else one CheckpointError
    naming `what` ("FILE: tensor NAME")."""
    if t.dtype == torch.float8_e4m3fn:  # no Inf; NaN is S.1111.111
        bad = (t.view(torch.uint8) & 0x7F) == 0x7F
    elif t.dtype == torch.float8_e5m2:  # exponent all ones: Inf or NaN
        bad = (t.view(torch.uint8) & 0x7C) == 0x7C
    elif t.is_floating_point():
        finite = torch.isfinite(t)
        if bool(finite.all()):
            return t
        bad = ~finite
    else:
        return t
    n = int(bad.sum())
    if n:
        raise CheckpointError(f"{what} holds {n} NaN or Inf value{'s' if n > 1 else ''} (of {t.numel()}); "
                              "the checkpoint is damaged")
    return t


def _read_json(path: Path) -> dict:
    return read_json_object(path, CheckpointError)


def _interleave_rope_rows(t: torch.Tensor, cfg: ModelConfig, name: str) -> torch.Tensor:
    """Rows of the rope part stored half-split (x_i, x_{i+d/2}) reordered to interleaved pairs."""
    dr = cfg.qk_rope_head_dim
    perm = torch.arange(dr).view(2, dr // 2).t().reshape(-1)  # 0, d/2, 1, d/2+1, ...
    if ".wkv_a." in name:
        idx = torch.cat([torch.arange(cfg.kv_lora_rank), cfg.kv_lora_rank + perm])
    else:
        head = torch.cat([torch.arange(cfg.qk_nope_head_dim), cfg.qk_nope_head_dim + perm])
        idx = torch.cat([h * cfg.qk_head_dim + head for h in range(cfg.n_heads)])
    if name.endswith(".scale"):
        raise CheckpointError(f"{name}: FP8 checkpoints with rope_interleave=false are not supported")
    return t[idx]
