"""Image-tower runtimes side by side: torch fp32 eager; ONNX Runtime fp32, int8, int8-residual
and int8-fp32.

For each profile (`bluemarble` with its trained weights; `geoclip`, the ViT-L/14 architecture,
with seeded random backbone weights: the same compute as the real ones), in one run:

- export: the time `geoloc runtime export` takes, and the artifact's size;
- parity: the largest |difference| of the unit embeddings from torch's and the smallest
  cosine, over the same 64 generated pictures;
- latency: per-image milliseconds at batch 1 and batch 8, the runtimes alternating call by
  call (median of --rounds calls each), with --threads threads each (torch and ONNX Runtime);
- memory and start-up: each runtime in a process of its own loads the model as the service
  does (`load_image_runtime`, the torch backbone released) and runs batch 8 --rounds times:
  RSS after loading, peak RSS (VmHWM), and the load time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/runtime.py [--rounds 20] [--threads 1] \
        [--profiles bluemarble,geoclip]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import load_model
from encoders.runtime import (
    PRECISIONS,
    artifact_dir,
    cpu_flags,
    export_image_runtime,
    load_image_runtime,
    parity_pictures,
)

VARIANTS = tuple(("onnx", precision) for precision in PRECISIONS)


def _model(profile: str):
    torch.manual_seed(0)  # the geoclip backbone's random weights: the same in every process
    return load_model(profile, random_backbone=profile == "geoclip")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MiB
    return float("nan")


def child(profile: str, runtime: str, precision: str, root: Path, rounds: int) -> None:
    """One runtime as the service loads it; prints its memory and load time (JSON)."""
    started = time.perf_counter()
    model = _model(profile)
    if runtime != "torch":
        load_image_runtime(model, root, runtime, precision, export=False)
    load_s = time.perf_counter() - started
    rss_loaded = _status("VmRSS")
    pixels = model.pixels(parity_pictures(8))
    with torch.inference_mode():
        for _ in range(rounds):
            model.image_embedding(pixels)
    print(json.dumps({"load_s": load_s, "rss_mib": rss_loaded, "peak_mib": _status("VmHWM")}))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


#: The CPU features int8 speed and accuracy depend on (VNNI: 8-bit dot products into int32).
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _vector_extensions() -> str:
    flags = cpu_flags()
    if not flags:
        return "unknown"
    return " ".join(f for f in VECTOR_FLAGS if f in flags) or "none of " + " ".join(VECTOR_FLAGS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profiles", default="bluemarble,geoclip")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        profile, runtime, precision, root, rounds = args.child
        child(profile, runtime, precision, Path(root), int(rounds))
        return
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s), torch {torch.__version__}, onnxruntime {_ort_version()}, "
        f"vector extensions: {_vector_extensions()}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for profile in args.profiles.split(","):
            model = _model(profile)
            pictures = parity_pictures(64)
            with torch.inference_mode():
                reference = model.embed_images(pictures)
            towers = {("torch", "fp32"): model.image_tower}
            info: dict[tuple[str, str], dict] = {("torch", "fp32"): {}}
            for runtime, precision in VARIANTS:
                t = time.perf_counter()
                export_image_runtime(model, artifact_dir(root, profile, runtime, precision),
                                     runtime, precision)  # fmt: skip
                export_s = time.perf_counter() - t
                tower = load_image_runtime(model, root, runtime, precision, export=False,
                                           threads=args.threads, release=False)  # fmt: skip
                with torch.inference_mode():
                    got = model.embed_images(pictures)
                model.image_runtime = None
                towers[(runtime, precision)] = tower
                size = sum(
                    f.stat().st_size
                    for f in artifact_dir(root, profile, runtime, precision).iterdir()
                )
                info[(runtime, precision)] = {
                    "export_s": export_s,
                    "size_mb": size / 1e6,
                    "max_diff": float(np.abs(got - reference).max()),
                    "min_cos": float(np.sum(got * reference, axis=1).min()),
                }
            for batch in (1, 8):
                pixels = model.pixels(pictures[:batch])
                times: dict[tuple[str, str], list[float]] = {k: [] for k in towers}
                with torch.inference_mode():
                    for tower in towers.values():
                        tower(pixels)  # warm-up
                    for _ in range(args.rounds):
                        for key, tower in towers.items():
                            t = time.perf_counter()
                            tower(pixels)
                            times[key].append(time.perf_counter() - t)
                for key, values in times.items():
                    info[key][f"ms_b{batch}"] = 1000 * statistics.median(values) / batch
            del model, towers
            for key in info:
                done = subprocess.run(
                    [sys.executable, __file__, "--threads", str(args.threads), "--child",
                     profile, *key, str(root), str(args.rounds)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                info[key].update(json.loads(done.stdout.strip().splitlines()[-1]))
            base = info[("torch", "fp32")]
            for key, values in info.items():
                rows.append((profile, key, values, base))
            print_rows(rows)


def print_rows(rows: list) -> None:
    print(
        "\n| profile | runtime | ms/image batch 1 (× torch) | ms/image batch 8 (× torch) "
        "| max abs Δ / min cos vs torch | RSS loaded / peak MiB | load s | export s, size MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for profile, (runtime, precision), v, base in rows:
        parity = f"{v['max_diff']:.1e} / {v['min_cos']:.5f}" if "max_diff" in v else "reference"
        export = f"{v['export_s']:.1f} s, {v['size_mb']:.1f}" if "export_s" in v else "-"
        print(
            f"| {profile} | {runtime} {precision} "
            f"| {v['ms_b1']:.2f} ({v['ms_b1'] / base['ms_b1']:.2f}×) "
            f"| {v['ms_b8']:.2f} ({v['ms_b8'] / base['ms_b8']:.2f}×) "
            f"| {parity} | {v['rss_mib']:.0f} / {v['peak_mib']:.0f} | {v['load_s']:.1f} "
            f"| {export} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
