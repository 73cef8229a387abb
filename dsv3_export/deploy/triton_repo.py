"""A build as a Triton Inference Server model repository (docs/triton.md).

REPO/
  dsv3/                      decoupled python-backend model: text in, text out (deploy/triton_models/dsv3.py)
    config.pbtxt
    1/model.py  pipeline.json  tokenizer.json
  dsv3_stage0/ ...           one model per pipeline stage (core.build_dir.stage_graphs), called in order
    config.pbtxt
    1/model.py               --device cpu: python backend, ONNX Runtime on the build (deploy/triton_models/stage.py)
    1/model.onnx + data      --device gpu, ONNX Runtime build: backend onnxruntime, the raw graph cloned
    1/model.plan             --device gpu, TensorRT build: platform tensorrt_plan, the plan linked
  .dsv3-export-triton.json   the marker: what we wrote, so --force replaces only that

A CPU repository holds no weights (its stage models run the build in place). A GPU repository is
what is shipped to the GPU host: an ONNX Runtime stage's graph and external data are cloned into it
(copy-on-write where the filesystem can, a copy elsewhere), never hard-linked: ONNX Runtime refuses
an external data file with more than one link (a "hardlink attack"), so a link would break the
build itself as well as the repository. Plans and the tokenizer are hard links into the build
(symbolic links across filesystems). The build is never written to. REPO is written through a temporary sibling and renamed, so it is never
seen half-written; an existing REPO is replaced only with --force and only when it holds nothing but
what we wrote.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import _get_all_tensors, uses_external_data

from dsv3_export.core.build_dir import (
    TOKENIZER,
    Manifest,
    cache_layout,
    check_file_hashes,
    main_io,
    read_manifest,
    stage_graphs,
    takes_buffers,
)
from dsv3_export.core.errors import ExportError
from dsv3_export.deploy import model_config as mc
from dsv3_export.deploy.llm import INPUTS, PIPELINE_FILE, PIPELINE_FORMAT
from dsv3_export.engines.trt_profiles import PROFILES_FILE, plan_name

MARKER = ".dsv3-export-triton.json"
MARKER_FORMAT = 1
MODEL = "dsv3"  # the text model clients call
MODELS_DIR = Path(__file__).parent / "triton_models"
DEVICES = ("cpu", "gpu")


def stage_model_name(k: int) -> str:
    return f"{MODEL}_stage{k}"


# ---- checks ---------------------------------------------------------------------------------------
def _check_options(device: str, gpus: Sequence[int] | None, n_stages: int, instances: int) -> list[int]:
    """The GPU of each stage (empty for --device cpu), or one line on what is wrong."""
    if device not in DEVICES:
        raise ExportError(f"--device {device!r}: choose from {', '.join(DEVICES)}")
    if not isinstance(instances, int) or instances < 1:
        raise ExportError(f"--instances must be >= 1, got {instances!r}")
    if device == "cpu":
        if gpus:
            raise ExportError("--gpus applies to --device gpu only")
        return []
    gpus = list(range(n_stages)) if gpus is None else [int(g) for g in gpus]
    if any(g < 0 for g in gpus):
        raise ExportError(f"--gpus must list GPU indices >= 0, got {','.join(map(str, gpus))}")
    if len(gpus) != n_stages:
        raise ExportError(f"--gpus lists {len(gpus)} GPU(s) ({','.join(map(str, gpus))}) but the build has "
                          f"{n_stages} stage(s): give one GPU per stage")
    return gpus


def _check_build(build: Path, manifest: Manifest, check_files: bool) -> None:
    first = manifest.io[stage_graphs(manifest)[0]["file"]]
    if not takes_buffers(first):
        raise ExportError(f"{build}: this build's graphs take no cache buffers (an older build, or --mla naive); "
                          "rebuild it with dsv3-export build to serve it with Triton")
    if not (build / TOKENIZER).is_file():
        raise ExportError(f"{build}: this build has no tokenizer.json; the {MODEL} model takes text")
    if check_files:
        check_file_hashes(build, manifest)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_target(repo: Path, build: Path, force: bool) -> list[str] | None:
    """The paths of a repository we wrote at REPO (to remove once replaced), None when REPO is
    absent or empty; refuses anything else."""
    if _inside(repo.resolve(), build) or _inside(build, repo.resolve()):
        raise ExportError(f"{repo}: the repository and the build directory ({build}) must not contain each other")
    if not repo.exists() and not repo.is_symlink():
        return None
    if repo.is_symlink() or not repo.is_dir():
        raise ExportError(f"{repo}: exists and is not a directory")
    if not any(repo.iterdir()):
        return None
    marker = repo / MARKER
    if not marker.is_file():
        raise ExportError(f"{repo}: exists, is not empty and is not a Triton repository dsv3-export wrote; "
                          "choose another -o")
    if not force:
        raise ExportError(f"{repo}: exists; pass --force to replace it")
    try:
        ours = set(json.loads(marker.read_text())["paths"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{marker}: unreadable ({e}); remove {repo} yourself") from None
    cache = []
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if _bytecode_of_ours(rel, ours):
            cache.append(rel)
        elif rel != MARKER and rel not in ours:
            raise ExportError(f"{repo}: holds {rel}, which dsv3-export did not write; move it away or choose "
                              "another -o (--force replaces only what we wrote)")
    return sorted(ours) + cache


def _bytecode_of_ours(rel: str, ours: set[str]) -> bool:
    """`<model>/1/__pycache__/model.*.pyc` (and its folder): what Python wrote when Triton's stub
    imported a model.py we wrote."""
    parts = rel.split("/")
    if "__pycache__" not in parts:
        return False
    at = parts.index("__pycache__")
    folder = "/".join(parts[:at])
    if f"{folder}/model.py" not in ours:
        return False
    return at == len(parts) - 1 or (at == len(parts) - 2 and parts[-1].startswith("model.")
                                    and parts[-1].endswith(".pyc"))


# ---- files ----------------------------------------------------------------------------------------
def link(source: Path, target: Path) -> str:
    """target as a hard link to source ("hard"), or a symbolic link ("symbolic") where a hard link
    cannot be made (another filesystem, a filesystem without them). Never a copy."""
    try:
        os.link(source, target)
        return "hard"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    os.symlink(source.resolve(), target)
    return "symbolic"


FICLONE = 0x40049409  # Linux ioctl: make the target share the source's extents (a reflink)


def clone(source: Path, target: Path) -> str:
    """target as a copy-on-write clone of source ("reflink": no space is used until one changes) on
    filesystems that can (btrfs, XFS), else a plain copy ("copy")."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return "reflink"
        except OSError:
            pass
    shutil.copyfile(source, target)
    return "copy"


def external_files(graph: Path) -> list[str]:
    """The external data files a graph references (names relative to its folder)."""
    model = onnx.load(str(graph), load_external_data=False)
    names = set()
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            names.update(e.value for e in t.external_data if e.key == "location")
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ExportError(f"{graph}: external data {name!r} lies outside the graph's folder")
    return sorted(names)


# ---- the models -----------------------------------------------------------------------------------
def _stage_config(k: int, stage: dict, io: dict, device: str, gpus: list[int], backend: str, instances: int,
                  threads: int | None, build: Path) -> str:
    name = stage_model_name(k)
    inputs, outputs = mc.contract_tensors(io["inputs"]), mc.contract_tensors(io["outputs"])
    if device == "cpu":
        return mc.render(name, backend="python", inputs=inputs, outputs=outputs,
                         instances=mc.instance_group("KIND_CPU", count=instances),
                         parameters={"build_dir": str(build), "graph": stage["file"], "threads": str(threads or 0)})
    if backend == "trt":
        doc = json.loads((build / PROFILES_FILE).read_text()) if (build / PROFILES_FILE).is_file() else {}
        profiles = (doc.get("engines", {}).get(plan_name(stage["file"])) or {}).get("profiles") or []
        return mc.render(name, platform="tensorrt_plan", inputs=inputs, outputs=outputs,
                         instances=mc.instance_group("KIND_GPU", count=instances, gpus=[gpus[k]],
                                                     profiles=[str(i) for i in range(len(profiles))]))
    return mc.render(name, backend="onnxruntime", inputs=inputs, outputs=outputs,
                     instances=mc.instance_group("KIND_GPU", count=instances, gpus=[gpus[k]]))


def _stage_files(k: int, stage: dict, device: str, backend: str, build: Path, version: Path) -> dict[str, str]:
    """The stage's files in its version folder; {relative path: link kind}."""
    if device == "cpu":
        shutil.copyfile(MODELS_DIR / "stage.py", version / "model.py")
        return {"model.py": "copy"}
    if backend == "trt":
        plan = build / plan_name(stage["file"])
        if not plan.is_file():
            raise ExportError(f"{build}: this TensorRT build has no {plan.name}")
        return {"model.plan": link(plan, version / "model.plan")}
    # The exported graph: ONNX Runtime optimizes it for the GPU provider as it loads.
    graph = build / stage["file"]
    made = {"model.onnx": clone(graph, version / "model.onnx")}
    for data in external_files(graph):
        made[data] = clone(build / data, version / data)
    return made


def _text_model(manifest: Manifest, build: Path, stages: list[dict], max_batch: int) -> tuple[str, dict]:
    """The dsv3 model's config.pbtxt and pipeline.json."""
    inputs = [mc.tensor(name, kind, dims, optional) for name, kind, dims, optional in INPUTS]
    config = mc.render(MODEL, backend="python", inputs=inputs, outputs=[mc.tensor("text_output", "TYPE_STRING", [-1])],
                       instances=mc.instance_group("KIND_CPU", count=1), decoupled=True,
                       parameters={"build_dir": str(build), "max_batch": str(max_batch)})
    shape, dtype = cache_layout(main_io(manifest), int(manifest.config["kv_lora_rank"])
                                + int(manifest.config["qk_rope_head_dim"]))
    chain = []
    for k, st in enumerate(stages):
        io = manifest.io[st["file"]]
        chain.append({"model": stage_model_name(k), "layers": st["layers"], "first_input": io["inputs"][0]["name"],
                      "outputs": [o["name"] for o in io["outputs"]]})
    pipeline = {"format": PIPELINE_FORMAT, "build": str(build), "config": manifest.config,
                "cache": {"shape": list(shape), "dtype": dtype.name}, "stages": chain}
    return config, pipeline


def _write_models(tmp: Path, build: Path, manifest: Manifest, device: str, gpus: list[int], instances: int,
                  threads: int | None, max_batch: int) -> dict[str, Any]:
    stages = stage_graphs(manifest)
    backend = manifest.backend
    links: dict[str, str] = {}
    for k, stage in enumerate(stages):
        name = stage_model_name(k)
        version = tmp / name / "1"
        version.mkdir(parents=True)
        config = _stage_config(k, stage, manifest.io[stage["file"]], device, gpus, backend, instances, threads,
                               build)
        (tmp / name / "config.pbtxt").write_text(config)
        made = _stage_files(k, stage, device, backend, build, version)
        links.update({f"{name}/1/{rel}": kind for rel, kind in made.items()})
    config, pipeline = _text_model(manifest, build, stages, max_batch)
    version = tmp / MODEL / "1"
    version.mkdir(parents=True)
    (tmp / MODEL / "config.pbtxt").write_text(config)
    shutil.copyfile(MODELS_DIR / "dsv3.py", version / "model.py")
    (version / PIPELINE_FILE).write_text(json.dumps(pipeline, indent=2) + "\n")
    links[f"{MODEL}/1/{TOKENIZER}"] = link(build / TOKENIZER, version / TOKENIZER)
    return {"models": [MODEL] + [stage_model_name(k) for k in range(len(stages))], "links": links}


def _remove_ours(folder: Path, paths: list[str]) -> None:
    """Remove the listed paths under folder (deepest first; links are unlinked, never followed),
    then folder itself when nothing else is left in it."""
    for rel in sorted(paths + [MARKER], key=lambda p: (-p.count("/"), p)):
        path = folder / rel
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):  # not empty: something we did not write
                    path.rmdir()
            else:
                path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def write_repository(build_dir: str | Path, repo: str | Path, *, device: str = "cpu",
                     gpus: Sequence[int] | None = None, instances: int = 1, threads: int | None = None,
                     max_batch: int = 8, force: bool = False, check_files: bool = True) -> dict[str, Any]:
    """Write REPO for BUILD (module docstring). device "cpu": python-backend stage models on ONNX
    Runtime (`instances` instances each, `threads` intra-op threads); "gpu": onnxruntime or
    tensorrt_plan stage models, stage k pinned to gpus[k] (default 0..N-1). `max_batch`: sequences
    the dsv3 model decodes at once. Returns what was written (models, links, the marker's record)."""
    build, repo = Path(build_dir).resolve(), Path(repo).absolute()
    manifest = read_manifest(build)
    stages = stage_graphs(manifest)
    gpus = _check_options(device, gpus, len(stages), instances)
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {max_batch!r}")
    _check_build(build, manifest, check_files)
    old = _check_target(repo, build, force)
    repo.parent.mkdir(parents=True, exist_ok=True)
    tmp = repo.parent / f".{repo.name}.tmp-{os.getpid()}"
    if tmp.exists():
        raise ExportError(f"{tmp}: exists (left by an interrupted run of this process id?); remove it")
    tmp.mkdir()
    try:
        written = _write_models(tmp, build, manifest, device, gpus, instances, threads, max_batch)
        paths = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*"))
        record = {"format": MARKER_FORMAT, "build": str(build), "device": device, "gpus": gpus,
                  "stages": len(stages), "backend": manifest.backend, "paths": paths}
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if old is None:
            os.replace(tmp, repo)  # onto nothing, or onto an empty directory
        else:
            aside = repo.parent / f".{repo.name}.old-{os.getpid()}"
            os.rename(repo, aside)
            try:
                os.rename(tmp, repo)
            except BaseException:
                os.rename(aside, repo)  # the old repository back where it was
                raise
            _remove_ours(aside, old)
    except BaseException:
        _remove_ours(tmp, [p.relative_to(tmp).as_posix() for p in tmp.rglob("*")] if tmp.exists() else [])
        raise
    return {**written, "repo": str(repo), **record}
