"""Checkpoints: config plus lazy, name-mapped tensors read through safetensors' mmap.

Two layouts: Hugging Face (`config.json`, `model.safetensors` or shards with
`model.safetensors.index.json`, FP8 `weight_scale_inv`, MTP under `model.layers.{n_layers}.`) and
DeepSeek's converted one (`model{rank}-mp{n}.safetensors` with a ModelArgs JSON; model-parallel shards
are merged back on read). Tensors are read one at a time; nothing holds a whole file.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

import exporter.names as names
from core.config import ModelConfig, from_hf_dict, from_modelargs_dict
from core.errors import CheckpointError, read_json_object
from core.fp8 import dequantize_blocks

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_MP_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors$")


def _safe_open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


@dataclass
class _Source:
    """Where one canonical tensor lives: a file and its stored name, or mp shards to concatenate."""
    files: tuple[Path, ...]
    stored: str
    cat_dim: int | None = None
    transform: str | None = None  # "rope_interleave" permutes rows stored in HF's half-split layout


class Checkpoint:
    def __init__(self, path: Path, config: ModelConfig, sources: dict[str, _Source], layout: str):
        self.path = path
        self.config = config
        self._sources = sources
        self.layout = layout
        self._handles: dict[Path, object] = {}
        self._validate()

    # ---- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickle checkpoints are refused (they can run code); convert to safetensors")
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        files = sorted(path.glob("*.safetensors"))
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
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: no config.json")
        cfg = from_hf_dict(_read_json(cfg_path), str(cfg_path))
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            for f in sorted(set(weight_map.values())):
                if not (path / f).is_file():
                    raise CheckpointError(f"{path / f}: listed in {index.name} but missing")
            stored = {k: path / f for k, f in weight_map.items()}
        else:
            stored = {}
            for f in files:
                for k in _safe_open(f).keys():
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
        return cls(path, cfg, sources, "hf")

    @classmethod
    def _open_deepseek(cls, path: Path, files: list[Path]) -> "Checkpoint":
        ranks = {int(m.group(1)): int(m.group(2)) for f in files if (m := _MP_FILE.search(f.name))}
        world = set(ranks.values())
        if len(world) != 1 or sorted(ranks) != list(range(next(iter(world)))):
            raise CheckpointError(f"{path}: model{{rank}}-mp{{n}}.safetensors files do not form one complete set")
        n = next(iter(world))
        cfg_path = next((path / c for c in ("config.json", "params.json", "model_args.json") if (path / c).is_file()), None)
        if cfg_path is None:
            raise CheckpointError(f"{path}: DeepSeek layout needs a ModelArgs JSON (config.json) beside the shards")
        raw = _read_json(cfg_path)
        cfg = from_hf_dict(raw, str(cfg_path)) if "model_type" in raw else from_modelargs_dict(raw, str(cfg_path))
        shard_files = [path / f"model{r}-mp{n}.safetensors" for r in range(n)]
        per_rank = [set(_safe_open(f).keys()) for f in shard_files]
        sources: dict[str, _Source] = {}
        for r, keys in enumerate(per_rank):
            for k in keys:
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
        return cls(path, cfg, sources, f"deepseek-mp{n}")

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
        """One tensor, as stored (fp8 stays fp8), read from the mmap."""
        if name not in self._sources:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing")
        src = self._sources[name]
        try:
            parts = [self._handle(f).get_tensor(src.stored) for f in src.files]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{src.files[0]}: cannot read tensor {src.stored!r} ({e})") from None
        t = parts[0] if src.cat_dim is None else torch.cat(parts, src.cat_dim)
        if src.transform == "rope_interleave":
            t = _interleave_rope_rows(t, self.config, name)
        return t

    def is_fp8(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len("weight")] + "scale" in self._sources

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.get(name)
        if self.is_fp8(name):
            return dequantize_blocks(w, self.get(name[: -len("weight")] + "scale"), self.block, dtype)
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
        for f in sorted({f for s in self._sources.values() if s for f in s.files} | {self.path / "config.json"}):
            if not f.is_file():
                continue
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
            elif cfg.weight_dtype == "fp8" and names.is_quantizable(name) and "F8" in self._dtype(name):
                raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} has no scale tensor")
        unknown = [n for n in self._sources if n not in expected and not n.endswith(".scale")]
        if unknown:
            raise CheckpointError(f"{self.file_of(unknown[0])}: tensor {unknown[0]!r} is not part of the configured model "
                                  f"({len(unknown)} such tensors; does config.json match the weights?)")

    def _dtype(self, name: str) -> str:
        src = self._sources[name]
        return self._handle(src.files[0]).get_slice(src.stored).get_dtype()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._sources:
            yield name, self.get(name)


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
