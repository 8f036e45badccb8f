"""encoders/quantize.py on a graph of one matrix product, where each recipe's arithmetic can be
checked against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from encoders.quantize import PART_RECIPES, PartRecipe, quantize_parts


def _one_product(path: Path, weights: np.ndarray) -> None:
    """x (batch, tokens, k) @ weights (k, m): a per-token product, as in a transformer."""
    k, m = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "one-product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", m])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture
def product(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, 32)).astype(np.float32)
    _one_product(tmp_path / "fp32.onnx", weights)
    return tmp_path, weights


def test_each_part_narrows_the_error(product: tuple[Path, np.ndarray]) -> None:
    """int8-residual (activations in two parts, 8-bit weights) errs by a few thousandths of
    the product's largest value; int8-fp32 (the weights' residual too) twenty times less."""
    root, weights = product
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 64)).astype(np.float32)
    exact = x.astype(np.float64) @ weights.astype(np.float64)
    scale = np.abs(exact).max()
    errors = {}
    for name in ("int8-residual", "int8-fp32"):
        quantize_parts(root / "fp32.onnx", root / f"{name}.onnx", PART_RECIPES[name])
        errors[name] = np.abs(_run(root / f"{name}.onnx", x) - exact).max() / scale
    # 8-bit weights: within 1/254 of a column's range each (measured: 6.0e-3 and 1.4e-4).
    assert 1e-3 < errors["int8-residual"] < 2e-2
    assert errors["int8-fp32"] < 1e-3
    assert errors["int8-fp32"] * 20 < errors["int8-residual"]


@pytest.mark.parametrize("per_token", [True, False])
def test_per_token_keeps_a_quiet_token_beside_a_loud_one(
    product: tuple[Path, np.ndarray], per_token: bool
) -> None:
    """With one scale per run, a token 10^6 times quieter than another in the same run falls
    below both parts' steps and is lost; divided by its own largest magnitude first, it keeps
    the precision it has alone."""
    root, weights = product
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 2, 64)).astype(np.float32)
    x[0, 1] *= 1e-6
    exact = x.astype(np.float64) @ weights.astype(np.float64)
    out = root / "parts.onnx"
    recipe = PartRecipe("probe", weight_parts=2, per_token=per_token)
    assert PART_RECIPES["int8-fp32"] == PartRecipe(PART_RECIPES["int8-fp32"].record, 2, True)
    quantize_parts(root / "fp32.onnx", out, recipe)
    got = _run(out, x)
    quiet = np.abs(got[0, 1] - exact[0, 1]).max() / np.abs(exact[0, 1]).max()
    loud = np.abs(got[0, 0] - exact[0, 0]).max() / np.abs(exact[0, 0]).max()
    assert loud < 1e-3  # measured: 2e-4 either way
    if per_token:
        assert quiet < 1e-3  # 1.2e-4
    else:
        assert quiet > 0.5  # 1.0: nothing of it is left
