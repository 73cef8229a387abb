"""Our ONNX Runtime engine against llama.cpp on the same weights and thread count, one run.

    python tools/llamacpp_compare.py CHECKPOINT BUILD [BUILD ...] --llama-cpp DIR [--threads 2] [--json FILE] [--markdown FILE]
    python tools/llamacpp_compare.py CHECKPOINT BUILD --llama-cpp DIR --batch 1,4,16 [--contexts 1024]

CHECKPOINT: the Hugging Face checkpoint BUILD was built from. DIR: a llama.cpp source tree with
`build/bin/llama-bench` built (`cmake -B build -DGGML_NATIVE=ON && cmake --build build --target
llama-bench`); its `convert_hf_to_gguf.py` turns the checkpoint into an F32 GGUF next to BUILD
(kept for the next run). llama.cpp runs DeepSeek-V3 as `deepseek2` with the same absorbed-MLA
latent cache we use, so the two run the same computation on the same weights.

Each build is set against the llama.cpp types of its precision (PAIRS: fp32 / F32, int8 and int8-wo
/ Q8_0, int4-wo / Q4_0 and Q4_K), made from the F32 GGUF by `build/bin/llama-quantize` (kept next
to it). llama.cpp has no FP8 type: an fp8 build gets no pair. `--markdown FILE` writes the one table
of every pair (docs/performance.md, "Against llama.cpp, every precision").

The GGUF is for speed only: llama.cpp refuses a BPE tokenizer whose pre-tokenizer it does not
know (our test checkpoints' tokenizers are not in its table), so the conversion records GPT-2's;
that changes how text would be split into tokens, not the model or its speed (llama-bench feeds
random tokens). Our figures come from `benchmarks.bench` (fresh process, warm-up, medians),
llama.cpp's from `llama-bench` (its mean over repeats, after its own warm-up); the two alternate for
`--rounds` rounds and the table shows each measurement's median over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Runs convert_hf_to_gguf.py with the pre-tokenizer check answered "gpt-2" (see the docstring).
_CONVERT = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root + "/gguf-py", root]
import conversion.base as base
for obj in vars(base).values():
    if isinstance(obj, type) and hasattr(obj, "get_vocab_base_pre"):
        obj.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(llama_cpp: Path, checkpoint: Path, out: Path) -> None:
    """CHECKPOINT -> F32 GGUF at `out` (written under a temporary name, renamed when complete)."""
    tmp = out.with_name(out.name + ".partial")
    cmd = [sys.executable, "-c", _CONVERT, str(llama_cpp), str(checkpoint), "--outtype", "f32", "--outfile", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{checkpoint}: llama.cpp's convert_hf_to_gguf.py failed: {last}")
    tmp.rename(out)


def llama_bench(binary: Path, gguf: Path, *, threads: int, prefill: list[int], contexts: list[int],
                repeats: int, decode_tokens: int) -> list[dict]:
    """llama-bench's JSON records: one prompt-processing run per prefill length, one generation run
    of `decode_tokens` tokens per context depth."""
    runs = [["-p", ",".join(map(str, prefill)), "-n", "0"],
            ["-p", "0", "-n", str(decode_tokens), "-d", ",".join(map(str, contexts))]]
    records = []
    for extra in runs:
        cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"{binary}: llama-bench failed: {last}")
        records += json.loads(done.stdout)
    return records


def llama_rows(records: list[dict]) -> dict[str, dict[int, dict]]:
    """llama-bench records -> {"prefill": {prompt tokens: figures}, "decode": {context: figures}},
    figures as benchmarks.bench reports them (tokens_per_s, min, max from the per-repeat samples)."""
    out: dict[str, dict[int, dict]] = {"prefill": {}, "decode": {}}
    for r in records:
        samples = r.get("samples_ts") or [r["avg_ts"]]
        figures = {"tokens_per_s": float(r["avg_ts"]), "std": float(r.get("stddev_ts", 0.0)),
                   "min": float(min(samples)), "max": float(max(samples)), "repeats": len(samples)}
        if r["n_gen"] == 0 and r["n_prompt"] > 0:
            out["prefill"][int(r["n_prompt"])] = figures
        elif r["n_gen"] > 0 and r["n_prompt"] == 0:
            out["decode"][int(r.get("n_depth", 0))] = figures
    return out


def median_over_rounds(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """Per measurement, the median tokens/s over rounds (and every round's figure): for llama-bench's
    rows; ours go through benchmarks.bench.merge_rounds like any `bench --rounds`."""
    out: dict[str, dict[int, dict]] = {"prefill": {}, "decode": {}}
    for phase in out:
        keys = set.intersection(*({int(k) for k in run[phase]} for run in runs))
        for n in sorted(keys):
            per_round = [next(v for k, v in run[phase].items() if int(k) == n)["tokens_per_s"] for run in runs]
            out[phase][n] = {"tokens_per_s": statistics.median(per_round), "rounds": per_round}
    return out


def compare(ours: dict, theirs: dict) -> list[dict]:
    """One row per measurement both sides have: ours, llama.cpp's, and ours / llama.cpp. Decode rows
    also get the memory bound of our engine's weights when bench measured it (an F32 GGUF holds the
    same float32 weights, so the same bound holds for llama.cpp) and each side's share of it."""
    rows = []
    bounds = {int(k): b["tokens_per_s"] for k, b in ours.get("memory_bound", {}).get("decode", {}).items()}
    for phase in ("prefill", "decode"):
        mine = {int(k): v for k, v in ours[phase].items()}  # benchmarks.bench keys are strings
        for n in sorted(set(mine) & set(theirs[phase])):
            a, b = mine[n], theirs[phase][n]
            row = {"phase": phase, "tokens": n, "ours": a["tokens_per_s"], "llama_cpp": b["tokens_per_s"],
                   "ratio": a["tokens_per_s"] / b["tokens_per_s"]}
            if phase == "decode" and n in bounds:
                row.update(bound=bounds[n], ours_reached=row["ours"] / bounds[n],
                           llama_cpp_reached=row["llama_cpp"] / bounds[n])
            rows.append(row)
    return rows


def _median_bound(runs: list[dict]) -> dict:
    """Each context's memory bound, the median over rounds (each round measured its own bandwidth)."""
    per_context: dict[str, list[float]] = {}
    for run in runs:
        for k, b in run.get("memory_bound", {}).get("decode", {}).items():
            per_context.setdefault(k, []).append(b["tokens_per_s"])
    return {"decode": {k: {"tokens_per_s": statistics.median(v)} for k, v in per_context.items()}}


# Our precision -> the llama.cpp types that store the same kind of weights (8-bit, 4-bit blocks).
PAIRS = {"fp32": ("f32",), "fp8": (), "int8": ("q8_0",), "int8-wo": ("q8_0",), "int4-wo": ("q4_0", "q4_K")}


def gguf_of(args, console) -> Path:
    """The F32 GGUF of the checkpoint (--gguf, or next to the first build), converted on first use."""
    gguf = args.gguf or args.builds[0].parent / f"{args.builds[0].name}.f32.gguf"
    if not gguf.is_file():
        with console.status(f"converting {args.checkpoint} to {gguf}"):
            convert(args.llama_cpp, args.checkpoint, gguf)
    return gguf


def quantized(llama_cpp: Path, f32: Path, kind: str, console) -> Path:
    """The F32 GGUF quantized to `kind` (q8_0, q4_0, q4_K) by llama-quantize, next to it, made once."""
    if kind == "f32":
        return f32
    out = f32.with_name(f32.name.replace(".f32.gguf", "") + f".{kind}.gguf")
    if out.is_file():
        return out
    binary = llama_cpp / "build" / "bin" / "llama-quantize"
    if not binary.is_file():
        raise SystemExit(f"{binary}: no such file (build the llama-quantize target for the {kind} pair)")
    tmp = out.with_name(out.name + ".partial")
    with console.status(f"quantizing {f32.name} to {kind.upper()}"):
        done = subprocess.run([str(binary), str(f32), str(tmp), kind.upper()], capture_output=True, text=True,
                              errors="replace")  # its log is not always UTF-8
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{binary}: llama-quantize failed: {last}")
    tmp.rename(out)
    return out


def markdown(rows: list[dict], threads: int, rounds: int) -> str:
    """The one table of every pair: ours, llama.cpp's and the ratio, per measurement."""
    lines = ["| ours | llama.cpp | measurement | ours tok/s | llama.cpp tok/s | ours / llama.cpp |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        what = f"prefill {r['tokens']}" if r["phase"] == "prefill" else f"decode @ {r['tokens']}"
        lines.append(f"| {r['precision']} | {r['gguf_type'].upper()} | {what} | {r['ours']:.1f} | "
                     f"{r['llama_cpp']:.1f} | {r['ratio']:.2f}× |")
    lines.append("")
    lines.append(f"{threads} threads, medians over {rounds} alternating rounds (tools/llamacpp_compare.py).")
    return "\n".join(lines) + "\n"


def batched_bench(binary: Path, gguf: Path, *, threads: int, batches: list[int], context: int,
                  decode_tokens: int) -> dict[int, float]:
    """llama-batched-bench: B sequences of `context` prompt tokens each, then `decode_tokens` tokens
    each decoded together; {B: aggregate generation tokens/s (its S_TG)}."""
    ctx = max(batches) * (context + decode_tokens) + 256
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(context), "-ntg", str(decode_tokens), "-npl", ",".join(map(str, batches)),
           "--output-format", "jsonl"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{binary}: llama-batched-bench failed: {last}")
    return parse_batched(done.stdout + "\n" + done.stderr)


def parse_batched(text: str) -> dict[int, float]:
    """{parallel sequences: aggregate generation tokens/s} from llama-batched-bench's JSON lines."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rec = json.loads(line)
            out[int(rec["pl"])] = float(rec["speed_tg"])
    return out


def main_batched(args, console) -> dict:
    """--batch: aggregate decode tokens/s at depth `--contexts`' first value, ours (benchmarks.batching)
    and llama.cpp's (llama-batched-bench), alternating for --rounds rounds, medians."""
    from rich.console import Console
    from rich.table import Table

    from dsv3_export.benchmarks.batching import bench_batches

    binary = args.llama_cpp / "build" / "bin" / "llama-batched-bench"
    if not binary.is_file():
        raise SystemExit(f"{binary}: no such file (build the llama-batched-bench target)")
    batches = [int(x) for x in args.batch.split(",")]
    context = int(args.contexts.split(",")[0])
    gguf = gguf_of(args, console)
    ours_runs, theirs_runs = [], []
    for r in range(args.rounds):
        with console.status(f"round {r + 1}/{args.rounds}: ONNX Runtime engine (benchmarks.batching)"):
            rep = bench_batches(str(args.build), batches, threads=args.threads, repeats=args.repeats,
                                contexts=[context], decode_steps=args.decode_tokens)
            ours_runs.append({b["batch"]: b["decode"][str(context)]["tokens_per_s"] for b in rep["batches"]})
        with console.status(f"round {r + 1}/{args.rounds}: llama.cpp (llama-batched-bench)"):
            theirs_runs.append(batched_bench(binary, gguf, threads=args.threads, batches=batches, context=context,
                                             decode_tokens=args.decode_tokens))
    rows = []
    for b in batches:
        ours = statistics.median(run[b] for run in ours_runs)
        theirs = statistics.median(run[b] for run in theirs_runs)
        rows.append({"batch": b, "context": context, "ours": ours, "llama_cpp": theirs, "ratio": ours / theirs,
                     "ours_rounds": [run[b] for run in ours_runs], "llama_cpp_rounds": [run[b] for run in theirs_runs]})
    table = Table(title=f"{args.build.name} vs llama.cpp F32, batched decode @ {context}, {args.threads} threads")
    for col in ("batch", "ours tok/s", "llama.cpp tok/s", "ours / llama.cpp", "ours vs B=1"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), f"{r['ours']:.1f}", f"{r['llama_cpp']:.1f}", f"{r['ratio']:.2f}×",
                      f"{r['ours'] / rows[0]['ours']:.2f}×")
    Console().print(table)
    report = {"threads": args.threads, "rounds": args.rounds, "context": context, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("builds", type=Path, nargs="+", metavar="build")
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin/llama-bench")
    ap.add_argument("--gguf", type=Path, default=None, help="The checkpoint's F32 GGUF (default: next to the first build)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="128,1024")
    ap.add_argument("--contexts", default="128,1024,4096")
    ap.add_argument("--repeats", type=int, default=3, help="Timed repeats per measurement in each round.")
    ap.add_argument("--rounds", type=int, default=3, help="Alternating rounds of the two (medians over rounds).")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="Write the table of every pair as Markdown")
    ap.add_argument("--batch", default=None,
                    help="Batch sizes (e.g. 1,4,16): batched decode against llama-batched-bench instead")
    args = ap.parse_args(argv)
    args.build = args.builds[0]
    if args.batch:
        from rich.console import Console

        return main_batched(args, Console(stderr=True))

    from rich.console import Console

    binary = args.llama_cpp / "build" / "bin" / "llama-bench"
    for path, what in ((binary, "llama-bench binary"), (args.llama_cpp / "convert_hf_to_gguf.py", "converter"),
                       (args.checkpoint / "config.json", "checkpoint config"),
                       *((b / "manifest.json", "build manifest") for b in args.builds)):
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (the {what})")
    console = Console(stderr=True)
    f32 = gguf_of(args, console)
    rows, runs = [], {}
    for build in args.builds:
        precision = json.loads((build / "manifest.json").read_text())["precision"]
        ggufs = {kind: quantized(args.llama_cpp, f32, kind, console) for kind in PAIRS.get(precision, ())}
        if not ggufs:
            console.print(f"{build}: llama.cpp has no {precision} type; no pair")
            continue
        report = compare_build(args, build, ggufs, binary, console)
        for kind, pair_rows in report["rows"].items():
            rows += [{**r, "build": str(build), "precision": precision, "gguf_type": kind} for r in pair_rows]
        runs[str(build)] = report
    print_rows(rows, args.threads)
    result = {"threads": args.threads, "rounds": args.rounds, "gguf": str(f32), "rows": rows, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(markdown(rows, args.threads, args.rounds))
    return result


def compare_build(args, build: Path, ggufs: dict[str, Path], binary: Path, console) -> dict:
    """One build against each of its GGUFs: all of them alternating for --rounds rounds (on a shared
    machine the speed drifts by tens of percent within minutes, and it must hit every side alike),
    each measurement's median over rounds."""
    from dsv3_export.benchmarks.bench import bench, merge_rounds

    prefill = [int(x) for x in args.prefill.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    ours_runs: list[dict] = []
    theirs_runs: dict[str, list[dict]] = {kind: [] for kind in ggufs}
    for r in range(args.rounds):
        with console.status(f"{build.name}, round {r + 1}/{args.rounds}: ONNX Runtime engine (benchmarks.bench)"):
            ours_runs.append(bench([build], threads=args.threads, repeats=args.repeats, prefill=prefill,
                                   contexts=contexts, reference=False)["results"][0])
        for kind, gguf in ggufs.items():
            with console.status(f"{build.name}, round {r + 1}/{args.rounds}: llama.cpp {kind.upper()} (llama-bench)"):
                theirs_runs[kind].append(llama_rows(llama_bench(binary, gguf, threads=args.threads, prefill=prefill,
                                                                contexts=contexts, repeats=args.repeats,
                                                                decode_tokens=args.decode_tokens)))
    ours = merge_rounds(ours_runs)
    ours["memory_bound"] = _median_bound(ours_runs)
    rows = {kind: compare(ours, median_over_rounds(t)) for kind, t in theirs_runs.items()}
    if "f32" not in rows:  # the bound holds for the same weights in the same format only
        for pair_rows in rows.values():
            for row in pair_rows:
                for key in ("bound", "ours_reached", "llama_cpp_reached"):
                    row.pop(key, None)
    return {"ours": ours, "rows": rows, "ours_runs": ours_runs, "llama_cpp_runs": theirs_runs}


def print_rows(rows: list[dict], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ours vs llama.cpp on the same weights, {threads} threads (tokens/s)")
    for col in ("ours", "llama.cpp", "measurement", "ours tok/s", "llama.cpp tok/s", "ours / llama.cpp",
                "memory bound (ours / llama.cpp reach)"):
        table.add_column(col, justify="right")
    for r in rows:
        what = f"prefill {r['tokens']}" if r["phase"] == "prefill" else f"decode @ {r['tokens']}"
        bound = f"{r['bound']:.1f} ({r['ours_reached']:.0%} / {r['llama_cpp_reached']:.0%})" if "bound" in r else "-"
        table.add_row(r["precision"], r["gguf_type"].upper(), what, f"{r['ours']:.1f}", f"{r['llama_cpp']:.1f}",
                      f"{r['ratio']:.2f}×", bound)
    Console().print(table)


if __name__ == "__main__":
    main()
