"""``int8-residual``: int8 matrix products whose answers stay torch fp32's.

Dynamic int8 (``quantize_tower``) rounds each product's activations to 8 bits with one scale
per run. That rounding, not the weights', is what moves `bluemarble`'s answers: its top-1
stayed torch's within 1 km for 92 % of validation tiles, and no int8 x int8 recipe with one
rounding of the activations (per token, per block, outlier channels in fp32) reached 97 %
(docs/BENCHMARKS.md, "Where int8's disagreement comes from").

So here each activation is carried in two 7-bit parts: its rounding to 7 bits, and the rounding
of what that left over (the residual, within half a step) to 7 bits on a scale 127 times finer,
about 14 bits in all. Each part is multiplied by the same int8 weights (8 bits, one scale per
output column) in ONNX Runtime's int8 kernels, and the two products are summed in fp32: twice
int8's products, none of fp32's. Activation codes within 0..128 times weights within
-127..127 never saturate the int16 pair sums of CPUs without VNNI (2 x 128 x 127 < 2^15), so
one artifact serves every CPU (its speed was measured on CPUs with VNNI only).

Products applied once per picture (rank-2 inputs: the pooled token's projection and the head)
stay fp32: they cost nothing beside the per-token ones, and the head's int8 weights alone were
most of the remaining error (mean 1 - cos to fp32 on 600 validation tiles: 3.5e-5 with them
quantised, 6e-6 without).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: What an ``int8-residual`` manifest records as its ``quantization``: an export whose record
#: differs is refused and made again, so change the version with any change to the recipe
#: (the constants below, the per-picture rule).
INT8_RESIDUAL = (
    "v1: MatMul/Gemm weights int8 per output column, 8-bit range; per-token activations as two "
    "7-bit parts (value, rounding residual), two int8 products; per-picture products fp32"
)
#: Steps of each activation part: its codes lie within 0..127, or 128 where the largest value
#: rounds up; within 0..128 either way, which is what keeps the pair sums from saturating.
ACTIVATION_STEPS = 127.0
RESIDUAL_ZERO = 64  # the residual's zero point: it lies within +-63.5 steps of its finer scale
WEIGHT_TOP = 127.0  # 8-bit symmetric weights


def quantize_residual(fp32: Path, out: Path) -> None:
    """Write ``fp32``'s graph with every per-token MatMul/Gemm on constant weights replaced by
    two int8 products (value and residual) summed in fp32; see the module docstring."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.onnx_model import ONNXModel

    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)  # onnx appends external data to an existing file
    wrapped = ONNXModel(onnx.load(str(fp32)))
    wrapped.replace_gemm_with_matmul()  # a Gemm's weights become a MatMul's, bias an Add
    wrapped.remove_unused_constant()
    model = wrapped.model
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    per_picture = _per_picture_tensors(model)
    shared = {
        "rq_zero": np.array(0.0, np.float32),
        "rq_steps": np.array(ACTIVATION_STEPS, np.float32),
        "rq_tiny": np.array(1e-12, np.float32),
        "rq_rzp": np.array(RESIDUAL_ZERO, np.uint8),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in shared.items())
    nodes = []
    for k, node in enumerate(graph.node):
        w = consts.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2 or node.input[0] in per_picture:
            nodes.append(node)
            continue
        weights = numpy_helper.to_array(w).astype(np.float32)
        scale = (np.maximum(np.abs(weights).max(axis=0), 1e-30) / WEIGHT_TOP).astype(np.float32)
        q = np.clip(np.round(weights / scale), -WEIGHT_TOP, WEIGHT_TOP).astype(np.int8)
        p = f"rq{k}_"
        graph.initializer.extend([
            numpy_helper.from_array(q, p + "w"),
            numpy_helper.from_array(scale, p + "ws"),
            numpy_helper.from_array(np.zeros(q.shape[1], np.int8), p + "wz"),
        ])  # fmt: skip
        nodes.extend(_two_part_product(node.input[0], p, node.output[0]))
    del graph.node[:]
    graph.node.extend(nodes)
    wrapped.remove_unused_constant()  # the fp32 weights the products no longer read
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")


def _two_part_product(x: str, p: str, out: str) -> list:
    """Nodes that compute ``out`` = ``x`` @ the int8 weights ``p``w (scales ``p``ws) as the
    sum of two int8 products: ``x`` rounded to 7 bits, and its rounding residual on a scale
    127 times finer. Names starting with "rq_" are the shared constants."""
    import onnx
    from onnx import helper

    nodes = []

    def op(kind: str, inputs: list[str], output: str, **attrs: object) -> None:
        names = [i if i.startswith("rq_") or i == x else p + i for i in inputs]
        nodes.append(helper.make_node(kind, names, [p + output], **attrs))

    # The value's 7-bit scale and zero point over the whole run, zero included, as
    # DynamicQuantizeLinear takes them (which only makes 8-bit ones).
    op("ReduceMax", [x], "hi0", keepdims=0)
    op("ReduceMin", [x], "lo0", keepdims=0)
    op("Max", ["hi0", "rq_zero"], "hi")
    op("Min", ["lo0", "rq_zero"], "lo")
    op("Sub", ["hi", "lo"], "span")
    op("Div", ["span", "rq_steps"], "s0")
    op("Max", ["s0", "rq_tiny"], "s")
    op("Div", ["lo", "s"], "lo_s")
    op("Neg", ["lo_s"], "z0")
    op("Round", ["z0"], "z1")
    op("Cast", ["z1"], "z", to=onnx.TensorProto.UINT8)
    op("QuantizeLinear", [x, "s", "z"], "q")
    # The residual, within half a step of the value's scale, on a scale 127 times finer.
    op("DequantizeLinear", ["q", "s", "z"], "back")
    op("Sub", [x, "back"], "r")
    op("Div", ["s", "rq_steps"], "rs")
    op("QuantizeLinear", ["r", "rs", "rq_rzp"], "rq")
    ms = "com.microsoft"
    op("MatMulIntegerToFloat", ["q", "w", "s", "ws", "z", "wz"], "y0", domain=ms)
    op("MatMulIntegerToFloat", ["rq", "w", "rs", "ws", "rq_rzp", "wz"], "y1", domain=ms)
    nodes.append(helper.make_node("Add", [p + "y0", p + "y1"], [out]))
    return nodes


def _per_picture_tensors(model: object) -> set[str]:
    """Names of the graph's rank-2 tensors whose first axis is the batch: one row per picture
    (after pooling), where the per-token ones have a token axis or batch x tokens rows. The
    exporter records every tensor's shape; a graph without them has them inferred."""
    import onnx

    graph = model.graph  # type: ignore[attr-defined]
    if not graph.value_info:
        graph = onnx.shape_inference.infer_shapes(model).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not batch:
        raise ValueError("int8-residual needs a graph whose batch axis is dynamic")
    out = set()
    for v in [*graph.value_info, *graph.input, *graph.output]:
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[0].dim_param == batch:
            out.add(v.name)
    return out
