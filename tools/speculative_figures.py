"""The MTP speculative-decoding figures of docs/speculative.md, measured on a build of the demo model.

    python tools/speculative_figures.py [BUILD_DIR] [--prompts 20] [--tokens 256] [--threads 1] [--json OUT]

BUILD_DIR defaults to a fresh `dsv3-export build demo` in a temporary directory. Prompts come from
the demo model's held-out files (never trained on): a few lines ending in a `def` line, so the model
continues a function. Reported, over all prompts: whether speculative greedy equals plain greedy
token for token, the MTP acceptance rate, mean tokens per main-graph step, decode tokens/s with and
without speculation (runs interleaved so machine load hits both alike) and their ratio; then the
same under sampling (temperature 0.8, top-p 0.95).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def heldout_prompts(n: int, context_lines: int = 3) -> list[str]:
    """Up to n prompts from the demo's held-out stdlib files, spread over the files: the
    `context_lines` lines before a `def` line and the line itself."""
    from dsv3_export.exporter import demo_path

    metrics = json.loads((demo_path() / "metrics.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    per_file: list[list[str]] = []
    for rel in metrics["data"]["heldout_file_names"]:
        f = stdlib / rel
        if not f.is_file():
            continue
        lines = f.read_text(errors="replace").splitlines(keepends=True)
        found = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and i >= context_lines]
        per_file.append(["".join(lines[i - context_lines:i + 1]) for i in found])
    prompts: list[str] = []
    k = 0
    while len(prompts) < n and any(k < len(p) for p in per_file):
        for p in per_file:
            if k < len(p) and len(prompts) < n:
                prompts.append(p[k])
        k += 1
    return prompts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir", nargs="?", default=None)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None, help="Write the figures here too.")
    args = ap.parse_args(argv)

    from dsv3_export import engines
    from dsv3_export.benchmarks.speculative import measure

    build_dir = args.build_dir
    if build_dir is None:
        import dsv3_export

        build_dir = dsv3_export.build("demo", Path(tempfile.mkdtemp()) / "demo-build", verify=False)
    engine = engines.load(build_dir, threads=args.threads)
    prompts = heldout_prompts(args.prompts)
    figures = {"build": str(build_dir), "threads": args.threads, "prompt_texts": prompts}
    figures["greedy"] = measure(engine, prompts, max_new_tokens=args.tokens, repeats=args.repeats)
    print(json.dumps({k: v for k, v in figures["greedy"].items()}, indent=1), flush=True)
    figures["sampling"] = measure(engine, prompts, max_new_tokens=args.tokens, temperature=0.8, top_p=0.95,
                                  repeats=args.repeats)
    print(json.dumps(figures["sampling"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
