"""`bench`: prefill and decode speed of built engines against the PyTorch reference, in one run.

Each system (an engine build, or the reference on the same weights) is measured in a fresh
process, one after another, with the same thread count: peak memory is then that system's own,
and nothing one leaves behind (caches, arenas) helps the next. Warm-up first, then medians over
repeats, min and max kept. Decode at context c starts from a random latent cache of c rows (decode
cost does not depend on the cache's values; an engine of graph contract v2 holds it in buffers
written in place, as the scheduler does) and runs a chain of single-token steps, a different
random token each step (an MoE step's cost depends on the experts its token routes to). With
`rounds` > 1 the whole sequence of systems runs that many times, alternating, and each figure is the
median over rounds (each round's figure kept): on a shared machine speed drifts within minutes, and
alternating makes the drift hit every system alike.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from dsv3_export.benchmarks.memory_bound import decode_bound, main_step_bytes, read_bandwidth
from dsv3_export.benchmarks.speculative import measure as measure_speculative
from dsv3_export.core.build_dir import Manifest, cache_layout, main_io, read_manifest, stage_graphs
from dsv3_export.core.errors import ExportError

PREFILL = (128, 1024)
CONTEXTS = (128, 1024, 4096)


def rate_stats(samples: list[float], tokens: int) -> dict[str, float]:
    """tokens/s from seconds per call: median, and the worst and best call."""
    return {"tokens_per_s": tokens / statistics.median(samples), "min": tokens / max(samples),
            "max": tokens / min(samples), "repeats": len(samples)}


def time_calls(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def evict_from_page_cache(build_dir: str | Path) -> None:
    """Ask the kernel to drop the build's files from the page cache (POSIX_FADV_DONTNEED), so the
    next load reads them from disk, as the first load after a reboot does. Advice only: pages
    another process maps stay."""
    for f in Path(build_dir).iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def session_start(build_dir: str, threads: int) -> dict[str, float]:
    """Seconds from nothing to a ready engine (sessions open, files' hashes not checked): cold, the
    build's files evicted from the page cache first, then warm, right after."""
    from dsv3_export import engines
    out = {}
    for label in ("cold_seconds", "warm_seconds"):
        if label == "cold_seconds":
            evict_from_page_cache(build_dir)
        t0 = time.perf_counter()
        engine = engines.load(build_dir, threads=threads, check_files=False)
        out[label] = round(time.perf_counter() - t0, 3)
        del engine
    return out


def _measure(kind: str, build_dir: str, params: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: measure one system and return its figures."""
    threads = params["threads"]
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    manifest = read_manifest(build_dir)
    cfg = manifest.config
    width, _ = cache_layout(main_io(manifest), 0)
    rng = np.random.default_rng(0)
    started = time.time()
    if kind == "engine":
        from dsv3_export import engines
        from dsv3_export.engines.runtime import prefix_in_buffer

        engine = engines.load(build_dir, threads=threads)

        def forward(ids, past):
            return engine.forward(ids, past)[2]

        def empty(c):
            return [(0.5 * rng.standard_normal((1, c, *width))).astype(np.float32) for _ in range(cfg["n_layers"])]

        def as_ids(a):
            return a
    else:
        import torch

        from dsv3_export.exporter.source import load_reference

        torch.set_num_threads(threads)
        src = manifest.source
        spec = src["name"] if src["kind"] == "preset" else src["path"]
        model = load_reference(spec, mla=manifest.mla, seed=src.get("seed", 0), mtp=False)

        def forward(ids, past):
            with torch.no_grad():
                return model(ids, past).past

        def empty(c):
            return [torch.from_numpy((0.5 * rng.standard_normal((1, c, *width))).astype(np.float32))
                    for _ in range(cfg["n_layers"])]

        def as_ids(a):
            return torch.from_numpy(a)
    load_seconds = time.time() - started
    out: dict[str, Any] = {"kind": kind, "build": build_dir, "load_seconds": round(load_seconds, 2),
                           "prefill": {}, "decode": {}, "skipped": {}}
    for n in params["prefill"]:
        if n > cfg["max_seq_len"]:
            out["skipped"][f"prefill {n}"] = f"longer than the model's context (max_seq_len {cfg['max_seq_len']})"
            continue
        ids = as_ids(rng.integers(0, cfg["vocab_size"], (1, n)))
        out["prefill"][str(n)] = rate_stats(time_calls(lambda: forward(ids, empty(0)), params["repeats"]), n)
    steps = params["decode_steps"]
    for c in params["contexts"]:
        if c + steps > cfg["max_seq_len"]:
            out["skipped"][f"decode {c}"] = (f"context + {steps} steps exceeds the model's context "
                                             f"(max_seq_len {cfg['max_seq_len']})")
            continue
        start = empty(c)
        # A different token each step: an MoE step's cost depends on which experts it routes to.
        toks = [as_ids(t) for t in rng.integers(0, cfg["vocab_size"], (steps, 1, 1))]

        if kind == "engine" and engine.buffered:  # graph contract v2: the buffers written in place
            buffers = [prefix_in_buffer(rows, steps)[0] for rows in start]

            def chain():
                for k, tok in enumerate(toks):
                    engine.step_in_place(tok, np.full(1, c + k, np.int64), buffers)
        else:
            def chain():
                past = start
                for tok in toks:
                    past = forward(tok, past)

        out["decode"][str(c)] = rate_stats(time_calls(chain, params["repeats"]), steps)
        out["decode"][str(c)]["cache_bytes"] = cfg["n_layers"] * c * int(np.prod(width)) * 4
    if kind == "engine" and params.get("speculative") and (Path(build_dir) / "mtp.onnx").is_file():
        out["speculative"] = _speculative(engine, cfg, params)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _speculative(engine, cfg, params) -> dict[str, Any]:
    """Greedy generation with and without MTP speculation on one random prompt (benchmarks.speculative),
    as bench reports it: median decode tokens/s of each, the speedup, acceptance and tokens per step."""
    prompt = np.random.default_rng(1).integers(2, cfg["vocab_size"], 16).tolist()
    m = measure_speculative(engine, [prompt], max_new_tokens=params["speculative_tokens"], repeats=params["repeats"])
    plain, spec = m["plain"]["median_tokens_per_s"], m["speculative"]["median_tokens_per_s"]
    return {"plain": {"tokens_per_s": plain},
            "speculative": {"tokens_per_s": spec, "acceptance_rate": m["acceptance_rate"],
                            "tokens_per_step": m["tokens_per_step"]},
            "speedup": spec / plain}


def _disk(build_dir: Path, manifest: Manifest) -> dict[str, int]:
    files = manifest.files
    main_stems = tuple(Path(s["file"]).stem for s in stage_graphs(manifest))  # model, or stage0, stage1, ...
    engine_files = [f for f in files if f.startswith(tuple(f"{m}.ort." for m in (*main_stems, "mtp")))
                    or f.endswith((".plan",))]
    if not engine_files:
        engine_files = [f for f in files if f.startswith(tuple(f"{m}.onnx" for m in (*main_stems, "mtp")))]
    main = [f for f in engine_files if f.startswith(main_stems)]
    return {"build_bytes": sum(f["bytes"] for f in files.values()),
            "engine_bytes": sum(files[f]["bytes"] for f in engine_files),
            "main_graph_bytes": sum(files[f]["bytes"] for f in main)}


def in_child(fn, *args):
    """fn(*args) in a fresh process: its memory and threads are its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench(builds: list[str | Path], *, threads: int = 2, repeats: int = 5, prefill=PREFILL, contexts=CONTEXTS,
          decode_steps: int = 8, reference: bool = True, speculative: bool = False,
          speculative_tokens: int = 64, rounds: int = 1, bandwidth_megabytes: int = 256,
          progress=None) -> dict[str, Any]:
    """Measure every build (and the reference of the first) in fresh processes, `rounds` times
    alternating, and the machine's read bandwidth at the start of each round; returns the figures,
    with each engine's decode set against the memory bound of its weights (exporter/memory_bound.py)."""
    if rounds < 1:
        raise ExportError(f"--rounds must be at least 1, got {rounds}")
    builds = [Path(b) for b in builds]
    manifests = []
    for b in builds:
        manifests.append(read_manifest(b))
    params = dict(threads=threads, repeats=repeats, prefill=list(prefill), contexts=list(contexts),
                  decode_steps=decode_steps, speculative=speculative, speculative_tokens=speculative_tokens,
                  rounds=rounds)
    jobs = [("engine", str(b)) for b in builds] + ([("reference", str(builds[0]))] if reference else [])
    runs: list[list[dict]] = [[] for _ in jobs]
    bandwidths = []
    loads = [os.getloadavg()[0]]  # sampled around every measurement: a machine busy with other work
    for r in range(rounds):
        if progress:
            progress("read bandwidth" + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""))
        bandwidths.append(in_child(read_bandwidth, threads, bandwidth_megabytes))
        for j, (kind, b) in enumerate(jobs):
            if progress:
                progress(f"{kind}: {b}" + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""))
            runs[j].append(in_child(_measure, kind, b, params))
            if kind == "engine":  # in a process of its own: its loads do not count in the peak RSS
                runs[j][-1]["session_start"] = in_child(session_start, b, threads)
            loads.append(os.getloadavg()[0])
    results = [merge_rounds(system_runs) for system_runs in runs]
    bandwidth = statistics.median(bandwidths)
    for r, b, m in zip(results, builds, manifests):
        r.update(_disk(b, m), precision=m.precision, mla=m.mla, lowered=m.lowered)
        if not all((b / s["file"]).is_file() for s in stage_graphs(m)):
            continue
        weights = main_step_bytes(b, m)
        measured = {c: f["tokens_per_s"] for c, f in r["decode"].items()}
        r["memory_bound"] = {"weights": weights, "decode": decode_bound(
            weights, {c: f["cache_bytes"] for c, f in r["decode"].items()}, bandwidth, measured)}
        if reference:  # the most any runtime of these weights could be against the reference, this run
            for c, bound in r["memory_bound"]["decode"].items():
                ref = results[-1]["decode"].get(c)
                bound["vs_reference"] = bound["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    machine = {"cpus": os.cpu_count(), "threads": threads, "read_bandwidth_bytes_per_s": bandwidth,
               "read_bandwidth_rounds": bandwidths, "load_average_max": round(max(loads), 2)}
    report = {"machine": machine, "params": params, "results": results, "ratios": _ratios(results, reference)}
    return report


def merge_rounds(runs: list[dict]) -> dict[str, Any]:
    """One system's figures from several rounds: each prefill/decode figure's tokens/s is the median
    of the rounds' medians (listed in "rounds"), min/max over all calls, peak RSS the largest."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for phase in ("prefill", "decode"):
        out[phase] = {}
        for key in runs[0][phase]:
            figures = [run[phase][key] for run in runs if key in run[phase]]
            per_round = [f["tokens_per_s"] for f in figures]
            out[phase][key] = {**figures[0], "tokens_per_s": statistics.median(per_round),
                               "min": min(f["min"] for f in figures), "max": max(f["max"] for f in figures),
                               "repeats": sum(f["repeats"] for f in figures), "rounds": per_round}
    out["peak_rss_bytes"] = max(run["peak_rss_bytes"] for run in runs)
    out["load_seconds"] = statistics.median(run["load_seconds"] for run in runs)
    if "session_start" in runs[0]:
        out["session_start"] = {k: statistics.median(run["session_start"][k] for run in runs)
                                for k in runs[0]["session_start"]}
    specs = [run["speculative"] for run in runs if "speculative" in run]
    if specs:
        spec = {mode: {**specs[0][mode], "tokens_per_s": statistics.median(s[mode]["tokens_per_s"] for s in specs)}
                for mode in ("plain", "speculative")}
        spec["speedup"] = spec["speculative"]["tokens_per_s"] / spec["plain"]["tokens_per_s"]
        out["speculative"] = spec
    return out


def _ratios(results: list[dict], reference: bool) -> dict[str, Any]:
    """engine / reference for each build, and each build / the first build."""
    def divide(a: dict, b: dict) -> dict:
        return {phase: {k: a[phase][k]["tokens_per_s"] / b[phase][k]["tokens_per_s"]
                        for k in a[phase] if k in b[phase]} for phase in ("prefill", "decode")}

    engines = [r for r in results if r["kind"] == "engine"]
    out: dict[str, Any] = {}
    if reference:
        ref = results[-1]
        out["vs_reference"] = {r["build"]: divide(r, ref) for r in engines}
    if len(engines) > 1:
        out["vs_first_build"] = {r["build"]: divide(r, engines[0]) for r in engines[1:]}
    return out
