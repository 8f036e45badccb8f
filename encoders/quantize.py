"""How an exported image tower's matrix products are quantised: ``int8`` (``quantize_tower``,
ONNX Runtime's dynamic quantisation), and ``int8-residual`` and ``int8-fp32``
(``quantize_parts``): int8 products whose answers stay torch fp32's.

Dynamic int8 rounds each product's activations to 8 bits with one scale per run. That
rounding, not the weights', is what moves `bluemarble`'s answers: its top-1 stayed torch's
within 1 km for 92 % of validation tiles, and no int8 x int8 recipe with one rounding of the
activations (per token, per block, outlier channels in fp32) reached 97 % (docs/BENCHMARKS.md,
"Where int8's disagreement comes from").

So here each activation is carried in two 7-bit parts: its rounding to 7 bits over the run's
range, and the rounding of what that left over (the residual, within half a step) to 7 bits
on a scale 127 times finer, about 14 bits in all.

- ``int8-residual`` multiplies each part by the same int8 weights (8 bits, one scale per
  output column) in ONNX Runtime's int8 kernels and sums the two products in fp32: twice
  int8's products, none of fp32's. Its 8-bit weights are then most of what still differs
  from fp32.
- ``int8-fp32`` carries the weights in two parts as well (the second, what rounding left
  over, on a scale 254 times finer) and adds the third product that matters, the
  activations' value times the weights' residual (the residual times the residual is below
  both parts' rounding): three int8 products. It also divides each token's activations by
  their largest magnitude before splitting them (and multiplies the product's row back), so
  that a token's precision depends less on the others in the run: over 64 `bluemarble`
  pictures in one run its largest difference from fp32 fell from 9.3e-5 to 4.9e-5. Its
  embeddings stayed within 1e-4 of fp32's (max |difference| of the unit vectors), the bound
  the fp32 runtime is held to, on `bluemarble` and on ViT-L/14 with random weights.

Activation codes within 0..128 times weight codes within -127..127 never saturate the int16
pair sums of CPUs without VNNI (2 x 128 x 127 < 2^15), so one artifact serves every CPU
(int8-residual's speed was measured on CPUs with VNNI only, int8-fp32's on one Xeon with AMX).

Products applied once per picture (rank-2 inputs: the pooled token's projection and the head)
stay fp32: they cost nothing beside the per-token ones, and the head's int8 weights alone were
most of ``int8-residual``'s remaining error (mean 1 - cos to fp32 on 600 validation tiles:
3.5e-5 with them quantised, 6e-6 without).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: What an ``int8-residual`` manifest records as its ``quantization``: an export whose record
#: differs is refused and made again, so change the version with any change to the recipe
#: (the constants below, the per-picture rule).
INT8_RESIDUAL = (
    "v1: MatMul/Gemm weights int8 per output column, 8-bit range; per-token activations as two "
    "7-bit parts (value, rounding residual), two int8 products; per-picture products fp32"
)
#: The same for ``int8-fp32``.
INT8_FP32 = (
    "v1: MatMul/Gemm weights as two int8 parts per output column (value, 8-bit range; rounding "
    "residual on a 254 times finer scale); per-token activations divided by the largest "
    "magnitude of each token, then as two 7-bit parts (value, rounding residual); three int8 "
    "products (value x value, residual x value, value x residual); per-picture products fp32"
)
#: Steps of each activation part: its codes lie within 0..127, or 128 where the largest value
#: rounds up; within 0..128 either way, which is what keeps the pair sums from saturating.
ACTIVATION_STEPS = 127.0
RESIDUAL_ZERO = 64  # the residual's zero point: it lies within +-63.5 steps of its finer scale
WEIGHT_TOP = 127.0  # 8-bit symmetric weights
#: How much finer the weights' residual part is scaled: it lies within half a step, so its
#: codes stay within -127..127 as the value's do.
WEIGHT_RESIDUAL_STEPS = 2 * WEIGHT_TOP


@dataclass(frozen=True)
class PartRecipe:
    """How ``quantize_parts`` makes a precision of int8 parts."""

    record: str  # what its manifests record as their ``quantization``
    weight_parts: int = 1  # 2: the weights' rounding residual as a second int8 part
    per_token: bool = False  # each token divided by its largest magnitude before splitting

    def __post_init__(self) -> None:
        if self.weight_parts not in (1, 2):
            raise ValueError(f"weight_parts is 1 or 2, not {self.weight_parts}")


PART_RECIPES = {
    "int8-residual": PartRecipe(INT8_RESIDUAL),
    "int8-fp32": PartRecipe(INT8_FP32, weight_parts=2, per_token=True),
}


def quantize_tower(
    fp32: Path,
    int8: Path,
    *,
    unsigned: bool = False,
    reduce_range: bool = True,
    block_size: int = 0,
) -> None:
    """int8 weights for the matrix products (MatMul/Gemm): the transformer's cost; the patch
    convolution and normalisations stay fp32. Weights within 7 bits by default
    (``reduce_range``; the export passes False where ``quantization`` says INT8_8BIT);
    bench/int8.py compares the others: ``unsigned`` weights (uint8, the slower uint8 x uint8
    kernels), and
    ``block_size`` > 0: ONNX Runtime's MatMulNBits, 8-bit weights with one scale per block of
    that many input rows, whose activations are quantised per row and block as well."""
    if block_size:
        _quantize_blockwise(fp32, int8, block_size)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root, quiet = logging.getLogger(), _NoPreprocessAdvice()
    root.addFilter(quiet)  # it suggests an optional pre-processing step on every call
    try:
        quantize_dynamic(
            fp32,
            int8,
            weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            use_external_data_format=True,
            # One scale per output column: on 800 Blue Marble test tiles the nearest gallery
            # cell stayed torch's for 95.0 % of them, against 93.9 % with one per tensor.
            per_channel=True,
            # 7-bit weights: no int16 saturation on CPUs without VNNI (INT8_7BIT).
            reduce_range=reduce_range,
        )
    finally:
        root.removeFilter(quiet)


def _quantize_blockwise(fp32: Path, int8: Path, block_size: int) -> None:
    """MatMulNBits with 8-bit symmetric weights in blocks of ``block_size`` and int8 compute
    (accuracy level 4). Its quantiser handles MatMul only, so each Gemm (the attention's
    output projections, the head) is first rewritten as MatMul + Add (``as_matmuls``)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        as_matmuls(fp32).model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(int8), use_external_data_format=True)


class _NoPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")


def as_matmuls(fp32: Path) -> Any:
    """``fp32``'s graph (an ONNX Runtime ``ONNXModel``) with each Gemm written as MatMul + Add,
    by ONNX Runtime's own rewrite, as its dynamic quantisation writes them before quantising:
    the quantisers here handle MatMuls only."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    wrapped = ONNXModel(onnx.load(str(fp32)))
    wrapped.replace_gemm_with_matmul()
    wrapped.remove_unused_constant()  # the untransposed weights the Gemms no longer read
    return wrapped


def quantize_parts(fp32: Path, out: Path, recipe: PartRecipe) -> None:
    """Write ``fp32``'s graph with every per-token MatMul/Gemm on constant weights replaced by
    int8 products summed in fp32: the activations' two parts times the weights' value
    (``int8-residual``), and with the weights in two parts the activations' value times the
    weights' residual too (``int8-fp32``). With ``recipe.per_token`` each token's activations
    are divided by their largest magnitude before they are split, and the product's rows
    multiplied by it after; see the module docstring."""
    import onnx
    from onnx import helper, numpy_helper

    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)  # onnx appends external data to an existing file
    wrapped = as_matmuls(fp32)
    model = wrapped.model
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    per_picture = _per_picture_tensors(model)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if recipe.per_token and opset < 18:  # ReduceMax takes its axes as an input from 18 on
        raise ValueError(f"per-token parts need a graph of opset 18 or later, not {opset}")
    # (activation part, weight part) of each product: value x value, residual x value, and
    # with the weights' residual, value x residual
    pairs = [("", 0), ("r", 0), ("", 1)] if recipe.weight_parts == 2 else [("", 0), ("r", 0)]
    parts: dict[str, str] = {}  # each input's two parts, made once however many products read it
    nodes = []
    for k, node in enumerate(graph.node):
        w = consts.get(node.input[1]) if node.op_type == "MatMul" else None
        x = node.input[0]
        if w is None or len(w.dims) != 2 or x in per_picture:
            nodes.append(node)
            continue
        if x not in parts:
            parts[x] = f"rq{k}_"
            nodes.extend(_two_parts(x, parts[x], recipe.per_token))
        a, b = parts[x], f"rw{k}_"
        weights = _weight_parts(numpy_helper.to_array(w), recipe.weight_parts)
        for j, (q, scale) in enumerate(weights):
            graph.initializer.extend([
                numpy_helper.from_array(q, f"{b}w{j}"),
                numpy_helper.from_array(scale, f"{b}ws{j}"),
            ])  # fmt: skip
        zeros = np.zeros(w.dims[1], np.int8)
        graph.initializer.append(numpy_helper.from_array(zeros, b + "wz"))
        for i, (part, j) in enumerate(pairs):
            nodes.append(helper.make_node(
                "MatMulIntegerToFloat",
                [a + part + "q", f"{b}w{j}", a + part + "s", f"{b}ws{j}", a + part + "z", b + "wz"],
                [f"{b}y{i}"],
                domain="com.microsoft",
            ))  # fmt: skip
        total = f"{b}y0"
        result = f"{b}sum" if recipe.per_token else node.output[0]
        for i in range(1, len(pairs)):
            summed = result if i == len(pairs) - 1 else f"{b}sum{i}"
            nodes.append(helper.make_node("Add", [total, f"{b}y{i}"], [summed]))
            total = summed
        if recipe.per_token:  # back to each token's own magnitude
            nodes.append(helper.make_node("Mul", [result, a + "row"], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)
    wrapped.remove_unused_constant()  # the fp32 weights the products no longer read
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")


def _weight_parts(weights: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` int8 parts of (in, out) ``weights`` with one fp32 scale per output column each:
    the value rounded over the column's range, then (n = 2) what that left over on a scale
    ``WEIGHT_RESIDUAL_STEPS`` times finer."""
    values = weights.astype(np.float32)
    scale = (np.maximum(np.abs(values).max(axis=0), 1e-30) / WEIGHT_TOP).astype(np.float32)
    out = []
    for _ in range(n):
        q = np.clip(np.round(values / scale), -WEIGHT_TOP, WEIGHT_TOP)
        out.append((q.astype(np.int8), scale))
        # what the kernels' part leaves over
        values = values.astype(np.float64) - q.astype(np.float64) * scale
        scale = (scale / WEIGHT_RESIDUAL_STEPS).astype(np.float32)
    return out


def range_scale(x: str, p: str, steps: float, axes: tuple[list[str], dict] | None = None) -> list:
    """Nodes that map ``x``'s range, zero included, onto ``steps`` steps: ``p``s, the scale,
    and ``p``zf, the zero point round(-lo / s) as a float. Over the whole tensor (scalars), as
    DynamicQuantizeLinear takes them, or per row with ``axes``: a reduction's (axis inputs,
    attributes). ``p``steps holds ``steps``."""
    from onnx import helper

    inputs, attrs = axes or ([], {})
    keep = 1 if axes else 0
    op = _prefixed(x, p)
    return [
        _constant(p + "zero", np.float32(0.0)),
        _constant(p + "steps", np.float32(steps)),
        _constant(p + "tiny", np.float32(1e-12)),
        helper.make_node("ReduceMax", [x, *inputs], [p + "hi0"], keepdims=keep, **attrs),
        helper.make_node("ReduceMin", [x, *inputs], [p + "lo0"], keepdims=keep, **attrs),
        op("Max", ["hi0", "zero"], "hi"),
        op("Min", ["lo0", "zero"], "lo"),
        op("Sub", ["hi", "lo"], "span"),
        op("Div", ["span", "steps"], "s0"),
        op("Max", ["s0", "tiny"], "s"),
        op("Div", ["lo", "s"], "lo_s"),
        op("Neg", ["lo_s"], "nzf"),
        op("Round", ["nzf"], "zf"),
    ]


def _prefixed(x: str, p: str) -> Any:
    """A node builder whose names, but ``x``'s, get the prefix ``p``."""
    from onnx import helper

    def op(kind: str, ins: list[str], out: str, **kw: Any) -> Any:
        return helper.make_node(kind, [i if i == x else p + i for i in ins], [p + out], **kw)

    return op


def _constant(name: str, value: np.ndarray | np.generic) -> Any:
    """A Constant node ``name`` holding ``value`` (its dtype as it is)."""
    from onnx import helper, numpy_helper

    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)
    )


def _two_parts(x: str, p: str, per_token: bool = False) -> list:
    """Nodes that carry ``x`` in two 7-bit parts, uint8 codes with scalar scales and zero
    points: ``p``q (``p``s, ``p``z), ``x`` rounded over its range; ``p``rq (``p``rs, ``p``rz),
    what that rounding left over, within half a step, on a scale 127 times finer.
    ``per_token``: ``x``'s rows (tokens) first divided by their largest magnitude, ``p``row,
    so that every token uses the whole range whatever the others in the run hold."""
    import onnx

    scaled = []
    if per_token:
        op = _prefixed(x, p)
        scaled = [
            _constant(p + "axis", np.array([-1], np.int64)),
            # only an all-zero token has no magnitude: any positive floor leaves it zero
            _constant(p + "tiny_row", np.float32(1e-30)),
            op("Abs", [x], "abs"),
            op("ReduceMax", ["abs", "axis"], "row0", keepdims=1),
            op("Max", ["row0", "tiny_row"], "row"),
            op("Div", [x, "row"], "unit"),
        ]
        x = p + "unit"

    op = _prefixed(x, p)
    return [
        *scaled,
        *range_scale(x, p, ACTIVATION_STEPS),
        op("Cast", ["zf"], "z", to=onnx.TensorProto.UINT8),
        op("QuantizeLinear", [x, "s", "z"], "q"),
        op("DequantizeLinear", ["q", "s", "z"], "back"),
        op("Sub", [x, "back"], "r"),
        op("Div", ["s", "steps"], "rs"),
        _constant(p + "rz", np.uint8(RESIDUAL_ZERO)),
        op("QuantizeLinear", ["r", "rs", "rz"], "rq"),
    ]


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
        raise ValueError("int8 parts need a graph whose batch axis is dynamic")
    out = set()
    for v in [*graph.value_info, *graph.input, *graph.output]:
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[0].dim_param == batch:
            out.add(v.name)
    return out
