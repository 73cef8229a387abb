"""Quantize the matmul weights of a graph per its precision policy (exporter/precision.py).

Runs after attach_weights (the float weights are lazy tensors named by parameter) and before
cleanup. Every quantized tensor is lazy too: made from the source when the saver writes it, one
quantization at a time. Two graph forms (docs/precision.md has the table):

- "qdq": standard ONNX Q/DQ only, for TensorRT (strongly typed) and any runtime: DequantizeLinear
  on each weight feeding the original MatMul/Gemm/Einsum/MoEDispatch, QuantizeLinear+Dequantize-
  Linear on the activations where the precision quantizes them.
- "ort": what ONNX Runtime's CPU kernels run fastest (measured, docs/precision.md):
  MatMulIntegerToFloat (int8), MatMulNBits (weight-only), QMoE (experts). FP8 has no CPU kernel:
  its ort form is the qdq form.

FP8 is one form for both: DequantizeLinear(E4M3 [out, in], row scales [out, ceil(in/128)],
axis=1, block_size=128) -> Transpose -> MatMul, the activation through QuantizeLinear/
DequantizeLinear(FLOAT8E4M3FN, block_size=128) with a computed scale, experts as one
dsv3::MoEDispatchFP8 node.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dsv3_export.core.errors import ExportError
from dsv3_export.core.fp8 import FP8_ACT_EPS, FP8_BLOCK, FP8_MAX
from dsv3_export.exporter.expert_stack import ExpertStack
from dsv3_export.exporter.precision_policy import HEAD_BITS, HEAD_BLOCK, INT8_ACT_EPS, Policy
from dsv3_export.exporter.quant_numerics import (
    SharedLoads,
    expert_block,
    fp8_numpy,
    interleave_rows,
    matmulnbits_blob,
    onnx_int4,
    quantized_expert,
    quantized_int,
    unsigned,
    weight_role,
)
from dsv3_export.exporter.weights import expert_fp8, expert_of, source_fp8
from dsv3_export.plugins import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dsv3_export.plugins.moe_dispatch import onnx_function as moe
from dsv3_export.plugins.moe_dispatch import spec

_PREFIX = "model."
TARGETS = ("ort", "qdq")
MS = "com.microsoft"
QUANTIZED_META = "dsv3.quantized"  # on every initializer made here: cleanup must not fold or read them


def quantize(model: ir.Model, source, policy: Policy, *, target: str = "ort") -> ir.Model:
    """Rewrite `model` in place for `policy` ("fp32": unchanged); decisions go to policy.decisions."""
    if policy.scheme is None:
        return model
    if target not in TARGETS:
        raise ExportError(f"quantize target must be one of {TARGETS}, got {target!r}")
    _Quantizer(model, source, policy, target).run()
    return model


class _Quantizer:
    def __init__(self, model: ir.Model, source, policy: Policy, target: str):
        self.model, self.graph, self.source = model, model.graph, source
        self.policy, self.scheme, self.target = policy, policy.scheme, target
        self.fp8 = policy.precision == "fp8"
        self.loads = SharedLoads()
        self.acts: dict[tuple[int, str], object] = {}
        self.consts: dict[tuple, ir.Value] = {}
        self.new_nodes: list[ir.Node] = []
        self.dead: list[ir.Node] = []
        self.handled: set[str] = set()  # this graph's weights already rewritten (the expert pair: both at once)
        cfg = source.config
        self.moe_block = expert_block(self.scheme.moe_block, cfg.dim, cfg.moe_inter_dim)

    # ---- driver -----------------------------------------------------------------------------------
    def run(self) -> None:
        for name, value in list(self.graph.initializers.items()):
            fqn = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
            shape = value.shape
            if shape is None or len(shape) < 2 or fqn == "inv_freq" or fqn in self.handled:
                continue
            role = weight_role(fqn)
            if self.policy.kept(fqn):
                self.policy.decisions[fqn] = "kept"
                continue
            how = {"linear": self._linear, "head": self._linear, "einsum": self._einsum, "experts": self._experts,
                   "embedding": self._embedding}[role](value, fqn)
            self.handled.add(fqn)
            self.policy.decisions.setdefault(fqn, how)
        self.graph.remove(self.dead, safe=True)
        for name, value in list(self.graph.initializers.items()):  # the float originals nothing reads any more
            if name.removeprefix(_PREFIX) in self.handled and not value.uses():
                del self.graph.initializers[name]
        self.graph.extend(self.new_nodes)
        self.graph.sort()
        if self.target == "ort" and not self.fp8:
            self.model.opset_imports.setdefault(MS, 1)

    # ---- building blocks --------------------------------------------------------------------------
    def op(self, op_type: str, inputs, attributes=None, *, domain: str = "", outputs: int = 1):
        node = ir.node(op_type, inputs, attributes=attributes or {}, domain=domain, num_outputs=outputs)
        self.new_nodes.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def const(self, array: np.ndarray, tag: str) -> ir.Value:
        key = (tag, array.dtype.str, array.shape, array.tobytes())
        if key not in self.consts:
            value = ir.Value(name=f"dsv3.q.{tag}.{len(self.consts)}", shape=ir.Shape(array.shape),
                             type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                             const_value=ir.tensor(array))
            self.graph.register_initializer(value)
            self.consts[key] = value
        return self.consts[key]

    def lazy(self, name: str, key: str, parts: int, make, pick, shape, dtype: ir.DataType) -> ir.Value:
        """An initializer whose data is part `pick` of make()'s result, computed once for all parts."""
        def load() -> ir.Tensor:
            array = self.loads.get(key, parts, make)[pick]
            return ir.Tensor(array, dtype=dtype, name=name)

        shape = ir.Shape(shape)
        value = ir.Value(name=name, shape=shape, type=ir.TensorType(dtype),
                         const_value=ir.LazyTensor(load, dtype=dtype, shape=shape, name=name))
        value.meta[QUANTIZED_META] = True
        self.graph.register_initializer(value)
        return value

    # ---- activations ------------------------------------------------------------------------------
    def act_fp8(self, x: ir.Value, k: int) -> ir.Value:
        """Per token, per 128-group: scale = max(amax, 1e-4)/448, QuantizeLinear to E4M3 and back."""
        key = (id(x), "fp8")
        if key not in self.acts:
            padded = -(-k // FP8_BLOCK) * FP8_BLOCK
            xp = x
            if padded != k:  # a partial last group: zeros do not change its amax
                xp = self.op("Pad", [x, self.const(np.array([0, padded - k], np.int64), "pads"), None,
                                     self.const(np.array([-1], np.int64), "axes")])
            groups = self.op("Concat", [self.op("Shape", [x], {"end": -1}),
                                        self.const(np.array([padded // FP8_BLOCK, FP8_BLOCK], np.int64), "groups")],
                             {"axis": 0})
            amax = self.op("ReduceMax", [self.op("Abs", [self.op("Reshape", [xp, groups])]),
                                         self.const(np.array([-1], np.int64), "axes")], {"keepdims": 0})
            scale = self.op("Div", [self.op("Max", [amax, self.const(np.array(FP8_ACT_EPS, np.float32), "eps")]),
                                    self.const(np.array(FP8_MAX, np.float32), "fp8max")])
            block = {"axis": -1, "block_size": FP8_BLOCK}
            q = self.op("QuantizeLinear", [x, scale], {**block, "output_dtype": ir.DataType.FLOAT8E4M3FN})
            self.acts[key] = self.op("DequantizeLinear", [q, scale], block)
        return self.acts[key]

    def act_int8_scale(self, x: ir.Value) -> ir.Value:
        key = (id(x), "int8-scale")
        if key not in self.acts:
            amax = self.op("ReduceMax", [self.op("Abs", [x]), self.const(np.array([-1], np.int64), "axes")],
                           {"keepdims": 1})
            self.acts[key] = self.op("Div", [self.op("Max", [amax, self.const(np.array(INT8_ACT_EPS, np.float32), "eps")]),
                                             self.const(np.array(127.0, np.float32), "c127")])
        return self.acts[key]

    def act_int8_codes(self, x: ir.Value) -> ir.Value:
        """uint8 codes round(x/s) + 128 of the symmetric per-token int8 value (MatMulIntegerToFloat's
        fast path is uint8 activations x int8 weights; zero point 128 keeps it symmetric)."""
        key = (id(x), "int8-codes")
        if key not in self.acts:
            codes = self.op("Add", [self.op("Round", [self.op("Div", [x, self.act_int8_scale(x)])]),
                                    self.const(np.array(128.0, np.float32), "c128")])
            codes = self.op("Clip", [codes, self.const(np.array(1.0, np.float32), "c1"),
                                     self.const(np.array(255.0, np.float32), "c255")])
            self.acts[key] = self.op("Cast", [codes], {"to": ir.DataType.UINT8})
        return self.acts[key]

    def act_int8_qdq(self, x: ir.Value, k: int) -> ir.Value:
        key = (id(x), "int8-qdq")
        if key not in self.acts:
            scale = self.act_int8_scale(x)
            block = {"axis": -1, "block_size": k}  # one block per row: per-token scales
            q = self.op("QuantizeLinear", [x, scale], {**block, "output_dtype": ir.DataType.INT8})
            self.acts[key] = self.op("DequantizeLinear", [q, scale], block)
        return self.acts[key]

    # ---- linear weights ---------------------------------------------------------------------------
    def _linear_uses(self, value: ir.Value):
        """[(matmul-like node, x, transpose node or None)] when every use is x @ Wᵀ, else None."""
        found = []
        for node, index in value.uses():
            if node.op_type == "Transpose" and index == 0 and list(node.attributes.get_ints("perm", [1, 0])) == [1, 0]:
                for user, j in node.outputs[0].uses():
                    if user.op_type != "MatMul" or j != 1:
                        return None
                    found.append((user, user.inputs[0], node))
            elif node.op_type == "Gemm" and index == 1 and node.attributes.get_int("transB", 0) == 1 \
                    and not node.attributes.get_int("transA", 0) and node.attributes.get_float("alpha", 1.0) == 1.0 \
                    and (len(node.inputs) < 3 or node.inputs[2] is None):
                found.append((node, node.inputs[0], None))
            else:
                return None
        return found or None

    def _linear(self, value: ir.Value, fqn: str) -> str:
        uses = self._linear_uses(value)
        if uses is None:
            return "float: not a plain x @ W^T use"
        out_dim, k = (int(d) for d in value.shape)
        name, s = value.name, self.scheme
        if self.fp8:
            w = self.fp8_weight(value, fqn)
            for node, x, transpose in uses:
                node.replace_input_with(0, self.act_fp8(x, k))
                if transpose is not None:
                    transpose.replace_input_with(0, w)
                else:
                    node.replace_input_with(1, w)
            return "fp8 e4m3, 128x128 blocks; activations fp8 per token per 128"
        head = weight_role(fqn) == "head"  # 8 bits weight-only in every integer precision
        block = HEAD_BLOCK if head else s.block
        make = lambda: quantized_int(self.source, fqn, s, block)  # noqa: E731
        nb = -(-k // block) if block else 1
        if s.act == "int8-token" and not head:  # W8A8, per-output-channel weights stored [in, out]
            ort_form = self.target == "ort"
            # ORT form: both operands as uint8 codes with zero point 128 (still symmetric int8
            # values). Its u8 x s8 kernel sums pairs of products in int16 on AVX2 CPUs without
            # VNNI and saturates (7-19% error measured); u8 x u8 does not (docs/precision.md).
            pack = lambda: _int_kn(make(), 8, True, offset=ort_form)  # noqa: E731
            wq = self.lazy(f"{name}_q", fqn, 2, pack, 0, (k, out_dim), ir.DataType.UINT8 if ort_form else ir.DataType.INT8)
            ws = self.lazy(f"{name}_scale", fqn, 2, pack, 1, (out_dim,), ir.DataType.FLOAT)
            for node, x, _ in uses:
                if ort_form:
                    zp = self.const(np.array(128, np.uint8), "zp128")
                    y = self.op("MatMulIntegerToFloat", [self.act_int8_codes(x), wq, self.const(np.array(1.0, np.float32), "one"),
                                                         ws, zp, zp], domain=MS)
                    y = self.op("Mul", [y, self.act_int8_scale(x)])
                else:
                    wd = self.op("DequantizeLinear", [wq, ws], {"axis": 1})
                    y = self.op("MatMul", [self.act_int8_qdq(x, k), wd])
                self._replace(node, y)
            return "int8 per output channel; activations int8 per token"
        bits = HEAD_BITS if head else s.bits
        if self.target == "ort":
            blob = self.lazy(f"{name}_q", fqn, 2, lambda: _nbits(make(), bits, block), 0,
                             (out_dim, nb, block * bits // 8), ir.DataType.UINT8)
            sc = self.lazy(f"{name}_scale", fqn, 2, lambda: _nbits(make(), bits, block), 1, (out_dim * nb,), ir.DataType.FLOAT)
            for node, x, _ in uses:
                y = self.op("MatMulNBits", [x, blob, sc], {"K": k, "N": out_dim, "bits": bits, "block_size": block,
                                                           "accuracy_level": s.accuracy_level}, domain=MS)
                self._replace(node, y)
        else:
            dtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
            wq = self.lazy(f"{name}_q", fqn, 2, lambda: _int_kn(make(), bits), 0, (k, out_dim), dtype)
            ws = self.lazy(f"{name}_scale", fqn, 2, lambda: _int_kn(make(), bits), 1, (nb, out_dim), ir.DataType.FLOAT)
            for node, x, _ in uses:
                wd = self.op("DequantizeLinear", [wq, ws], {"axis": 0, "block_size": block})
                self._replace(node, self.op("MatMul", [x, wd]))
        return f"int{bits} weight-only, blocks of {block}" + (" (LM head)" if head else "")

    def fp8_weight(self, value: ir.Value, fqn: str) -> ir.Value:
        """DequantizeLinear of the E4M3 bytes with row scales, [out, in] (einsum: [H, d, r])."""
        shape = tuple(int(d) for d in value.shape)
        make = lambda: (lambda q, s: (fp8_numpy(q), s.numpy()))(*source_fp8(self.source, fqn))  # noqa: E731
        wq = self.lazy(f"{value.name}_q", fqn, 2, make, 0, shape, ir.DataType.FLOAT8E4M3FN)
        ws = self.lazy(f"{value.name}_scale", fqn, 2, make, 1, shape[:-1] + (-(-shape[-1] // FP8_BLOCK),),
                       ir.DataType.FLOAT)
        return self.op("DequantizeLinear", [wq, ws], {"axis": len(shape) - 1, "block_size": FP8_BLOCK})

    def _replace(self, node: ir.Node, y: ir.Value) -> None:
        """node's output -> y everywhere; node (and a Transpose feeding only it) removed at the end."""
        old = node.outputs[0]
        y.shape, y.type = old.shape, old.type
        if old.is_graph_output():  # logits: the graph contract's name stays
            name, old.name = old.name, None
            y.name = name
        old.replace_all_uses_with(y, replace_graph_outputs=True)
        self.dead.append(node)
        for inp in node.inputs:
            producer = inp.producer() if inp is not None else None
            if producer is not None and producer.op_type == "Transpose" and producer not in self.dead \
                    and all(u is node or u in self.dead for u, _ in inp.uses()):
                self.dead.append(producer)

    # ---- absorbed-MLA einsum weights --------------------------------------------------------------
    def _einsum(self, value: ir.Value, fqn: str) -> str:
        uses = value.uses()
        if not uses or any(n.op_type != "Einsum" or i != 1 for n, i in uses):
            return "float: not an Einsum operand"
        if self.fp8:
            w = self.fp8_weight(value, fqn)
            how = "fp8 e4m3, wkv_b's 128x128 blocks (row scales); activations float (as DeepSeek absorbs)"
        else:
            # Per-head [H, d, r] weights: no integer kernel takes a batched weight, so weight-only
            # DequantizeLinear feeding the Einsum, in every integer precision. One scale per (h, d)
            # row, stored 2-D [H*d, r] for a per-axis DequantizeLinear: ORT's blocked one is 8x slower
            # (0.7 vs 0.085 ms for 256k weights, measured), and it runs on every call.
            s = self.scheme
            bits = 8  # exporter.quant_numerics.quantized_int: einsum weights are 8-bit in every integer precision
            shape = tuple(int(d) for d in value.shape)
            rows = shape[0] * shape[1]
            make = lambda: _int_flat(quantized_int(self.source, fqn, s, 0), bits)  # noqa: E731
            dtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
            wq = self.lazy(f"{value.name}_q", fqn, 2, make, 0, (rows, shape[-1]), dtype)
            ws = self.lazy(f"{value.name}_scale", fqn, 2, make, 1, (rows,), ir.DataType.FLOAT)
            w = self.op("Reshape", [self.op("DequantizeLinear", [wq, ws], {"axis": 0}),
                                    self.const(np.array(shape, np.int64), "shape")])
            how = f"int{bits} per row, weight-only (DequantizeLinear -> Einsum)"
        for node, index in list(uses):
            node.replace_input_with(index, w)
        return how

    # ---- routed experts ---------------------------------------------------------------------------
    def _experts(self, value: ir.Value, fqn: str) -> str:
        uses = value.uses()
        if len(uses) != 1 or uses[0][0].op_type != "MoEDispatch" or uses[0][0].domain != DOMAIN:
            return "float: not a MoEDispatch operand"
        node = uses[0][0]
        gate_up, down = node.inputs[3], node.inputs[4]
        base = fqn.rsplit(".", 1)[0] + "."
        if any(self.policy.kept(base + p) for p in ("w_gate_up", "w_down")):
            for part in ("w_gate_up", "w_down"):
                self.policy.decisions[base + part] = "float: an expert tensor is kept (both or neither)"
                self.handled.add(base + part)
            return "float"
        how = self._experts_fp8(node, gate_up, down, base) if self.fp8 else self._experts_int(node, gate_up, down, base)
        for part in ("w_gate_up", "w_down"):
            self.policy.decisions[base + part] = how
            self.handled.add(base + part)
        return how

    def stacked(self, stack: ExpertStack) -> ir.Value:
        """An initializer written expert by expert (exporter/expert_stack.py)."""
        value = ir.Value(name=stack.name, shape=stack.shape, type=ir.TensorType(stack.dtype), const_value=stack)
        value.meta[QUANTIZED_META] = True
        self.graph.register_initializer(value)
        return value

    def _experts_fp8(self, node: ir.Node, gate_up: ir.Value, down: ir.Value, base: str) -> str:
        ins = []
        src = self.source
        for value, part in ((gate_up, "w_gate_up"), (down, "w_down")):
            prefix, rest = expert_of(src, base + part)
            e, rows, cols = (int(d) for d in value.shape)
            padded = -(-src.config.moe_inter_dim // FP8_BLOCK) * FP8_BLOCK
            shape = (e, 2 * padded, cols) if part == "w_gate_up" else (e, rows, padded)
            # q and scales are two stacks, each made expert by expert (the scales are recomputed:
            # holding them for the second stack would hold a layer's worth)
            wq = self.stacked(ExpertStack(e, lambda i, p=prefix, r=rest: fp8_numpy(expert_fp8(src, p, r, i)[0]),
                                          shape[1:], ir.DataType.FLOAT8E4M3FN, name=f"{value.name}_q"))
            ws = self.stacked(ExpertStack(e, lambda i, p=prefix, r=rest: expert_fp8(src, p, r, i)[1].numpy(),
                                          spec.fp8_scale_shape(shape)[1:], ir.DataType.FLOAT, name=f"{value.name}_scale"))
            ins.append((wq, ws))
        x = self.act_fp8(node.inputs[0], int(gate_up.shape[2]))
        y = self.op(spec.FP8_OP_NAME, [x, node.inputs[1], node.inputs[2], ins[0][0], ins[1][0], ins[0][1], ins[1][1]],
                    {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}, domain=DOMAIN)
        self._replace(node, y)
        fn = ir.serde.deserialize_function(moe.fp8_function_proto())
        self.model.functions[fn.identifier()] = fn
        self.model.opset_imports[DOMAIN] = DOMAIN_VERSION
        return "fp8 e4m3, 128x128 blocks (I padded to 128); MoEDispatchFP8, input activations fp8 per 128"

    def _experts_int(self, node: ir.Node, gate_up: ir.Value, down: ir.Value, base: str) -> str:
        s, cfg = self.scheme, self.source.config
        block, bits = self.moe_block, s.bits
        e, d, inter = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        parts = {}
        for value, part in ((gate_up, "w_gate_up"), (down, "w_down")):
            rows, cols = (2 * inter, d) if part == "w_gate_up" else (d, inter)
            nb = cols // block if block else 1
            qs = (lambda f: lambda i: quantized_expert(self.source, f, i, s, block))(base + part)
            if self.target == "ort":
                pack = (lambda q, fz: lambda i: _qmoe(q(i), bits, fz, block))(qs, part == "w_gate_up")
                q_slab, s_slab = (rows, cols * bits // 8), (rows, nb) if block else (rows,)
                q_type = ir.DataType.UINT8
            else:
                pack = (lambda q: lambda i: _int_rows(q(i), bits))(qs)
                q_slab, s_slab = (rows, cols), (rows, nb)
                q_type = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
            wq = self.stacked(ExpertStack(e, lambda i, f=pack: f(i)[0], q_slab, q_type, name=f"{value.name}_q"))
            ws = self.stacked(ExpertStack(e, lambda i, f=pack: f(i)[1], s_slab, ir.DataType.FLOAT,
                                          name=f"{value.name}_scale"))
            parts[part] = (wq, ws, cols)
        x, idx, weight = node.inputs[0], node.inputs[1], node.inputs[2]
        if self.target == "ort":
            k = int(idx.shape[1]) if idx.shape is not None and isinstance(idx.shape[1], int) else cfg.n_activated_experts
            n_e = self.op("Concat", [self.op("Shape", [x], {"start": 0, "end": 1}),
                                     self.const(np.array([e], np.int64), "experts")], {"axis": 0})
            zeros = self.op("ConstantOfShape", [n_e])
            ones = self.op("Expand", [self.const(np.array(1.0, np.float32), "one"), self.op("Shape", [idx])])
            # QMoE picks its top-k from router_probs and mixes with router_weights (DeepSeek's noaux
            # routing): 1 at the routed experts picks exactly them, the weights are ours unchanged.
            probs = self.op("ScatterElements", [zeros, idx, ones], {"axis": 1})
            mix = self.op("ScatterElements", [zeros, idx, self.op("Cast", [weight], {"to": ir.DataType.FLOAT})], {"axis": 1})
            attrs = {"k": k, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                     "activation_beta": 0.0, "normalize_routing_weights": 0, "expert_weight_bits": bits,
                     "accuracy_level": s.accuracy_level}
            if block:
                attrs["block_size"] = block
            (w1, s1, _), (w2, s2, _) = parts["w_gate_up"], parts["w_down"]
            y = self.op("QMoE", [x, probs, w1, s1, None, w2, s2] + [None] * 7 + [mix], attrs, domain=MS)
        else:
            deq = [self.op("DequantizeLinear", [wq, ws], {"axis": 2, "block_size": block or cols})
                   for wq, ws, cols in parts.values()]
            y = self.op("MoEDispatch", [x, idx, weight, *deq],
                        {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}, domain=DOMAIN)
        self._replace(node, y)
        grain = f"blocks of {block}" if block else "per output channel"
        form = "QMoE" if self.target == "ort" else "DequantizeLinear -> MoEDispatch"
        return f"int{bits} {grain}; {form}"

    # ---- embedding --------------------------------------------------------------------------------
    def _embedding(self, value: ir.Value, fqn: str) -> str:
        uses = value.uses()
        if not uses or any(n.op_type != "Gather" or i != 0 or n.attributes.get_int("axis", 0) != 0 for n, i in uses):
            return "float: not a Gather table"
        vocab, dim = (int(d) for d in value.shape)
        make = lambda: (lambda q, sc: (q.numpy(), sc.numpy()))(*quantized_int(self.source, fqn, self.scheme, 0))  # noqa: E731
        wq = self.lazy(f"{value.name}_q", fqn, 2, make, 0, (vocab, dim), ir.DataType.INT8)
        ws = self.lazy(f"{value.name}_scale", fqn, 2, make, 1, (vocab, 1), ir.DataType.FLOAT)
        for node, _ in list(uses):
            ids = node.inputs[1]
            rows = self.op("Cast", [self.op("Gather", [wq, ids], {"axis": 0})], {"to": ir.DataType.FLOAT})
            self._replace(node, self.op("Mul", [rows, self.op("Gather", [ws, ids], {"axis": 0})]))
        return "int8 per row (Gather, then Cast x row scale)"


# ---- packing ----------------------------------------------------------------------------------------
def _int_kn(qs, bits: int = 8, per_channel: bool = False, offset: bool = False):
    """(q [out, in], scale [out, nb]) -> q [in, out] and scale [nb, out] ([out] per channel);
    offset: uint8 codes q + 128."""
    q, scale = qs
    qt = q.t().contiguous()
    s = scale.t().contiguous().numpy()
    array = unsigned(qt, 8) if offset else onnx_int4(qt) if bits == 4 else qt.numpy()
    return array, (s[0] if per_channel else s)


def _nbits(qs, bits: int, block: int):
    q, scale = qs
    return matmulnbits_blob(q, bits, block), scale.reshape(-1).numpy()


def _int_flat(qs, bits: int):
    """[H, d, r] q and [H, d, 1] scales -> [H*d, r] and [H*d]."""
    q, scale = qs
    q = q.reshape(-1, q.shape[-1])
    return (onnx_int4(q) if bits == 4 else q.numpy()), scale.reshape(-1).numpy()


def _int_rows(qs, bits: int):
    q, scale = qs
    return (onnx_int4(q) if bits == 4 else q.numpy()), scale.numpy()


def _qmoe(qs, bits: int, fused: bool, block: int):
    q, scale = qs
    if fused:
        q, scale = interleave_rows(q), interleave_rows(scale)
    return unsigned(q, bits), (scale if block else scale[..., 0]).contiguous().numpy()
