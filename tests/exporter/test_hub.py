"""Checkpoints by Hugging Face id, from a cache laid out the way huggingface_hub lays it out
(models--ORG--NAME/{blobs,refs,snapshots}); the hub itself is not reachable from tests, so every
run here is offline (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3_export.exporter import hub
from tests.helpers import ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(cache: Path, repo_id: str, checkpoint: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """checkpoint's files as huggingface_hub keeps them: content-addressed blobs, a snapshot of
    relative symlinks per commit, refs/<ref> naming the commit."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(checkpoint.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (root / "blobs" / digest).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


def cli(args, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dsv3_export.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=900, cwd=cwd, env=env)


def test_is_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("deepseek-ai/DeepSeek-V2-Lite") and hub.is_hub_id("org/name.v2")
    assert not hub.is_hub_id("tiny") and not hub.is_hub_id("/abs/path") and not hub.is_hub_id("a/b/c")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_hub_id("org/name")  # a folder here wins


def test_build_and_inspect_by_id_offline_from_the_cache(tiny_ckpt, tmp_path):
    cache = tmp_path / "hub"
    snap = fake_cache(cache, "acme/tiny-v3", tiny_ckpt)
    r = cli(["inspect", "acme/tiny-v3", "--json"], cache, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["config"]["n_layers"] == 3
    r = cli(["build", "acme/tiny-v3", "-o", tmp_path / "out", "--no-verify", "--no-mtp"], cache, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["hub"] == {"id": "acme/tiny-v3", "revision": "main", "commit": COMMIT}
    assert manifest["source"]["path"] == str(snap.resolve())
    r = cli(["inspect", "acme/tiny-v3", "--plan", "2x80GB", "--json", "--revision", COMMIT], cache, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("args,needle", [
    (["inspect", "acme/absent"], "acme/absent: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                                 "on a machine that reaches the hub run `hf download acme/absent`"),
    (["build", "acme/tiny-v3", "--revision", "v9", "--no-verify"], "acme/tiny-v3@v9: not in the Hugging Face cache"),
    (["build", "tiny", "--revision", "v9", "--no-verify"], "--revision v9: for a Hugging Face id (ORG/NAME), not tiny"),
])
def test_an_id_that_is_not_there_is_one_line(tiny_ckpt, tmp_path, args, needle):
    cache = tmp_path / "hub"
    fake_cache(cache, "acme/tiny-v3", tiny_ckpt)
    r = cli([*args, *(["-o", tmp_path / "out"] if args[0] == "build" else [])], cache, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle.format(cache=cache) in last, r.stderr[-1000:]
    assert not (tmp_path / "out").exists()
