"""Image-tower runtimes: the ONNX export matches torch, is described by its manifest, and an
artifact from other weights (or with damaged files) is refused and exported again."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import load_model
from encoders.profiles import build_model
from encoders.quantize import INT8_FP32, INT8_RESIDUAL
from encoders.registry import get_profile
from encoders.runtime import (
    CHUNK_PIXELS,
    DATA_FILE,
    INT8_7BIT,
    INT8_8BIT,
    MANIFEST_FILE,
    MODEL_FILE,
    OnnxImageTower,
    ReleasedBackbone,
    RuntimeArtifactError,
    artifact_dir,
    export_image_runtime,
    has_vnni,
    input_size,
    load_image_runtime,
    quantization,
    quantize_tower,
    read_manifest,
)

#: GeoCLIP's architecture family (open_clip ViT, patch 14, 768-d output into GeoCLIP's
#: 768-768-512 head), small enough to export in seconds.
SMALL_VIT14 = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 56, "layers": 2, "width": 128, "patch_size": 14, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((96, 96))
        for _ in range(n)
    ]


def _small_geoclip_architecture():
    profile = dataclasses.replace(
        get_profile("geoclip"),
        architecture="test-small-vit14",
        architecture_config=SMALL_VIT14,
        pretrained=None,
        has_text=False,
    )
    torch.manual_seed(3)
    return build_model(profile)


@pytest.mark.parametrize("precision", ["fp32", "int8-fp32"])
@pytest.mark.parametrize("which", ["bluemarble", "small-geoclip-architecture"])
def test_fp32_export_matches_torch(tmp_path: Path, which: str, precision: str) -> None:
    """fp32, and int8-fp32's three int8 products (the activations' and the weights' two
    parts), give torch's unit embeddings within 1e-4."""
    model = load_model("bluemarble") if which == "bluemarble" else _small_geoclip_architecture()
    pictures = _pictures(12)
    reference = model.embed_images(pictures)
    load_image_runtime(model, tmp_path, "onnx", precision)
    got = model.embed_images(pictures)
    assert np.abs(got - reference).max() <= 1e-4
    if precision == "int8-fp32":  # really int8 products: fp32's largest difference is ~2e-7
        assert np.abs(got - reference).max() > 1e-6
    # The torch backbone's weights were released; the head (text and features) stays.
    assert isinstance(model.image_tower.backbone, ReleasedBackbone)
    with pytest.raises(RuntimeArtifactError, match="released"):
        model.image_tower.backbone(torch.zeros(1, 3, 8, 8))
    manifest = read_manifest(artifact_dir(tmp_path, model.profile, "onnx", precision))
    assert manifest.profile == model.profile and manifest.weights == model.weights_id
    assert manifest.input_size == list(model.prepare(pictures[0]).shape)
    assert set(manifest.files) == {MODEL_FILE, DATA_FILE}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("precision", ["fp32", "int8", "int8-residual", "int8-fp32"])
def test_the_session_maps_the_weights_file_instead_of_copying_it(
    tmp_path: Path, precision: str
) -> None:
    """The weights live in a file of their own that ONNX Runtime maps: a graph with its
    weights inside would be parsed and copied, holding them twice while the session loads."""
    model = load_model("bluemarble")
    load_image_runtime(model, tmp_path, "onnx", precision)
    directory = artifact_dir(tmp_path, "bluemarble", "onnx", precision)
    weights, graph = (directory / DATA_FILE).stat().st_size, (directory / MODEL_FILE).stat().st_size
    assert weights > 3 * graph  # the graph file holds the structure, not the weights
    mapped = Path("/proc/self/maps").read_text()
    assert str((directory / DATA_FILE).resolve()) in mapped


def test_large_batches_run_in_chunks_of_bounded_size(tmp_path: Path) -> None:
    """A batch is run a few images at a time (ONNX Runtime holds a run's intermediate tensors
    to its end); the pieces give the embeddings of the whole."""
    model = load_model("bluemarble")
    _, height, width = input_size(model)
    chunk = CHUNK_PIXELS // (height * width)
    pictures = _pictures(2 * chunk + 3, seed=4)
    reference = model.embed_images(pictures)
    tower = load_image_runtime(model, tmp_path, "onnx", "fp32")
    assert tower is not None and tower.chunk == chunk
    assert np.abs(model.embed_images(pictures) - reference).max() <= 1e-4


def test_int8_keeps_the_direction(tmp_path: Path) -> None:
    model = load_model("bluemarble")
    pictures = _pictures(12, seed=1)
    reference = model.embed_images(pictures)
    load_image_runtime(model, tmp_path, "onnx", "int8")
    got = model.embed_images(pictures)
    assert np.sum(got * reference, axis=1).min() > 0.99
    assert np.abs(got - reference).max() > 1e-6  # really quantised, not the fp32 graph


def test_int8_holds_on_cpus_without_vnni(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights within 7 bits where the CPU has no VNNI: on an AVX2 CPU without it, ONNX Runtime
    sums pairs of uint8 x int8 products into int16, which saturates with full 8-bit weights
    (this 2-layer ViT then fell to a cosine of 0.983 with torch's embeddings). 7-bit weights
    hold on every CPU."""
    import encoders.runtime as runtime

    monkeypatch.setattr(runtime, "has_vnni", lambda: False)
    model = _small_geoclip_architecture()
    pictures = _pictures(12, seed=1)
    reference = model.embed_images(pictures)
    load_image_runtime(model, tmp_path, "onnx", "int8")
    got = model.embed_images(pictures)
    assert np.sum(got * reference, axis=1).min() >= 0.999
    assert read_manifest(artifact_dir(tmp_path, model.profile, "onnx", "int8")).quantization == (
        INT8_7BIT
    )


def test_full_8bit_weights_run_only_where_the_cpu_has_vnni(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A CPU with VNNI exports full 8-bit weights; a copy of that artifact on a CPU without VNNI
    is refused and exported again within 7 bits, which a CPU with VNNI then keeps using (a
    folder shared by mixed replicas settles on the weights that hold on all of them)."""
    import encoders.runtime as runtime

    model = load_model("bluemarble")
    directory = artifact_dir(tmp_path, "bluemarble", "onnx", "int8")
    monkeypatch.setattr(runtime, "has_vnni", lambda: True)
    load_image_runtime(model, tmp_path, "onnx", "int8", release=False)
    assert read_manifest(directory).quantization == INT8_8BIT
    monkeypatch.setattr(runtime, "has_vnni", lambda: False)
    with pytest.raises(RuntimeArtifactError, match="without VNNI"):
        load_image_runtime(model, tmp_path, "onnx", "int8", export=False)
    with caplog.at_level(logging.WARNING, logger="encoders.runtime"):
        load_image_runtime(model, tmp_path, "onnx", "int8", release=False)
    assert "without VNNI" in caplog.text
    assert read_manifest(directory).quantization == INT8_7BIT
    monkeypatch.setattr(runtime, "has_vnni", lambda: True)
    created = read_manifest(directory).created_at
    files = read_manifest(directory).files
    load_image_runtime(model, tmp_path, "onnx", "int8", export=False, release=False)
    assert (
        read_manifest(directory).files == files and read_manifest(directory).created_at == created
    )
    # Asked to be portable, a CPU with VNNI refuses full 8-bit weights too, and exports 7 bits.
    export_image_runtime(model, directory, "onnx", "int8")
    assert read_manifest(directory).quantization == INT8_8BIT
    with pytest.raises(RuntimeArtifactError, match="PORTABLE"):
        load_image_runtime(model, tmp_path, "onnx", "int8", export=False, portable=True)
    load_image_runtime(model, tmp_path, "onnx", "int8", release=False, portable=True)
    assert read_manifest(directory).quantization == INT8_7BIT


@pytest.mark.skipif(not has_vnni(), reason="full 8-bit int8 weights saturate without VNNI")
def test_full_8bit_weights_are_closer_to_fp32_on_a_cpu_with_vnni(tmp_path: Path) -> None:
    """On this CPU (VNNI) the export's full 8-bit weights err less than 7-bit ones would. (On a
    CPU without VNNI this is skipped: there full 8-bit weights saturate, and are never made.)"""
    model = load_model("bluemarble")
    pictures = _pictures(64, seed=5)
    reference = model.embed_images(pictures)
    load_image_runtime(model, tmp_path, "onnx", "fp32", release=False)
    fp32 = artifact_dir(tmp_path, "bluemarble", "onnx", "fp32") / MODEL_FILE
    manifest = read_manifest(fp32.parent)
    pixels = model.pixels(pictures)
    want = torch.nn.functional.normalize(torch.as_tensor(reference), dim=1)
    err = {}
    for bits, reduce_range in ((8, False), (7, True)):
        (tmp_path / str(bits)).mkdir()
        quantize_tower(fp32, tmp_path / str(bits) / MODEL_FILE, reduce_range=reduce_range)
        got = OnnxImageTower(tmp_path / str(bits) / MODEL_FILE, 1, manifest)(pixels)
        cos = (torch.nn.functional.normalize(got, dim=1) * want).sum(1)
        err[bits] = float((1 - cos).mean())
    assert err[8] < err[7]
    assert quantization("int8") == INT8_8BIT


def test_blockwise_int8_quantises_every_weight_product(tmp_path: Path) -> None:
    """The blockwise recipe bench/int8.py compares: every matrix product with constant weights
    (Gemm ones rewritten as MatMul + Add first) becomes MatMulNBits, and the embeddings keep
    their direction; the rewrite alone changes nothing."""
    import onnx
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = _small_geoclip_architecture()
    pictures = _pictures(12, seed=2)
    load_image_runtime(model, tmp_path, "onnx", "fp32")
    directory = artifact_dir(tmp_path, model.profile, "onnx", "fp32")
    fp32 = onnx.load(str(directory / MODEL_FILE))
    assert any(n.op_type == "Gemm" for n in fp32.graph.node)
    ONNXModel(fp32).replace_gemm_with_matmul()  # as the blockwise recipe does first
    assert not any(n.op_type == "Gemm" for n in fp32.graph.node)
    (tmp_path / "rewritten").mkdir()
    onnx.save(fp32, str(tmp_path / "rewritten" / MODEL_FILE), save_as_external_data=True)
    manifest = read_manifest(directory)
    pixels = model.pixels(pictures)
    rewritten = OnnxImageTower(tmp_path / "rewritten" / MODEL_FILE, 1, manifest)(pixels)
    exported = OnnxImageTower(directory / MODEL_FILE, 1, manifest)(pixels)
    assert torch.abs(rewritten - exported).max() <= 1e-5

    (tmp_path / "blocks").mkdir()
    quantize_tower(directory / MODEL_FILE, tmp_path / "blocks" / MODEL_FILE, block_size=32)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "blocks" / MODEL_FILE)).graph.node]
    assert "Gemm" not in ops and ops.count("MatMulNBits") >= 2 * 4  # 2 blocks, 4 products each
    got = OnnxImageTower(tmp_path / "blocks" / MODEL_FILE, 1, manifest)(pixels)
    got = torch.nn.functional.normalize(got, dim=1)
    want = torch.nn.functional.normalize(exported, dim=1)
    cos = (got * want).sum(1)
    assert cos.min() >= 0.999 and torch.abs(got - want).max() > 1e-6


@pytest.mark.parametrize("which", ["bluemarble", "small-geoclip-architecture"])
def test_int8_residual_keeps_torchs_embeddings_closer_than_int8(tmp_path: Path, which: str) -> None:
    """Each activation in two parts (value and rounding residual): on `bluemarble`'s trained
    weights its embeddings are at least ten times closer to torch's than int8's."""
    model = load_model("bluemarble") if which == "bluemarble" else _small_geoclip_architecture()
    pictures = _pictures(16, seed=5)
    reference = model.embed_images(pictures)
    errors = {}
    for precision in ("int8", "int8-residual"):
        load_image_runtime(model, tmp_path, "onnx", precision, release=False)
        got = model.embed_images(pictures)
        errors[precision] = float(np.mean(1 - np.sum(got * reference, axis=1)))
        # Really quantised, not the fp32 graph (whose largest difference is ~2e-7).
        assert np.abs(got - reference).max() > 1e-5
    model.image_runtime = None
    assert errors["int8-residual"] * 10 <= errors["int8"]
    manifest = read_manifest(artifact_dir(tmp_path, model.profile, "onnx", "int8-residual"))
    assert manifest.quantization == INT8_RESIDUAL


@pytest.mark.parametrize(("precision", "parts"), [("int8-residual", 2), ("int8-fp32", 3)])
def test_int8_parts_products_never_saturate_and_per_picture_ones_stay_fp32(
    tmp_path: Path, precision: str, parts: int
) -> None:
    """Every per-token product becomes two int8 ones (int8-residual: each activation part
    times the weights) or three (int8-fp32: and the activations' value times the weights'
    residual), whose activations lie within 0..128 and weights within -127..127 (no int16
    saturation without VNNI); the products applied once per picture (the pooled token's
    projection and the head) stay fp32 MatMuls/Gemms."""
    import onnx
    import onnxruntime as ort

    model = load_model("bluemarble")
    load_image_runtime(model, tmp_path, "onnx", "fp32", release=False)
    fp32 = onnx.load(str(artifact_dir(tmp_path, "bluemarble", "onnx", "fp32") / MODEL_FILE))
    weights = {t.name for t in fp32.graph.initializer}
    products = [n for n in fp32.graph.node if n.op_type in ("MatMul", "Gemm")]
    weighted = [n for n in products if n.input[1] in weights]
    load_image_runtime(model, tmp_path, "onnx", precision, release=False)
    path = artifact_dir(tmp_path, "bluemarble", "onnx", precision) / MODEL_FILE
    graph = onnx.load(str(path))
    ops = [n.op_type for n in graph.graph.node]
    int8 = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    codes = [onnx.numpy_helper.to_array(t).astype(np.int16) for t in int8]
    assert codes and all(np.abs(c).max() <= 127 for c in codes)  # -128 never used
    per_picture = 3  # the pooled token's projection and the head's two layers
    assert ops.count("MatMulIntegerToFloat") == parts * (len(weighted) - per_picture)
    weight_parts = [t for t in int8 if onnx.numpy_helper.to_array(t).any()]  # not zero points
    assert len(weight_parts) == (parts - 1) * (len(weighted) - per_picture)
    kept = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(kept) == len(products) - len(weighted) + per_picture
    quantised = [
        n.output[0] for n in graph.graph.node if n.op_type == "QuantizeLinear"
    ]  # the values and the residuals, once per input (each feeds one product here)
    assert len(quantised) == 2 * (len(weighted) - per_picture)
    graph.graph.output.extend(onnx.ValueInfoProto(name=name) for name in quantised)
    onnx.save(graph, str(tmp_path / "probe.onnx"))
    session = ort.InferenceSession(str(tmp_path / "probe.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(quantised, {"pixels": model.pixels(_pictures(8, seed=6)).numpy()})
    assert all(o.dtype == np.uint8 for o in outputs)
    assert max(int(o.max()) for o in outputs) <= 128
    assert max(int(o.max()) for o in outputs) >= 100  # the 7-bit range is used


@pytest.mark.parametrize(
    ("precision", "recipe", "other"),
    [("int8-residual", INT8_RESIDUAL, INT8_7BIT), ("int8-fp32", INT8_FP32, INT8_RESIDUAL)],
)
def test_int8_parts_artifact_quantised_another_way_is_refused(
    tmp_path: Path, precision: str, recipe: str, other: str
) -> None:
    model = load_model("bluemarble")
    load_image_runtime(model, tmp_path, "onnx", precision, release=False)
    directory = artifact_dir(tmp_path, "bluemarble", "onnx", precision)
    assert read_manifest(directory).quantization == recipe
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["quantization"] = other
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeArtifactError, match=re.escape(f"not as '{recipe[:30]}")):
        load_image_runtime(model, tmp_path, "onnx", precision, export=False)
    load_image_runtime(model, tmp_path, "onnx", precision, release=False)
    assert read_manifest(directory).quantization == recipe


def test_int8_artifact_quantised_another_way_is_exported_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_model("bluemarble")
    load_image_runtime(model, tmp_path, "onnx", "int8", release=False)
    directory = artifact_dir(tmp_path, "bluemarble", "onnx", "int8")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    del manifest["quantization"]  # as written before the recipe was recorded: 8-bit weights
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeArtifactError, match="quantised as 'full 8-bit int8'"):
        load_image_runtime(model, tmp_path, "onnx", "int8", export=False)
    with caplog.at_level(logging.WARNING, logger="encoders.runtime"):
        load_image_runtime(model, tmp_path, "onnx", "int8", release=False)
    assert "quantised as" in caplog.text
    assert read_manifest(directory).quantization == quantization("int8")
    # fp32 records none, and needs none.
    load_image_runtime(model, tmp_path, "onnx", "fp32", release=False)
    assert read_manifest(artifact_dir(tmp_path, "bluemarble", "onnx", "fp32")).quantization is None


def test_artifact_of_other_weights_is_refused_and_exported_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = load_model("bluemarble")
    load_image_runtime(first, tmp_path, "onnx", "fp32")
    directory = artifact_dir(tmp_path, "bluemarble", "onnx", "fp32")
    old = read_manifest(directory)

    other = load_model("bluemarble")
    with torch.no_grad():
        next(other.image_tower.backbone.parameters()).add_(0.01)
    pictures = _pictures(6, seed=2)
    reference = other.embed_images(pictures)
    with pytest.raises(RuntimeArtifactError, match="other weights"):
        load_image_runtime(other, tmp_path, "onnx", "fp32", export=False)
    with caplog.at_level(logging.WARNING, logger="encoders.runtime"):
        load_image_runtime(other, tmp_path, "onnx", "fp32")
    assert "other weights" in caplog.text
    assert read_manifest(directory).tower_sha256 != old.tower_sha256
    assert np.abs(other.embed_images(pictures) - reference).max() <= 1e-4


def test_damaged_or_unfinished_artifact_is_exported_again(tmp_path: Path) -> None:
    model = load_model("bluemarble")
    load_image_runtime(model, tmp_path, "onnx", "fp32", release=False)
    directory = artifact_dir(tmp_path, "bluemarble", "onnx", "fp32")
    for name in (MODEL_FILE, DATA_FILE):
        with (directory / name).open("r+b") as fh:
            fh.seek(100)
            fh.write(b"\0\1\2\3")
        with pytest.raises(RuntimeArtifactError, match=f"{name} does not match its sha256"):
            load_image_runtime(model, tmp_path, "onnx", "fp32", export=False)
        load_image_runtime(model, tmp_path, "onnx", "fp32", release=False)
    # An artifact of the earlier format (the weights inside the graph) is exported again.
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    (directory / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(RuntimeArtifactError, match="v2 manifest"):
        load_image_runtime(model, tmp_path, "onnx", "fp32", export=False)
    (directory / MANIFEST_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(RuntimeArtifactError, match="manifest"):
        load_image_runtime(model, tmp_path, "onnx", "fp32", export=False)
    load_image_runtime(model, tmp_path, "onnx", "fp32")
    assert read_manifest(directory).files[MODEL_FILE]


def test_choices_are_checked() -> None:
    model = load_model("bluemarble")
    for precision in ("int8", "int8-residual", "int8-fp32"):
        with pytest.raises(RuntimeArtifactError, match="needs the onnx runtime"):
            load_image_runtime(model, Path("unused"), "torch", precision)
    with pytest.raises(RuntimeArtifactError, match="unknown image runtime"):
        load_image_runtime(model, Path("unused"), "openvino", "fp32")
    assert load_image_runtime(model, Path("unused"), "torch", "fp32") is None
    assert model.image_runtime is None


def test_a_killed_exports_leftovers_are_removed(tmp_path: Path) -> None:
    model = load_model("bluemarble")
    directory = artifact_dir(tmp_path, "bluemarble", "onnx", "fp32")
    leftover = directory.with_name(f".{directory.name}.deadbeef.tmp")
    leftover.mkdir(parents=True)
    (leftover / MODEL_FILE).write_bytes(b"x" * 1000)
    load_image_runtime(model, tmp_path, "onnx", "fp32")
    assert not leftover.exists() and (directory / MANIFEST_FILE).is_file()
