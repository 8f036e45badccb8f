"""Image-tower runtimes: the tower as torch runs it, or exported to ONNX and run by ONNX
Runtime in fp32, with int8 products (``int8``), or with int8 products that keep fp32's answers
(``int8-residual``: nearly; ``int8-fp32``: within fp32's own parity bound; encoders/quantize.py).

The image tower is nearly all of a request's CPU time. ONNX Runtime fuses the transformer's
kernels and, with ``int8``, runs its matrix products on 8-bit weights (dynamic quantisation:
activations are quantised per session run, so no calibration images are needed). It is one wheel
that runs on x86 and ARM, with the same numbers as torch in fp32. OpenVINO, measured on an
Intel Xeon, ran ViT-L/14 faster at batch 8 but held a second copy of the weights (about 1 GB
more at peak than torch) and is a 180 MB install (docs/BENCHMARKS.md, "OpenVINO and
torch.compile on the Xeon").

An exported tower is an artifact like an index: a folder with the graph, its weights file and
a manifest that records the profile, the weights (``weights_id`` and a sha256 of the tower's own
tensors), the runtime, the precision, the input size and each file's sha256. It is made once
from the loaded weights; one that belongs to other weights, another input size or whose files
do not match their checksums is refused with the reason and made again, never used.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import gc
import json
import logging
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from encoders.errors import EncoderError
from encoders.model import state_digest
from encoders.quantize import PART_RECIPES, quantize_parts, quantize_tower
from index.files import atomic_write, fsync_dir, fsync_file, sha256_file

if TYPE_CHECKING:
    from encoders.model import GeoModel

RUNTIMES = ("torch", "onnx")
PRECISIONS = ("fp32", "int8", "int8-residual", "int8-fp32")
ARTIFACT_FORMAT = "geoloc.image-runtime"
ARTIFACT_VERSION = 2
MODEL_FILE = "image_tower.onnx"
#: The graph's weights, beside the graph (ONNX external data). ONNX Runtime maps this file
#: instead of parsing the weights into memory and copying them again: the fp32 ViT-L/14
#: session then loads at ~0.75 GB less peak memory, below torch's own (docs/BENCHMARKS.md).
DATA_FILE = MODEL_FILE + ".data"
MANIFEST_FILE = "manifest.json"
#: Largest batch the exported graph accepts (its dynamic batch axis is bounded).
MAX_BATCH = 4096
#: Input pixels per session run: one ViT-L/14 picture (224²), or 49 of ``bluemarble``'s 32².
#: ONNX Runtime holds a run's intermediate tensors until the run ends, where torch's eager run
#: frees each as it goes: ViT-L/14 at batch 8 held ~330 MB more than torch's. Small runs are
#: also faster per picture: a transformer of 257 tokens fills the matrix products at batch 1
#: already, and larger runs' activations outgrow the caches the passes between the products
#: stream through (on the Xeon with AMX, ViT-L/14 int8-residual per picture at batch 8: 0.47x
#: of torch in runs of 1, 0.51x in runs of 5, bench/runtime.py; `bluemarble` int8-residual
#: over 245 pictures: 0.81 ms each in runs of 49, 1.26 ms in one run of 245).
CHUNK_PIXELS = 224 * 224
#: How ``int8`` is made, recorded in each int8 manifest: an export made another way is refused
#: and made again. Dynamic quantisation of the matrix products' weights, one scale per output
#: column. ONNX Runtime multiplies uint8 activations by int8 weights. On x86 CPUs with AVX2 and
#: without VNNI it sums the products in pairs into int16 (VPMADDUBSW), which saturates with full
#: 8-bit weights: on such a CPU a ViT-L/14 tower's embeddings fell to a cosine of 0.954 with
#: fp32's (1.5e-2 mean 1 - cos on a 2-layer ViT), against 0.9992 with weights within 7 bits.
#: With VNNI (8-bit dot products summed into int32) nothing saturates, and full 8-bit weights
#: halve the error of 7-bit ones at the same speed (docs/BENCHMARKS.md). So an export uses the
#: full range where the CPU that makes it has VNNI, 7 bits elsewhere; an artifact with full
#: 8-bit weights is refused (and made again, within 7 bits) on a CPU without VNNI, which a copy
#: to another replica may be. 7-bit weights hold on every CPU and are used wherever found.
INT8_7BIT = "dynamic, MatMul/Gemm weights int8 per output column, 7-bit range"
INT8_8BIT = "dynamic, MatMul/Gemm weights int8 per output column, 8-bit range (CPUs with VNNI)"
#: x86 CPU flags (/proc/cpuinfo) of the 8-bit dot-product instructions ONNX Runtime's int8
#: kernels use when present (AVX-512 VNNI, AVX-VNNI, AMX).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def has_vnni() -> bool:
    """Whether this CPU sums 8-bit products without int16 saturation (x86 with VNNI). Anything
    else, including other architectures whose kernels were not measured here, counts as
    without: 7-bit weights hold everywhere."""
    x86 = platform.machine().lower() in {"x86_64", "amd64"}
    return x86 and not VNNI_FLAGS.isdisjoint(cpu_flags())


def quantization(precision: str, portable: bool = False) -> str | None:
    """What an export of ``precision`` on this CPU records as its ``quantization`` (None: not
    quantised); ``portable``: int8 weights within 7 bits whatever this CPU has
    (``int8-residual``'s and ``int8-fp32``'s hold on every CPU as made)."""
    if precision in PART_RECIPES:
        return PART_RECIPES[precision].record
    if precision != "int8":
        return None
    return INT8_8BIT if has_vnni() and not portable else INT8_7BIT


def _quantization_problem(found: str | None, precision: str, portable: bool) -> str | None:
    """Why an artifact whose weights were quantised as ``found`` may not run here (None: it
    may); ``portable``: only weights that run on every CPU will do."""
    wanted = quantization(precision, portable)
    if found == wanted or (precision == "int8" and found == INT8_7BIT):  # 7 bits run anywhere
        return None
    if precision == "fp32":
        return f"its fp32 graph records a quantisation ({found!r})"
    if precision == "int8" and found == INT8_8BIT:
        why = (
            "GEOLOC_IMAGE_INT8_PORTABLE asks for weights that run on any CPU"
            if portable
            else "this CPU has no VNNI"
        )
        return f"its weights use the full 8-bit range, which saturates without VNNI ({why})"
    return (
        f"its weights were quantised as {found or 'full 8-bit int8'!r}, "
        f"not as {wanted!r}, as this version quantises them"
    )


log = logging.getLogger(__name__)


class RuntimeArtifactError(EncoderError):
    """An exported image tower that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class RuntimeManifest:
    format: str
    version: int
    profile: str
    weights: str
    tower_sha256: str
    runtime: str
    precision: str
    input_size: list[int]
    files: dict[str, str]
    created_at: str
    exporter: dict[str, str]
    #: How the weights were quantised (``INT8_7BIT`` or ``INT8_8BIT`` for int8, ``INT8_RESIDUAL``
    #: for int8-residual, ``INT8_FP32`` for int8-fp32); None for fp32, and in int8 manifests
    #: written before it was recorded (refused).
    quantization: str | None = None


def check_choice(runtime: str, precision: str) -> None:
    if runtime not in RUNTIMES:
        raise RuntimeArtifactError(f"unknown image runtime {runtime!r}; choose one of {RUNTIMES}")
    if precision not in PRECISIONS:
        raise RuntimeArtifactError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if runtime == "torch" and precision != "fp32":
        raise RuntimeArtifactError(
            f"precision {precision} needs the onnx runtime (GEOLOC_IMAGE_RUNTIME=onnx); "
            "the torch runtime runs fp32"
        )


def artifact_dir(root: Path, profile: str, runtime: str, precision: str) -> Path:
    """Where the exported tower of ``profile`` for ``runtime``/``precision`` lives."""
    return Path(root) / profile / f"{runtime}-{precision}"


def tower_digest(model: GeoModel) -> str:
    """sha256 over the image tower's tensors (names, dtypes, shapes, bytes): what the export
    was made from, exact even for weights that come from no file (random ones)."""
    backbone = model.image_tower.backbone
    if isinstance(backbone, ReleasedBackbone):
        return backbone.tower_sha256
    return state_digest(model.image_tower)


def input_size(model: GeoModel) -> list[int]:
    """(channels, height, width) of the tower's input: what the profile's preprocessing makes."""
    return list(model.prepare(Image.new("RGB", (8, 8))).shape)


def read_manifest(directory: Path) -> RuntimeManifest:
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
        manifest = RuntimeManifest(**data)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise RuntimeArtifactError(f"unreadable manifest {path}: {exc}") from exc
    if manifest.format != ARTIFACT_FORMAT or manifest.version != ARTIFACT_VERSION:
        raise RuntimeArtifactError(
            f"{path} is not a {ARTIFACT_FORMAT} v{ARTIFACT_VERSION} manifest"
        )
    return manifest


def stale_reason(
    directory: Path,
    model: GeoModel,
    runtime: str,
    precision: str,
    digest: str,
    portable: bool = False,
) -> str | None:
    """Why the artifact in ``directory`` may not serve ``model`` (None: it may); ``portable``:
    int8 weights must run on any CPU."""
    try:
        m = read_manifest(directory)
    except FileNotFoundError:
        return "none exported yet"
    except RuntimeArtifactError as exc:
        return str(exc)
    wanted = {
        "profile": model.profile,
        "runtime": runtime,
        "precision": precision,
        "input_size": input_size(model),
    }
    for key, value in wanted.items():
        if getattr(m, key) != value:
            return f"it was exported for {key} {getattr(m, key)}, not {value}"
    problem = _quantization_problem(m.quantization, precision, portable)
    if problem is not None:
        return problem
    if m.tower_sha256 != digest:
        return (
            f"it was exported from other weights ({m.weights}, tower sha256 "
            f"{m.tower_sha256[:12]}) than the loaded ones ({model.weights_id}, {digest[:12]})"
        )
    for name, expected in m.files.items():
        path = Path(directory) / name
        if not path.is_file() or sha256_file(path) != expected:
            return f"{name} does not match its sha256 in the manifest"
    return None


def _write_onnx(model: GeoModel, size: list[int], path: Path) -> None:
    """The image tower (backbone and head, unnormalised output) as an fp32 ONNX graph with a
    dynamic batch axis, its weights in ``path``.data."""
    tower = model.image_tower.eval()
    if model.device.type != "cpu" or any(p.dtype != torch.float32 for p in tower.parameters()):
        tower = copy.deepcopy(tower).float().cpu()  # the served model stays where it is
    example = torch.zeros(2, *size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.inference_mode(False):
        program = torch.onnx.export(
            tower,
            (example,),
            input_names=["pixels"],
            output_names=["embedding"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
        program.save(str(path), external_data=True)


def export_image_runtime(
    model: GeoModel, directory: Path, runtime: str, precision: str, *, portable: bool = False
) -> RuntimeManifest:
    """Export the model's image tower into ``directory`` (replacing what is there), while no
    other process exports or loads it. ``portable``: int8 weights within 7 bits on any CPU."""
    with _locked(Path(directory)):
        return _export(model, Path(directory), runtime, precision, tower_digest(model), portable)


def _export(
    model: GeoModel,
    directory: Path,
    runtime: str,
    precision: str,
    digest: str,
    portable: bool = False,
) -> RuntimeManifest:
    """The export itself; the caller holds the artifact's lock."""
    import onnxruntime

    check_choice(runtime, precision)
    if runtime == "torch":
        raise RuntimeArtifactError("the torch runtime runs the loaded tower: nothing to export")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("tmp", "old"):  # the folders of an export that was killed
        for leftover in directory.parent.glob(f".{directory.name}.*.{suffix}"):
            shutil.rmtree(leftover, ignore_errors=True)
    size = input_size(model)
    work = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    work.mkdir()
    try:
        started = time.perf_counter()
        recipe = quantization(precision, portable)
        if precision == "fp32":
            _write_onnx(model, size, work / MODEL_FILE)
        else:  # quantised from the fp32 graph
            fp32 = work / "fp32" / MODEL_FILE
            fp32.parent.mkdir()
            _write_onnx(model, size, fp32)
            if precision == "int8":
                quantize_tower(fp32, work / MODEL_FILE, reduce_range=recipe == INT8_7BIT)
            else:
                quantize_parts(fp32, work / MODEL_FILE, PART_RECIPES[precision])
            shutil.rmtree(fp32.parent)
        files = {MODEL_FILE: work / MODEL_FILE, DATA_FILE: work / DATA_FILE}
        for path in files.values():
            path.chmod(0o644)  # the quantiser writes its weights file private
            fsync_file(path)
        manifest = RuntimeManifest(
            format=ARTIFACT_FORMAT,
            version=ARTIFACT_VERSION,
            profile=model.profile,
            weights=model.weights_id,
            tower_sha256=digest,
            runtime=runtime,
            precision=precision,
            input_size=size,
            files={name: sha256_file(path) for name, path in files.items()},
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            exporter={"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            quantization=recipe,
        )
        # The manifest is written last: a folder without one is an unfinished export.
        atomic_write(work / MANIFEST_FILE, (json.dumps(asdict(manifest), indent=2) + "\n").encode())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.old")
            directory.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        work.rename(directory)
        fsync_dir(directory.parent)
        log.info(
            "exported the %s image tower for %s/%s to %s in %.1f s",
            model.profile,
            runtime,
            precision,
            directory,
            time.perf_counter() - started,
        )
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One exporter at a time per artifact (several workers may start together)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with (directory.parent / f".{directory.name}.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ReleasedBackbone(torch.nn.Module):
    """Stands in for a backbone whose weights were freed once another runtime took over its
    work (an fp32 ViT-L/14 would otherwise be held twice)."""

    def __init__(self, tower_sha256: str, image_size: Any) -> None:
        super().__init__()
        self.tower_sha256 = tower_sha256
        self.image_size = image_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise RuntimeArtifactError(
            "this model's image backbone runs in ONNX Runtime (its torch weights were "
            "released): load the model with the torch runtime to train or run it in torch"
        )


class OnnxImageTower:
    """The exported tower in an ONNX Runtime session: pixels (N, C, H, W) -> (N, D)."""

    def __init__(self, path: Path, threads: int, manifest: RuntimeManifest) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A memory pattern keeps the first run's buffers and then allocates the planned block
        # beside them: ViT-L/14's second batch of 8 held 313 MB more than its first.
        options.enable_mem_pattern = False
        self.manifest = manifest
        _, height, width = manifest.input_size
        self.chunk = max(1, min(MAX_BATCH, CHUNK_PIXELS // (height * width)))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        out = []
        for start in range(0, len(x), self.chunk):
            out.append(self.session.run(None, {"pixels": x[start : start + self.chunk]})[0])
        return torch.from_numpy(np.concatenate(out)).to(pixels.device)

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"runtime": m.runtime, "precision": m.precision, "tower_sha256": m.tower_sha256}


def load_image_runtime(
    model: GeoModel,
    root: Path,
    runtime: str,
    precision: str,
    *,
    threads: int | None = None,
    export: bool = True,
    release: bool = True,
    portable: bool = False,
) -> OnnxImageTower | None:
    """Attach the chosen runtime to ``model`` (None for torch: the loaded tower runs).

    The artifact under ``root`` is used when its manifest matches the loaded weights; else it
    is exported again when ``export`` (logging why), or refused with RuntimeArtifactError.
    ``release``: free the torch backbone's weights afterwards (the head stays: text and
    feature embeddings use it). ``portable`` (GEOLOC_IMAGE_INT8_PORTABLE): int8 weights within
    7 bits, which run on any CPU; an artifact with full 8-bit ones is refused, and an export
    made here keeps 7 bits.
    """
    check_choice(runtime, precision)
    if runtime == "torch":
        model.image_runtime = None
        return None
    if model.device.type != "cpu":
        raise RuntimeArtifactError(
            f"the onnx image runtime runs on the CPU; the model is on {model.device} "
            "(use GEOLOC_IMAGE_RUNTIME=torch there)"
        )
    directory = artifact_dir(root, model.profile, runtime, precision)
    digest = tower_digest(model)
    with _locked(directory):
        reason = stale_reason(directory, model, runtime, precision, digest, portable)
        if reason is not None:
            if not export:
                raise RuntimeArtifactError(
                    f"the {runtime}/{precision} image tower in {directory} cannot be used: "
                    f"{reason}. Export it with `geoloc runtime export`."
                )
            if directory.exists():
                log.warning(
                    "refusing the image tower in %s: %s; exporting it again",
                    directory,
                    reason,
                )
            else:
                log.info("exporting the %s image tower (%s/%s)", model.profile, runtime, precision)
            _export(model, directory, runtime, precision, digest, portable)
        manifest = read_manifest(directory)
        backbone = model.image_tower.backbone
        if release and not isinstance(backbone, ReleasedBackbone):
            # Before the session loads, so that the two copies of the weights are never held
            # together (ViT-L/14: peak RSS 2.8 GB instead of 4.0 GB).
            model.image_tower.backbone = ReleasedBackbone(
                digest, getattr(backbone, "image_size", None)
            )
            del backbone
            gc.collect()
        # Loaded under the lock: a process exporting other weights cannot replace the files
        # between the check and the load. The session maps the weights file; a later export
        # that replaces the folder unlinks it, and the mapping stays valid until the session
        # closes.
        tower = OnnxImageTower(directory / MODEL_FILE, threads or torch.get_num_threads(), manifest)
    model.image_runtime = tower
    return tower


def parity_pictures(n: int, seed: int = 0) -> list[Image.Image]:
    """Seeded pictures with structure at several scales: the inputs on which an export is
    compared with torch (`geoloc runtime export`, bench/runtime.py)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((256, 256), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (256, 256, 3))
        out.append(Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8)))
    return out


def artifact_info(root: Path, profile: str, runtime: str, precision: str) -> dict[str, Any]:
    """What ``/v1/info`` and ``geoloc runtime show`` say about an artifact."""
    directory = artifact_dir(root, profile, runtime, precision)
    try:
        return {"path": str(directory), **asdict(read_manifest(directory))}
    except FileNotFoundError:
        return {"path": str(directory), "exported": False}


__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "OnnxImageTower",
    "ReleasedBackbone",
    "RuntimeArtifactError",
    "RuntimeManifest",
    "artifact_dir",
    "artifact_info",
    "check_choice",
    "export_image_runtime",
    "load_image_runtime",
    "parity_pictures",
    "quantize_tower",
    "stale_reason",
    "tower_digest",
]
