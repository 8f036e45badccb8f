"""How the int8 image tower is quantised: the export's recipes beside four others, in one run.

Recipes (the first three: dynamic quantisation of the matrix products' weights, one scale per
output column, each run's activations uint8 with one scale per run):

- ``int8, 8-bit``: int8 weights over their full range (``INT8_8BIT``: the export's on a CPU
  with VNNI);
- ``int8, 7-bit``: int8 weights within 7 bits (``INT8_7BIT``: the export's elsewhere);
- ``uint8``: uint8 weights over their full range, which ONNX Runtime multiplies with other
  (uint8 x uint8) kernels;
- ``int8 blocks of 32 / 128 (MatMulNBits)``: 8-bit weights with one scale per block of input
  rows, activations quantised per row and block (int8 compute), Gemms rewritten as MatMuls;
- ``int8-residual``: the export's ``int8-residual`` (encoders/quantize.py): each per-token
  product's activations as two 7-bit parts (value and rounding residual), two int8 products
  with 8-bit weights; the per-picture products fp32;
- ``int8-fp32``: the export's ``int8-fp32``: the weights in two int8 parts as well, three int8
  products.

and three emulations (``EMULATED``: int8 rounding computed in fp32, so untimed): int8 weights
with fp32 activations, the error every int8-weight recipe starts from; with the activations
quantised per run, as the dynamic recipes do (a check of the emulation); and per row (each
token), which ONNX Runtime's dynamic quantisation does not offer.

On x86 CPUs with AVX2 and without VNNI, ONNX Runtime multiplies uint8 activations by int8
weights in pairs summed into int16, which saturates with full 8-bit weights; the header line
says which vector extensions this CPU has.

Printed per profile (`bluemarble` with its trained weights; `geoclip` with seeded random
backbone weights): per-image time against ONNX Runtime fp32 at batch 1 and 8 (alternating, the
median of --rounds calls), and the mean 1 − cosine and smallest cosine of the unit embeddings
to fp32's over generated pictures. With ``--agreement N``, for `bluemarble`: on N validation
tiles (``--seed``, never reported elsewhere) and --refs reference tiles, in the served
pipeline, the share whose top-1 is torch fp32's within 1 and 25 km, and the accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python bench/int8.py [--profiles bluemarble,geoclip] \
        [--rounds 3] [--agreement 600] [--seed 99001] [--refs 50000]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import _model, _vector_extensions
from tilesets import (
    bundled_weights,
    embed,
    latlon,
    markdown_table,
    read_pictures,
    served_setup,
    tileset,
)

from encoders.quantize import (
    PART_RECIPES,
    as_matmuls,
    quantize_parts,
    quantize_tower,
    range_scale,
)
from encoders.runtime import (
    MODEL_FILE,
    OnnxImageTower,
    artifact_dir,
    export_image_runtime,
    parity_pictures,
    read_manifest,
)
from service.engine.options import LocateOptions
from service.engine.scores import errors_km

#: Diagnostics, not recipes: the fp32 graph with its matrix products' weights rounded to int8 (one
#: scale per output column, 8 bits) and their activations kept, or rounded to uint8 with one
#: scale and zero point per run (as dynamic quantisation does) or per row (per token), all
#: computed in fp32, over the same products the dynamic recipes quantise (every MatMul and Gemm
#: with constant weights). They show what int8 weights alone cost, and what each way of quantising
#: the activations adds, on any CPU.
EMULATED = {
    "emulated: int8 weights only, fp32 activations": {"activations": None},
    "emulated: int8 weights, uint8 activations per run": {"activations": "run"},
    "emulated: int8 weights, uint8 activations per row": {"activations": "row"},
}

#: Each recipe: what writes its quantised graph (fp32 graph, output path).
RECIPES = {
    "int8, 8-bit (exported with VNNI)": functools.partial(quantize_tower, reduce_range=False),
    "int8, 7-bit (exported without VNNI)": functools.partial(quantize_tower, reduce_range=True),
    "uint8": functools.partial(quantize_tower, unsigned=True, reduce_range=False),
    "int8 blocks of 32 (MatMulNBits)": functools.partial(quantize_tower, block_size=32),
    "int8 blocks of 128 (MatMulNBits)": functools.partial(quantize_tower, block_size=128),
    "int8-residual (exported as int8-residual)": functools.partial(
        quantize_parts, recipe=PART_RECIPES["int8-residual"]
    ),
    "int8-fp32 (exported as int8-fp32)": functools.partial(
        quantize_parts, recipe=PART_RECIPES["int8-fp32"]
    ),
}


def towers(model, root: Path, threads: int) -> dict[str, OnnxImageTower]:
    """fp32 and each recipe's tower of ``model``, as sessions the model can run."""
    fp32_dir = artifact_dir(root, model.profile, "onnx", "fp32")
    export_image_runtime(model, fp32_dir, "onnx", "fp32")
    manifest = read_manifest(fp32_dir)
    out = {"fp32": OnnxImageTower(fp32_dir / MODEL_FILE, threads, manifest)}
    for i, (name, quantize) in enumerate(RECIPES.items()):
        path = root / f"recipe{i}" / MODEL_FILE
        path.parent.mkdir()
        quantize(fp32_dir / MODEL_FILE, path)
        int8 = dataclasses.replace(manifest, precision="int8")
        out[name] = OnnxImageTower(path, threads, int8)
    for i, (name, options) in enumerate(EMULATED.items()):
        path = root / f"emulated{i}" / MODEL_FILE
        path.parent.mkdir()
        emulate_int8(fp32_dir / MODEL_FILE, path, **options)
        out[name] = OnnxImageTower(path, threads, manifest)
    return out


def emulate_int8(fp32: Path, out: Path, *, activations: str | None, bits: int = 8) -> None:
    """``fp32`` with each MatMul's constant weights rounded to ``bits`` (one scale per output
    column) and, with ``activations`` "run" or "row", its input rounded to uint8 (asymmetric,
    zero included) with one scale for the whole run or one per row: int8 arithmetic emulated
    in fp32. Gemms are first written as MatMul + Add (``as_matmuls``), as dynamic quantisation
    writes them before it quantises them."""
    import onnx
    from onnx import numpy_helper

    wrapped = as_matmuls(fp32)
    model = wrapped.model
    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    top = 2.0 ** (bits - 1) - 1
    if activations:
        graph.initializer.extend(
            numpy_helper.from_array(np.array(v, np.float32), k)
            for k, v in {"emu_0": 0.0, "emu_255": 255.0}.items()
        )
    if activations == "row" and opset >= 18:  # reductions take axes as an input from 18
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "emu_axes"))
    nodes = []
    for k, node in enumerate(graph.node):
        w = consts.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        weights = numpy_helper.to_array(w).astype(np.float32)
        scale = np.maximum(np.abs(weights).max(axis=0), 1e-12) / top
        rounded = (np.round(weights / scale) * scale).astype(np.float32)
        w.CopyFrom(numpy_helper.from_array(rounded, w.name))
        if activations:
            nodes.extend(_fake_uint8(node.input[0], f"emu{k}_", activations == "row", opset))
            node.input[0] = f"emu{k}_x"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")


def _fake_uint8(x: str, p: str, per_row: bool, opset: int) -> list:
    """Nodes that round ``x`` to uint8 and back into ``p``x, on the scale and zero point
    ``range_scale`` gives over the whole tensor, as DynamicQuantizeLinear takes them, or over
    each row (``per_row``). Names starting with "emu_" are the shared constants."""
    from onnx import helper

    if not per_row:
        axes = None  # over the whole tensor
    elif opset >= 18:  # reductions take their axes as an input from opset 18
        axes = (["emu_axes"], {})
    else:
        axes = ([], {"axes": [-1]})

    def node(op: str, inputs: list[str], output: str):
        names = [x if i == "" else i if i.startswith("emu_") else p + i for i in inputs]
        return helper.make_node(op, names, [p + output])

    return [
        *range_scale(x, p, 255.0, axes),
        node("Div", ["", "s"], "xs"),  # "": the input
        node("Round", ["xs"], "xr"),
        node("Add", ["xr", "zf"], "xz"),
        node("Clip", ["xz", "emu_0", "emu_255"], "xq"),
        node("Sub", ["xq", "zf"], "xd"),
        node("Mul", ["xd", "s"], "x"),
    ]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def speed_and_parity(profile: str, rounds: int, threads: int) -> None:
    model = _model(profile)
    pictures = parity_pictures(64 if profile == "bluemarble" else 16)
    with tempfile.TemporaryDirectory() as tmp:
        ts = towers(model, Path(tmp), threads)
        with torch.inference_mode():
            pixels = model.pixels(pictures)
            emb = {k: unit(t(pixels).numpy()) for k, t in ts.items()}
            ms: dict[tuple[str, int], float] = {}
            for batch in (1, 8):
                x = pixels[:batch]
                times: dict[str, list[float]] = {k: [] for k in ts if k not in EMULATED}
                for _ in range(rounds):
                    for k in times:
                        t = ts[k]
                        start = time.perf_counter()
                        t(x)
                        times[k].append(time.perf_counter() - start)
                for k, v in times.items():
                    ms[(k, batch)] = 1000 * statistics.median(v) / batch
    print(f"\n{profile}: {len(pictures)} generated pictures, {rounds} rounds")
    header = ["recipe", "ms/image batch 1 (× onnx fp32)", "batch 8 (× onnx fp32)"]
    rows = []
    for k in ts:
        cos = np.sum(emb[k] * emb["fp32"], axis=1)
        cells = [
            f"{ms[(k, b)]:.2f} ({ms[(k, b)] / ms[('fp32', b)]:.2f}×)" if (k, b) in ms else "-"
            for b in (1, 8)
        ]  # emulated int8 runs in fp32: its time says nothing
        rows.append([k, *cells, f"{np.mean(1 - cos):.1e}", f"{cos.min():.5f}"])
    print(markdown_table([*header, "mean 1 − cos", "min cos"], rows), flush=True)


def agreement(n: int, seed: int, n_refs: int, threads: int) -> None:
    tiles = tileset("test", n, seed)
    truth = latlon(tiles)
    model, _, refs, _, locator, _ = served_setup(bundled_weights(), 4, n_refs, 0)
    read = read_pictures(tiles, locator)
    options = LocateOptions(top_k=1)

    def answer() -> tuple[np.ndarray, np.ndarray]:
        q = embed(model, tiles)
        found = locator.locate_embeddings(q, options, **read)
        return q, np.array([[r.candidates[0].lat, r.candidates[0].lon] for r in found])

    q0, p0 = answer()
    rows = {"torch fp32": (q0, p0)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tower in towers(model, Path(tmp), threads).items():
            model.image_runtime = tower
            rows[name] = answer()
            model.image_runtime = None
    table = []
    for name, (q, p) in rows.items():
        same, err = errors_km(p, p0), errors_km(p, truth)
        table.append([
            name,
            f"{np.mean(1 - np.sum(q * q0, axis=1)):.1e}",
            f"{100 * np.mean(same <= 1):.1f} / {100 * np.mean(same <= 25):.1f} %",
            " / ".join(f"{100 * np.mean(err <= t):.1f}" for t in (25, 200, 750)) + " %",
        ])  # fmt: skip
    print(f"\nbluemarble: {n} validation tiles (seed {seed}), {len(refs):,} reference tiles")
    header = ["recipe", "mean 1 − cos", "top-1 the same as torch's within 1 / 25 km"]
    print(markdown_table([*header, "top-1 within 25 / 200 / 750 km"], table), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profiles", default="bluemarble,geoclip")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--agreement", type=int, default=0, help="validation tiles (0: skip)")
    ap.add_argument("--seed", type=int, default=99001)
    ap.add_argument("--refs", type=int, default=50000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} thread(s)")
    print(f"# vector extensions: {_vector_extensions()}")
    for profile in filter(None, args.profiles.split(",")):
        speed_and_parity(profile, args.rounds, args.threads)
    if args.agreement:
        agreement(args.agreement, args.seed, args.refs, args.threads)


if __name__ == "__main__":
    main()
