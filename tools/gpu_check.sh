#!/usr/bin/env bash
# GPU check of the dsv3 plugin kernels (docs/gpu.md): runs the Triton kernel tests
# on the GPU (no interpreter), times LatentAttention and MoEDispatch at the 671B
# shapes against the device's copy bandwidth and bf16 matmul rate, and, when
# TensorRT is installed, builds an engine with the AOT LatentAttention plugin and
# then the tiny preset's plans through engines/trt.py (dsv3-export build tiny
# --backend trt; dsv3-export verify; dsv3-export run: docs/tensorrt.md).
# --trt-only: just that TensorRT path, with tests/engines/test_trt.py on the GPU.
# Prints a line per measurement, then all results as one JSON line ("JSON {...}");
# also writes build/gpu_check.json (override: --json PATH). Finishes in under 8 minutes:
# the Python side keeps a 450 s budget and skips optional parts when time runs short,
# and a hard stop at 470 s still writes what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # silences Triton 3.9's warning, keeps its default
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_check: needs PyTorch with CUDA and Triton (pip install triton); no usable GPU found" >&2
    exit 2
fi
timeout --signal=INT --kill-after=15 470 "$PY" tools/gpu_check.py "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_check: stopped at the 470 s limit" >&2
exit "$rc"
