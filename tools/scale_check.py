"""Build a checkpoint at each precision and report peak memory, disk and time, as a Markdown table.

    python tools/scale_check.py [--source CKPT_OR_PRESET | --config CFG.json] [--precisions fp8,int4-wo]
                                [--work DIR] [--verify] [--run] [--keep] [--markdown FILE] [--json FILE]

Without --source it makes the checkpoint first (`make-checkpoint --config CFG --fp8 --dtype bf16`,
DeepSeek's format) from --config, by default DeepSeek-V3's width cut to 2 layers: 1 dense layer,
then 1 MoE layer of all 256 experts of 7168 x 2048, no MTP (~16 GB, 10-25 min on 2 cores). That
checkpoint is kept in --work for the next run (delete it when done); the builds are deleted after
they are measured unless --keep.

Each build runs `dsv3-export build` in a child process (`--no-verify` unless --verify). Measured:
- the child's peak RSS (its VmHWM, the kernel's high-water mark for that process, read while it runs);
- the peak disk it used, polled every 0.5 s from the filesystem's used bytes: its temporary files
  included;
- the build's bytes on disk, and their ratio to the checkpoint's bytes;
- with --run, `dsv3-export run BUILD --max-tokens 16` after it: its peak RSS and decode tok/s.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

V3_SLICE = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
            "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 2,
            "first_k_dense_replace": 1, "num_attention_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
            "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "scoring_func": "sigmoid",
            "routed_scaling_factor": 2.5, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 4096,
            "num_nextn_predict_layers": 0, "rope_theta": 10000, "rms_norm_eps": 1e-6, "norm_topk_prob": True,
            "topk_method": "noaux_tc", "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1}
CLI = [sys.executable, "-m", "dsv3_export.cli.main"]
GiB = 2**30


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _high_water(pid: int) -> int | None:
    """The process's own peak RSS so far (VmHWM), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) * 1024 if found else None


def measured(cmd: list[str], disk_of: Path) -> dict:
    """Run cmd; its exit status, wall seconds, peak RSS and the peak disk used on disk_of's
    filesystem beyond what was used when it started. The peak RSS is the child's VmHWM, read every
    0.1 s while it runs (a high-water mark: only its last 0.1 s can be missed). Not wait4's
    ru_maxrss: Linux starts that from the parent's peak when the child execs."""
    base = shutil.disk_usage(disk_of).used
    peak = {"disk": 0, "rss": 0}
    done = threading.Event()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def poll() -> None:
        while not done.wait(0.1):
            peak["disk"] = max(peak["disk"], shutil.disk_usage(disk_of).used - base)
            rss = _high_water(proc.pid)
            if rss is not None:
                peak["rss"] = max(peak["rss"], rss)

    watcher = threading.Thread(target=poll, daemon=True)
    started = time.monotonic()
    watcher.start()
    out = proc.stdout.read()
    proc.wait()
    proc.stdout.close()
    done.set()
    watcher.join()
    return {"rc": proc.returncode, "seconds": round(time.monotonic() - started, 1), "peak_rss": peak["rss"],
            "peak_disk": peak["disk"], "stdout": out}


def make_checkpoint(config: Path | None, work: Path) -> Path:
    ckpt = work / "checkpoint"
    if (ckpt / "config.json").is_file():
        log(f"using the checkpoint already in {ckpt}")
        return ckpt
    if config is None:
        config = work / "v3-slice.json"
        config.write_text(json.dumps(V3_SLICE, indent=1))
    log(f"making the checkpoint from {config} (--fp8 --dtype bf16) in {ckpt}")
    r = measured([*CLI, "make-checkpoint", "--config", str(config), "--fp8", "--dtype", "bf16", "-o", str(ckpt)], work)
    if r["rc"] != 0:
        raise SystemExit(f"error: make-checkpoint failed (exit {r['rc']}): {r['stdout'].strip().splitlines()[-1:]}")
    log(f"checkpoint: {folder_bytes(ckpt) / GiB:.2f} GiB in {r['seconds']} s, peak RSS {r['peak_rss'] / GiB:.2f} GiB")
    return ckpt


def check_one(source: str, precision: str, work: Path, verify: bool, run: bool, keep: bool, source_bytes: int) -> dict:
    out = work / f"build-{precision}"
    cmd = [*CLI, "build", source, "-o", str(out), "--precision", precision, "--force"] + ([] if verify else ["--no-verify"])
    log(f"building {precision}{' with verification' if verify else ''}")
    r = measured(cmd, work)
    row = {"precision": precision, "rc": r["rc"], "seconds": r["seconds"], "peak_rss": r["peak_rss"],
           "peak_disk": r["peak_disk"], "build_bytes": folder_bytes(out)}
    row["ratio"] = round(row["build_bytes"] / source_bytes, 3) if source_bytes and row["build_bytes"] else None
    if run and r["rc"] == 0:
        log(f"running {precision}")
        g = measured([*CLI, "run", str(out), "--prompt", "hello", "--max-tokens", "16", "--temperature", "0",
                      "--no-echo"], work)
        speed = re.search(r"decode ([0-9.]+) tokens/s", g["stdout"])
        row.update(run_rc=g["rc"], run_peak_rss=g["peak_rss"], decode_tok_s=float(speed.group(1)) if speed else None)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    log(f"{precision}: exit {row['rc']}, {row['seconds']} s, peak RSS {row['peak_rss'] / GiB:.2f} GiB")
    return row


def table(rows: list[dict], source: str, source_bytes: int) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB" if b else "—"  # noqa: E731
    lines = [f"Source: `{source}` ({gib(source_bytes)} on disk)", "",
             "| precision | exit | build time | peak RSS | peak disk used | build on disk | build / source |"
             + (" run: peak RSS | decode |" if any("run_rc" in r for r in rows) else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if any("run_rc" in r for r in rows) else "")]
    for r in rows:
        line = (f"| {r['precision']} | {r['rc']} | {r['seconds']} s | {gib(r['peak_rss'])} | {gib(r['peak_disk'])} | "
                f"{gib(r['build_bytes'])} | {r['ratio'] if r['ratio'] is not None else '—'} |")
        if "run_rc" in r:
            line += f" {gib(r['run_peak_rss'])} | {r['decode_tok_s'] or '—'} tok/s |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", help="a checkpoint directory or preset (default: make one from --config)")
    ap.add_argument("--config", type=Path, help="config.json of the checkpoint to make (default: V3's width, 2 layers)")
    ap.add_argument("--precisions", default="fp8,int4-wo,int8,int8-wo,fp32")
    ap.add_argument("--work", type=Path, help="where the checkpoint and the builds go (default: a new temporary folder)")
    ap.add_argument("--verify", action="store_true", help="build with verification")
    ap.add_argument("--run", action="store_true", help="run each build for 16 tokens after building it")
    ap.add_argument("--keep", action="store_true", help="keep the builds")
    ap.add_argument("--markdown", type=Path, help="write the table here too")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dsv3-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    source = args.source or str(make_checkpoint(args.config, work))
    source_bytes = folder_bytes(Path(source)) if Path(source).is_dir() else 0
    rows = [check_one(source, p.strip(), work, args.verify, args.run, args.keep, source_bytes)
            for p in args.precisions.split(",") if p.strip()]
    text = table(rows, source, source_bytes)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"source": source, "source_bytes": source_bytes, "rows": rows}, indent=1))
    if any(r["rc"] != 0 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
