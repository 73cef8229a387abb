"""What both Triton kernels share (the TensorRT side is plugins/trt_common.py)."""

import triton.language as tl


def fix_interpreter_bf16_dot() -> None:
    """Triton's CPU interpreter stores bfloat16 as raw uint16 and its tl.dot
    multiplies those integers (wrong by ~1e10; Triton 3.9). Upcast bf16 dot
    operands to float32 there; kernels and GPU code stay unchanged. Idempotent."""
    try:
        from triton.runtime import interpreter as interp

        orig = interp.InterpreterBuilder.create_dot
        convert, handle = interp._convert_float, interp.TensorHandle
    except (ImportError, AttributeError):  # internals moved: bf16 tests will show it
        return
    if getattr(orig, "_dsv3_bf16_fix", False):
        return

    def up(h):
        if h.dtype != tl.bfloat16:
            return h
        data = convert(h.data, tl.bfloat16, tl.float32, None)
        return handle(data.view("float32").reshape(h.data.shape), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    create_dot._dsv3_bf16_fix = True
    interp.InterpreterBuilder.create_dot = create_dot
