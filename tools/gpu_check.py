"""GPU check of the dsv3 plugin kernels: tests on the device, timings at the 671B shapes.

Run through tools/gpu_check.sh (docs/gpu.md explains the output). Needs a CUDA
GPU with PyTorch and Triton; TensorRT is optional. Prints one line per
measurement and, at the end, everything as one JSON object (also written to
--json). Timings are medians of CUDA-event intervals. Each section is guarded:
a failure is recorded in the JSON and the next section runs.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dsv3_export.core.fp8 import dequantize_blocks, quantize_blocks  # noqa: E402  (after the path insert)

RESULT: dict = {}
START = time.monotonic()
DEV = "cuda"
# The 671B shapes; --smoke swaps in tiny ones and runs on the CPU interpreter
# (checks this script itself, measures nothing meaningful).
SHAPES = dict(la=(64, 1, 4096, 128, 512, 64), prefill=4096, moe=(7168, 2048, 256, 8), decode_tokens=64,
              copy_bytes=2 * 2**30, matmul=8192)
SMOKE_SHAPES = dict(la=(2, 1, 40, 4, 32, 8), prefill=24, moe=(64, 32, 6, 2), decode_tokens=4,
                    copy_bytes=2**20, matmul=64)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def cuda_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() between CUDA events."""
    if DEV == "cpu":  # --smoke
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rates(ms: float, nbytes: float, flops: float) -> dict:
    base = RESULT.get("device", {})
    out = dict(ms=round(ms, 4), GBps=round(nbytes / ms / 1e6, 1), TFLOPs=round(flops / ms / 1e9, 2))
    if base.get("copy_GBps"):
        out["pct_of_copy_bw"] = round(100 * out["GBps"] / base["copy_GBps"], 1)
    if base.get("bf16_matmul_TFLOPs"):
        out["pct_of_matmul"] = round(100 * out["TFLOPs"] / base["bf16_matmul_TFLOPs"], 1)
    return out


def show(name: str, r: dict) -> None:
    extra = "".join(f", {k}={v}" for k, v in r.items() if k not in ("ms", "GBps", "TFLOPs", "shape"))
    log(f"{name}: {r['ms']:.3f} ms, {r['GBps']:.0f} GB/s, {r['TFLOPs']:.1f} TFLOP/s{extra}")


def section(name: str):
    """Decorator: run, store the return value or the error under RESULT[name]."""
    def wrap(fn):
        def run(*a, **kw):
            t0 = time.monotonic()
            try:
                RESULT[name] = fn(*a, **kw)
            except Exception as err:  # keep going: the JSON says what failed
                RESULT[name] = dict(error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-3000:])
                log(f"{name} FAILED: {type(err).__name__}: {err}")
            finally:
                if DEV == "cuda":
                    torch.cuda.empty_cache()
            if isinstance(RESULT[name], dict):
                RESULT[name]["seconds"] = round(time.monotonic() - t0, 1)
        return run
    return wrap


# ---------------------------------------------------------------- sections

@section("env")
def env_info() -> dict:
    import triton

    info = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__)
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", memory_GiB=round(props.total_memory / 2**30, 1))
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    log(f"{info}")
    return info


@section("tests")
def run_tests(timeout: float, examples: int, files: list | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DSV3_HYPOTHESIS_EXAMPLES"] = str(examples)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    files = files or ["tests/plugins/latent_attention/test_triton.py", "tests/plugins/moe_dispatch/test_triton.py",
                      "tests/plugins/test_tensorrt_registration.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "slow or not slow", *files]
    log(f"running {' '.join(cmd[3:])} (timeout {timeout:.0f}s)")
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return dict(rc=None, summary=f"timed out after {timeout:.0f}s", tail=str(err.stdout or "")[-3000:])
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    log(f"tests: {summary}")
    tail = "\n".join(lines[-40:]) if done.returncode else ""
    return dict(rc=done.returncode, summary=summary, tail=tail)


@section("device")
def device_baselines() -> dict:
    n = SHAPES["copy_bytes"]

    def copy_time():
        src = torch.empty(n, dtype=torch.uint8, device=DEV)
        dst = torch.empty_like(src)
        return cuda_ms(lambda: dst.copy_(src), iters=10)

    copy_ms = copy_time()
    m = SHAPES["matmul"]
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    mm_ms = cuda_ms(lambda: torch.matmul(a, b), iters=10)
    out = dict(copy_GBps=round(2 * n / copy_ms / 1e6, 1), bf16_matmul_TFLOPs=round(2 * m**3 / mm_ms / 1e9, 1),
               copy_bytes=n, matmul_shape=[m, m, m])
    log(f"device: copy {out['copy_GBps']} GB/s (read + write of {n / 2**30:g} GiB), bf16 matmul "
        f"{out['bf16_matmul_TFLOPs']} TFLOP/s ({m}^3)")
    return out


@section("latent_attention")
def bench_latent_attention(budget: float) -> dict:
    from dsv3_export.plugins.latent_attention import triton as la
    from dsv3_export.plugins.latent_attention.reference import latent_attention as reference

    b, s, t, h, r, dr = SHAPES["la"]
    c = r + dr
    scale = 1 / math.sqrt(192)
    q = (torch.randn(b, s, h, c, device=DEV) * 0.3).to(torch.bfloat16)
    latent = torch.randn(b, t, c, device=DEV).to(torch.bfloat16)
    nbytes = (latent.numel() + q.numel() + b * s * h * r) * 2
    flops = 2 * b * s * h * t * (c + r)
    res = dict(shape=dict(B=b, S=s, T=t, H=h, C=c, r=r, dtype="bf16"))

    got = la.latent_attention(q, latent, scale, r)
    want = reference(q[:8].float(), latent[:8].float(), scale, r)
    res["max_abs_err_vs_reference_first8"] = float((got[:8].float() - want).abs().max())
    res["decode"] = rates(cuda_ms(lambda: la.latent_attention(q, latent, scale, r)), nbytes, flops)
    show("LatentAttention decode (split-K + combine, default)", res["decode"])
    res["decode_single_launch"] = rates(cuda_ms(lambda: la.latent_attention(q, latent, scale, r, num_splits=1)),
                                        nbytes, flops)
    show("LatentAttention decode, one launch (the AOT plugin's form)", res["decode_single_launch"])

    sweep = []
    for cfg in (dict(BLOCK_M=16, BLOCK_T=32, num_warps=4), dict(BLOCK_M=32, BLOCK_T=32, num_warps=8),
                dict(BLOCK_M=32, BLOCK_T=64, num_warps=8), dict(BLOCK_M=64, BLOCK_T=32, num_warps=8),
                dict(BLOCK_M=64, BLOCK_T=16, num_warps=8)):
        if left(budget) < 60:
            break
        try:
            ms = cuda_ms(lambda: la.latent_attention(q, latent, scale, r, config=cfg), iters=10)
            sweep.append(dict(config=cfg, **rates(ms, nbytes, flops)))
        except Exception as err:
            sweep.append(dict(config=cfg, error=f"{type(err).__name__}: {err}"[:300]))
    res["decode_sweep"] = sweep
    for row in sweep:
        log(f"  decode sweep {row['config']}: " + (f"{row['ms']:.3f} ms" if "ms" in row else row["error"]))

    ref_ms = cuda_ms(lambda: reference(q, latent, scale, r), iters=5, warmup=1)
    res["torch_reference_ms"] = round(ref_ms, 3)
    res["speedup_vs_reference"] = round(ref_ms / res["decode"]["ms"], 2)
    log(f"  torch reference (fp32 math): {ref_ms:.3f} ms -> Triton {res['speedup_vs_reference']}x")
    del q, latent, got

    if left(budget) > 90:
        ps = SHAPES["prefill"]
        q = (torch.randn(1, ps, h, c, device=DEV) * 0.3).to(torch.bfloat16)
        latent = torch.randn(1, ps, c, device=DEV).to(torch.bfloat16)
        pflops = 2 * h * (c + r) * ps * (ps + 1) / 2
        pbytes = (q.numel() + latent.numel() + ps * h * r) * 2
        res["prefill"] = dict(shape=dict(B=1, S=ps, T=ps, H=h), **rates(
            cuda_ms(lambda: la.latent_attention(q, latent, scale, r), iters=5), pbytes, pflops))
        show(f"LatentAttention prefill (causal, S=T={ps})", res["prefill"])
    return res


def _routing(n: int, e: int, k: int):
    scores = torch.rand(n, e, device=DEV)
    w, idx = scores.topk(k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True))


def _fp8_weights(w_bf16: torch.Tensor):
    """E4M3 + per-128x128 scales (core.fp8), one expert at a time (no float32 copy of all)."""
    pairs = [quantize_blocks(w) for w in w_bf16]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def _moe_reference_subset(x, idx, w, wgu, wd, sgu=None, sd=None, tokens: int = 256):
    """Reference for the first `tokens` tokens, dequantizing only the experts they use."""
    x, idx, w = x[:tokens], idx[:tokens], w[:tokens]
    inter = wd.shape[-1]
    y = torch.zeros(x.shape, dtype=torch.float32, device=DEV)
    for e in torch.unique(idx).tolist():
        tok, slot = torch.where(idx == e)
        gu = dequantize_blocks(wgu[e], sgu[e]) if sgu is not None else wgu[e].float()
        dn = dequantize_blocks(wd[e], sd[e]) if sd is not None else wd[e].float()
        xe = x[tok].float()
        hid = torch.nn.functional.silu(xe @ gu[:inter].T) * (xe @ gu[inter:].T)
        y.index_add_(0, tok, (hid @ dn.T) * w[tok, slot, None].float())
    return y


@section("moe_dispatch")
def bench_moe(budget: float, tokens: int) -> dict:
    from dsv3_export.plugins.moe_dispatch import triton as moe
    from dsv3_export.plugins.moe_dispatch.reference import moe_dispatch as reference

    d, inter, e, k = SHAPES["moe"]
    res = dict(shape=dict(D=d, I=inter, E=e, k=k))
    w_gate_up = (torch.randn(e, 2 * inter, d, device=DEV, dtype=torch.bfloat16) / math.sqrt(d))
    w_down = (torch.randn(e, d, inter, device=DEV, dtype=torch.bfloat16) / math.sqrt(inter))

    def run_case(name, n, wgu, wd, sgu=None, sd=None, wbytes=2):
        x = torch.randn(n, d, device=DEV, dtype=torch.bfloat16)
        idx, w = _routing(n, e, k)
        w = w.to(torch.bfloat16)
        flops = 6 * n * k * d * inter
        used = torch.unique(idx).numel()
        nbytes = used * 3 * inter * d * wbytes + 2 * n * d * 2  # weights of the experts hit + x + y
        y = moe.moe_dispatch(x, idx, w, wgu, wd, sgu, sd)
        want = _moe_reference_subset(x, idx, w, wgu, wd, sgu, sd)
        got = y[: want.shape[0]].float()
        rel = float((got - want).norm() / want.norm())
        r_ = dict(tokens=n, experts_hit=used, rel_err_first256=round(rel, 5),
                  **rates(cuda_ms(lambda: moe.moe_dispatch(x, idx, w, wgu, wd, sgu, sd), iters=10), nbytes, flops))
        res[name] = r_
        show(f"MoEDispatch {name}", r_)
        return x, idx, w

    x, idx, w = run_case(f"bf16_{tokens}_tokens", tokens, w_gate_up, w_down)
    if left(budget) > 120:
        ref_ms = cuda_ms(lambda: reference(x, idx, w, w_gate_up, w_down), iters=3, warmup=1)
        res["torch_reference_ms"] = round(ref_ms, 2)
        res["speedup_vs_reference"] = round(ref_ms / res[f"bf16_{tokens}_tokens"]["ms"], 2)
        log(f"  torch reference (per-expert loop, bf16): {ref_ms:.2f} ms -> Triton {res['speedup_vs_reference']}x")
    if left(budget) > 100:
        n_dec = SHAPES["decode_tokens"]
        run_case(f"bf16_{n_dec}_tokens_decode", n_dec, w_gate_up, w_down)
    if left(budget) > 90:
        q_gu, s_gu = _fp8_weights(w_gate_up)
        del w_gate_up
        q_d, s_d = _fp8_weights(w_down)
        del w_down
        run_case(f"fp8_{tokens}_tokens", tokens, q_gu, q_d, s_gu, s_d, wbytes=1)
        if left(budget) > 60:
            n_dec = SHAPES["decode_tokens"]
            run_case(f"fp8_{n_dec}_tokens_decode", n_dec, q_gu, q_d, s_gu, s_d, wbytes=1)
    return res


@section("tensorrt")
def bench_tensorrt(budget: float) -> dict:
    try:
        import tensorrt as trt
    except ImportError:
        log("TensorRT is not installed: skipping the engine check (pip install tensorrt>=10.15 to run it)")
        return dict(available=False, message="tensorrt not installed")
    if left(budget) < 60:
        return dict(available=True, message="skipped: not enough time left")
    from onnx import TensorProto, helper

    from dsv3_export.plugins.latent_attention import onnx_function, spec
    from dsv3_export.plugins.latent_attention import tensorrt as la_trt
    from dsv3_export.plugins.latent_attention import triton as la

    la_trt.register()  # AOT: the Triton kernel is embedded in the engine
    b, s, t, h, r, dr = SHAPES["la"]
    c, scale = r + dr, 1 / math.sqrt(192)
    node = onnx_function.make_node("q", "latent", "cache_lengths", "o_lat", scale=scale, kv_lora_rank=r)
    graph = helper.make_graph(
        [node], "la", [helper.make_tensor_value_info("q", TensorProto.BFLOAT16, [b, s, h, c]),
                       helper.make_tensor_value_info("latent", TensorProto.BFLOAT16, [b, t, c]),
                       helper.make_tensor_value_info("cache_lengths", TensorProto.INT64, [b])],
        [helper.make_tensor_value_info("o_lat", TensorProto.BFLOAT16, [b, s, h, r])])
    model = helper.make_model(graph, ir_version=11, functions=[onnx_function.function_proto()], opset_imports=[
        helper.make_opsetid("", onnx_function.OPSET), helper.make_opsetid(spec.OP_DOMAIN, 1)])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    t0 = time.monotonic()
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    if plan is None:
        raise RuntimeError("engine build failed (see the TensorRT log above)")
    build_s = time.monotonic() - t0
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    q = (torch.randn(b, s, h, c, device=DEV) * 0.3).to(torch.bfloat16)
    latent = torch.randn(b, t, c, device=DEV).to(torch.bfloat16)
    lengths = torch.full((b,), t - s, dtype=torch.int64, device=DEV)
    out = torch.empty(b, s, h, r, device=DEV, dtype=torch.bfloat16)
    for name, tensor in (("q", q), ("latent", latent), ("cache_lengths", lengths), ("o_lat", out)):
        ctx.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    ms = cuda_ms(lambda: ctx.execute_async_v3(stream.cuda_stream))
    want = la.latent_attention(q, latent, scale, r, num_splits=1)
    res = dict(available=True, version=trt.__version__, engine_build_s=round(build_s, 1),
               max_abs_diff_vs_triton=float((out.float() - want.float()).abs().max()),
               latent_attention_aot_decode=rates(ms, (latent.numel() + q.numel() + out.numel()) * 2,
                                                 2 * b * s * h * t * (c + r)))
    show("TensorRT LatentAttention AOT engine, decode", res["latent_attention_aot_decode"])
    log(f"  engine build {build_s:.1f}s, max |TRT - Triton| = {res['max_abs_diff_vs_triton']:.3g}")
    return res


def _cli(args: list, timeout: float) -> dict:
    """One dsv3-export command in a subprocess: rc, seconds, the tail of its output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "dsv3_export.cli.main", *map(str, args)]
    log(f"  $ dsv3-export {' '.join(map(str, args))} (timeout {timeout:.0f}s)")
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return dict(rc=None, seconds=round(time.monotonic() - t0, 1), tail=f"timed out after {timeout:.0f}s; "
                    + str(err.stdout or "")[-1500:])
    out = (done.stdout + done.stderr).strip()
    return dict(rc=done.returncode, seconds=round(time.monotonic() - t0, 1), tail=out[-1500:] if done.returncode else
                out.splitlines()[-1] if out else "")


@section("tensorrt_engine")
def check_trt_engine(budget: float, timeout: float) -> dict:
    """The whole TensorRT path through engines/trt.py: build the tiny preset's plans (the build verifies
    them against the reference), verify the plan on its own, generate from it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        log("TensorRT is not installed: skipping the engine build (pip install tensorrt>=10.15 to run it)")
        return dict(available=False, message="tensorrt not installed")
    if left(budget) < 60:
        return dict(available=True, message="skipped: not enough time left")
    out = ROOT / "build" / "gpu_check_tiny_trt"
    res = dict(available=True, build_dir=str(out))
    res["build"] = _cli(["build", "tiny", "-o", out, "--backend", "trt", "--force", "--no-verify", "--max-batch", 4,
                         "--max-seq-len", 256], min(timeout, left(budget) - 20))
    log(f"  build: rc={res['build']['rc']} in {res['build']['seconds']}s")
    if res["build"]["rc"] == 0 and left(budget) > 30:
        # trt named explicitly: verify then fails, instead of skipping it, where TensorRT does not load.
        res["verify"] = _cli(["verify", out, "--backend", "graph", "--backend", "trt"], min(timeout, left(budget) - 15))
        log(f"  verify: rc={res['verify']['rc']} in {res['verify']['seconds']}s")
        if left(budget) > 15:
            res["run"] = _cli(["run", out, "--ids", "1,2,3,4", "--max-new-tokens", 8], min(60, left(budget) - 5))
            log(f"  run: rc={res['run']['rc']}: {res['run']['tail']}")
        manifest = out / "manifest.json"
        if manifest.is_file():
            engine = json.loads(manifest.read_text()).get("engine", {})
            res["engine"] = {k: engine.get(k) for k in ("tensorrt", "device", "attention_impl", "graphs")}
    failed = [k for k in ("build", "verify", "run") if k in res and res[k]["rc"] != 0]
    if failed:
        raise RuntimeError(f"dsv3-export {', '.join(failed)} failed: {res[failed[0]]['tail'][-400:]}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(ROOT / "build" / "gpu_check.json"),
                    help="where to write the JSON (default: build/gpu_check.json, git-ignored)")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole run (default: %(default)s)")
    ap.add_argument("--test-timeout", type=float, default=240, help="seconds for the pytest run")
    ap.add_argument("--examples", type=int, default=6, help="hypothesis examples per randomized test")
    ap.add_argument("--tokens", type=int, default=4096, help="MoE tokens for the prefill case")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--trt-only", action="store_true",
                    help="only the TensorRT engine check: build, verify and run the tiny preset with --backend trt")
    ap.add_argument("--trt-timeout", type=float, default=240, help="seconds per dsv3-export command of that check")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: tests this script")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        SHAPES.update(SMOKE_SHAPES)
        args.skip_tests = True
        args.tokens = min(args.tokens, 32)
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_check: unset TRITON_INTERPRET (it forces the CPU interpreter)", file=sys.stderr)
        return 2
    try:
        env_info()
        if args.trt_only:
            if not args.skip_tests:
                run_tests(min(args.test_timeout, max(30.0, left(args.budget) - 200)), args.examples,
                          files=["tests/engines/test_trt.py"])
            check_trt_engine(args.budget, args.trt_timeout)
        elif not args.skip_tests:
            run_tests(min(args.test_timeout, max(30.0, left(args.budget) - 200)), args.examples)
        if not args.trt_only:
            device_baselines()
            bench_latent_attention(args.budget)
            bench_moe(args.budget, args.tokens)
            bench_tensorrt(args.budget)
            check_trt_engine(args.budget, args.trt_timeout)
    except KeyboardInterrupt:
        RESULT["interrupted"] = True
        log("interrupted: writing what was measured")
    RESULT["total_seconds"] = round(time.monotonic() - START, 1)
    text = json.dumps(RESULT, indent=1, default=str)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(text)
    print("JSON " + json.dumps(RESULT, default=str))
    failed = [k for k, v in RESULT.items() if isinstance(v, dict) and "error" in v]
    tests_rc = RESULT.get("tests", {}).get("rc", 0)
    return 1 if failed or tests_rc else 0


if __name__ == "__main__":
    sys.exit(main())
