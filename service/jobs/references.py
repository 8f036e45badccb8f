"""Reference-image jobs: embed a table of (id, uri, lat, lon) into the image-neighbour index.

A job splits the validated rows of a CSV or Parquet table into shards of a fixed number
of rows and embeds each shard with the image tower, either in this process (small jobs)
or on Ray Data with a pool of encoder actors (large jobs; a cluster with an address).
Everything lives under ``<data_dir>/jobs/<job id>/``:

- ``job.json``: what the job is (input and its sha256, profile, weights, index name, shard
  size);
- ``rows/shard-NNNNN.parquet``: the input rows of each shard;
- ``out/shard-NNNNN.npz``: the embeddings of the rows that worked, then
  ``out/shard-NNNNN.done``, written last: a shard with its marker is never redone, so a
  job that was killed resumes where it stopped when the same command runs again;
- ``report.json`` and ``bad_rows.csv``: every row that could not be used (bad
  coordinates, unreadable image, ...) with the reason. Bad rows never stop a job.

The job id is derived from the input's content and the job's parameters (the model's weights
identity among them: shards embedded by other weights are never reused), so rerunning the
same command finds the same job. A job publishes one new index version and records it; a
rerun after that publishes nothing more.

Longer than most modules: one job format (shards, resumable) run in-process or on Ray, with
the same shard writer for both.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from encoders.structure import (
    COLOUR_DIM,
    STRUCTURE_DIM,
    colour_thumbnails,
    structure_descriptors,
)
from index.files import atomic_write, sha256_file
from index.tables import (
    ID_COLUMNS,
    LAT_HEADERS,
    LON_HEADERS,
    URI_COLUMNS,
    WIDTH_COLUMNS,
    WORDING,
    Reason,
    TableError,
    read_table,
)
from service.engine.images import decode_image
from service.engine.options import ImageLimits
from service.errors import GeolocError, InputImageError
from service.jobs.datasets import DatasetError

RUNNERS = ("auto", "inprocess", "ray")
_SHARD = "shard-{:05d}"
#: What an encoded shard holds for its images (``Job.encode_shard``'s npz members).
SHARD_MEMBERS = ("vectors", "structure", "colour", "id", "row", "latlon", "width")
# bad_rows.csv says "not numbers" of nan and inf, too
_WORDING = {Reason.NOT_FINITE: WORDING[Reason.NOT_NUMBERS], Reason.EMPTY_TEXT: "empty image uri"}


# ---------------------------------------------------------------------------------------------
# the input table


@dataclass(frozen=True)
class ReferenceTable:
    """Validated rows: ``row`` is the 1-based data row of the input (header excluded)."""

    row: np.ndarray  # int64
    id: np.ndarray  # int64, -1 where the input has no id column
    uri: list[str]
    lat: np.ndarray  # float64
    lon: np.ndarray  # float64
    base: Path  # relative paths are resolved against the input's directory
    #: float64 km of ground each image shows (nan: unknown), from an optional width_km column
    width: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.row)


@dataclass(frozen=True)
class BadRow:
    row: int
    id: str
    uri: str
    reason: str


def read_reference_table(path: str | Path) -> tuple[ReferenceTable, list[BadRow]]:
    """Rows of a CSV or Parquet table with an image URI, latitude, longitude, an optional
    integer id and an optional view width (km); rows with bad coordinates, ids or widths are
    returned as bad rows, not raised."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        table, problems = read_table(path, text=URI_COLUMNS, ids=ID_COLUMNS, widths=WIDTH_COLUMNS)
    except (OSError, TableError) as exc:
        if isinstance(exc, OSError) or exc.kind == "unreadable":
            raise DatasetError(f"{path}: not a readable CSV or Parquet table: {exc}") from exc
        if not exc.header:
            raise DatasetError(
                f"{path} is empty; expected a header such as id,uri,lat,lon"
            ) from exc
        raise DatasetError(
            f"{path}: columns {exc.header} lack an image column "
            f"({'/'.join(URI_COLUMNS)}), a latitude column ({'/'.join(LAT_HEADERS)}) or a "
            f"longitude column ({'/'.join(LON_HEADERS)})"
        ) from exc
    has_id = table.id is not None
    bad = [
        BadRow(p.row, str(p.id_text) if has_id else "", p.text, p.describe(_WORDING))
        for p in problems
    ]
    return (
        ReferenceTable(
            row=table.row,
            id=table.id if table.id is not None else np.full(len(table), -1, dtype=np.int64),
            uri=table.text,
            lat=table.lat,
            lon=table.lon,
            base=path.resolve().parent,
            width=table.width,
        ),
        bad,
    )


def read_uri(uri: str, base: Path, max_bytes: int) -> bytes:
    """The bytes behind an image URI: a path (relative to ``base``), a file:// URI or any
    URI a pyarrow filesystem opens (s3://, gs://, hdfs://). At most max_bytes + 1 bytes."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    try:
        if scheme in ("", "file"):
            path = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)) if scheme else None
            path = path or (base / uri)
            with path.open("rb") as fh:
                return fh.read(max_bytes + 1)
        fs, inner = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(inner) as fh:
            return fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputImageError(f"{uri}: no such file", type="file-not-found", status=404) from None
    except (OSError, pa.ArrowException) as exc:
        raise InputImageError(f"{uri}: cannot read ({exc})", type="unreadable-image") from None


# ---------------------------------------------------------------------------------------------
# the job directory


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder worker needs to build the same model as the caller (plain values)."""

    profile: str
    checkpoint: str | None
    backbone_checkpoint: str | None
    device: str
    batch_size: int
    limits: ImageLimits
    torch_threads: int = 1
    #: The caller's model's weights_id: a worker that loads other weights refuses to embed
    #: (e.g. a Ray node with another geoloc release). Empty: not checked.
    weights_id: str = ""
    #: The caller's image runtime (encoders.runtime), its precision and artifacts folder.
    image_runtime: str = "torch"
    image_precision: str = "fp32"
    runtimes_dir: str = ""
    image_int8_portable: bool = False


@dataclass
class Job:
    dir: Path
    n_shards: int
    n_rows: int
    meta: dict[str, Any] = field(default_factory=dict)

    def rows_file(self, shard: int) -> Path:
        return self.dir / "rows" / f"{_SHARD.format(shard)}.parquet"

    def out_file(self, shard: int) -> Path:
        return self.dir / "out" / f"{_SHARD.format(shard)}.npz"

    def bad_file(self, shard: int) -> Path:
        return self.dir / "out" / f"{_SHARD.format(shard)}.bad.json"

    def done_file(self, shard: int) -> Path:
        return self.dir / "out" / f"{_SHARD.format(shard)}.done"

    def done(self) -> list[int]:
        return [s for s in range(self.n_shards) if self._finished(s)]

    def pending(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self._finished(s)]

    def _finished(self, shard: int) -> bool:
        """Encoded, with everything this release stores of an image: a shard an earlier
        release finished without some of it is encoded again (its images would otherwise be
        published with those rows unknown)."""
        if not self.done_file(shard).is_file():
            return False
        with np.load(self.out_file(shard), allow_pickle=False) as z:
            return set(SHARD_MEMBERS) <= set(z.files)

    def shard_rows(self, shard: int) -> int:
        return int(self.meta["shard_sizes"][shard])

    def save_meta(self) -> None:
        atomic_write(self.dir / "job.json", json.dumps(self.meta, indent=2).encode())


def prepare_job(
    jobs_dir: Path,
    data: Path,
    *,
    index_name: str,
    profile: str,
    checkpoint: str | None,
    weights: str,
    shard_rows: int,
    image_runtime: str = "torch-fp32",
) -> tuple[Job, list[BadRow]]:
    """Find the job of this input and these parameters, or create it (rows split in shards).
    The image runtime is one of them: a job is never continued with vectors of another
    precision."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    data = Path(data)
    digest = sha256_file(data) if data.is_file() else ""
    params = [digest, index_name, profile, checkpoint, weights, shard_rows]
    if image_runtime != "torch-fp32":  # keeps the keys of jobs started before runtimes
        params.append(image_runtime)
    key = json.dumps(params).encode()
    job_dir = Path(jobs_dir) / f"refs-{hashlib.sha256(key).hexdigest()[:16]}"
    meta_file = job_dir / "job.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        bad = [BadRow(**b) for b in json.loads((job_dir / "input-bad.json").read_text())]
        return Job(job_dir, meta["n_shards"], meta["n_rows"], meta), bad
    table, bad = read_reference_table(data)
    (job_dir / "rows").mkdir(parents=True, exist_ok=True)
    (job_dir / "out").mkdir(exist_ok=True)
    sizes = []
    width = np.full(len(table), np.nan) if table.width is None else table.width
    for shard, start in enumerate(range(0, len(table), shard_rows)):
        stop = min(start + shard_rows, len(table))
        part = pa.table(
            {
                "row": table.row[start:stop],
                "id": table.id[start:stop],
                "uri": table.uri[start:stop],
                "lat": table.lat[start:stop],
                "lon": table.lon[start:stop],
                "width_km": width[start:stop],
            }
        )
        atomic_write(
            job_dir / "rows" / f"{_SHARD.format(shard)}.parquet",
            lambda fh, part=part: pq.write_table(part, fh),
        )
        sizes.append(stop - start)
    atomic_write(job_dir / "input-bad.json", json.dumps([asdict(b) for b in bad]).encode())
    meta = {
        "input": str(data.resolve()),
        "input_sha256": digest,
        "base": str(table.base),
        "index_name": index_name,
        "profile": profile,
        "checkpoint": checkpoint,
        "weights": weights,
        "image_runtime": image_runtime,
        "shard_rows": shard_rows,
        "n_rows": len(table),
        "n_shards": len(sizes),
        "shard_sizes": sizes,
        "input_bad_rows": len(bad),
        "created_at": time.time(),
        "published": None,
    }
    job = Job(job_dir, len(sizes), len(table), meta)
    job.save_meta()  # last: a job without job.json is prepared again from scratch
    return job, bad


# ---------------------------------------------------------------------------------------------
# encoding shards


class ShardEncoder:
    """Loads the model once; embeds whole shards. Runs in-process or as a Ray actor."""

    def __init__(self, spec: EncoderSpec, job_dir: str, model: Any = None) -> None:
        import torch

        from encoders import load_model

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.job = Job(Path(job_dir), 0, 0)
        self.base = Path(json.loads((self.job.dir / "job.json").read_text())["base"])
        self.model = model or load_model(
            spec.profile,
            checkpoint=Path(spec.checkpoint) if spec.checkpoint else None,
            backbone_checkpoint=Path(spec.backbone_checkpoint)
            if spec.backbone_checkpoint
            else None,
            device=spec.device,
        )
        if spec.weights_id and self.model.weights_id != spec.weights_id:
            raise GeolocError(
                f"this encoder loaded profile {spec.profile} with weights "
                f"{self.model.weights_id}, the job embeds with {spec.weights_id}: run every "
                "worker with the same geoloc release and checkpoint",
                type="weights-mismatch",
                status=409,
            )
        if model is None and self.model.device.type == "cpu":
            # ONNX Runtime runs on the CPU; an encoder on a GPU keeps torch's tower.
            from encoders.runtime import load_image_runtime

            load_image_runtime(
                self.model,
                Path(spec.runtimes_dir),
                spec.image_runtime,
                spec.image_precision,
                portable=spec.image_int8_portable,
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry point: a batch of shard numbers -> one summary row per shard."""
        stats = [self.encode_shard(int(s)) for s in batch["shard"]]
        return {k: np.array([st[k] for st in stats]) for k in ("shard", "ok", "bad", "seconds")}

    def encode_shard(self, shard: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        rows = pq.read_table(self.job.rows_file(shard)).to_pydict()
        n = len(rows["row"])
        width = np.asarray(rows.get("width_km", [np.nan] * n), dtype=np.float64)  # older jobs: none
        dim = self.model.embed_dim
        vectors = np.empty((n, dim), dtype=np.float32)
        structure = np.zeros((n, STRUCTURE_DIM), dtype=np.int8)
        colour = np.zeros((n, COLOUR_DIM), dtype=np.uint8)
        ok = np.zeros(n, dtype=bool)
        bad: list[dict[str, Any]] = []
        size = self.spec.batch_size
        for start in range(0, n, size):
            images, where = [], []
            for i in range(start, min(start + size, n)):
                try:
                    data = read_uri(rows["uri"][i], self.base, self.spec.limits.max_bytes)
                    images.append(
                        decode_image(
                            data,
                            self.spec.limits,
                            name=rows["uri"][i],
                        )
                    )
                    where.append(i)
                except InputImageError as exc:
                    bad.append(
                        asdict(
                            BadRow(
                                int(rows["row"][i]),
                                "" if rows["id"][i] < 0 else str(rows["id"][i]),
                                rows["uri"][i],
                                f"[{exc.type}] {exc.detail}",
                            )
                        )
                    )
            if images:
                vectors[where] = self.model.embed_images(images)
                structure[where] = structure_descriptors(images)
                colour[where] = colour_thumbnails(images)
                ok[where] = True
        out = self.job.out_file(shard)
        atomic_write(
            out,
            lambda fh: np.savez(
                fh,
                vectors=vectors[ok],
                structure=structure[ok],
                colour=colour[ok],
                id=np.asarray(rows["id"], dtype=np.int64)[ok],
                row=np.asarray(rows["row"], dtype=np.int64)[ok],
                latlon=np.column_stack([rows["lat"], rows["lon"]]).astype(np.float64)[ok],
                width=width[ok],
            ),
        )
        atomic_write(self.job.bad_file(shard), json.dumps(bad).encode())
        # The marker goes last: a shard killed before it is simply encoded again.
        atomic_write(self.job.done_file(shard), b"")
        return {
            "shard": shard,
            "ok": int(ok.sum()),
            "bad": len(bad),
            "seconds": time.perf_counter() - t0,
        }


ShardDone = Callable[[dict[str, Any]], None]


def run_inprocess(
    job: Job, shards: list[int], spec: EncoderSpec, on_done: ShardDone, model: Any = None
) -> None:
    encoder = ShardEncoder(spec, str(job.dir), model=model)
    for shard in shards:
        on_done(encoder.encode_shard(shard))


def run_on_ray(
    job: Job,
    shards: list[int],
    spec: EncoderSpec,
    on_done: ShardDone,
    *,
    address: str,
    num_cpus: int,
    actors: int,
) -> None:
    """Ray Data: a dataset of shard numbers mapped by a pool of encoder actors."""
    try:
        import ray
    except ImportError as exc:
        raise DatasetError(
            "this job runs on Ray, which is not installed: pip install 'geoloc[scale]' "
            "(or use --runner inprocess)"
        ) from exc
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": num_cpus}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar, the caller's, counts rows
        gpu = spec.device.startswith("cuda")
        cpus = ray.cluster_resources().get("CPU", num_cpus)
        per_actor = max(1.0, math.floor(cpus / max(actors, 1)))
        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        out = ds.map_batches(
            ShardEncoder,
            fn_constructor_kwargs={
                "spec": replace(spec, torch_threads=int(per_actor)),
                "job_dir": str(job.dir),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=per_actor if not gpu else 1,
            num_gpus=1 if gpu else 0,
        )
        for row in out.iter_rows():
            on_done({k: v.item() if hasattr(v, "item") else v for k, v in row.items()})
    finally:
        if started:
            ray.shutdown()


def choose_runner(runner: str, n_rows: int, *, ray_min_rows: int, ray_address: str) -> str:
    """'inprocess' or 'ray' for a requested runner ('auto' picks by job size)."""
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; use one of {RUNNERS}")
    if runner != "auto":
        return runner
    return "ray" if ray_address or n_rows >= ray_min_rows else "inprocess"


# ---------------------------------------------------------------------------------------------
# results


def iter_shard_points(job: Job) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(shard, ids, latlon) of every shard with embedded rows; the vectors stay on disk
    (an npz member is read only when asked for)."""
    for shard in range(job.n_shards):
        with np.load(job.out_file(shard), allow_pickle=False) as z:
            if len(z["row"]):
                yield shard, z["id"], z["latlon"]


def shard_vectors(job: Job, shard: int) -> np.ndarray:
    with np.load(job.out_file(shard), allow_pickle=False) as z:
        return z["vectors"]


def shard_member(job: Job, shard: int, member: str) -> np.ndarray:
    """One of a finished shard's SHARD_MEMBERS: "structure" (descriptors), "colour"
    (thumbnails), "width" (view widths in km, nan: unknown), ..."""
    with np.load(job.out_file(shard), allow_pickle=False) as z:
        return z[member]


def write_report(job: Job, input_bad: list[BadRow]) -> tuple[Path, list[BadRow]]:
    """report.json (counts) and bad_rows.csv (every bad row, why) in the job directory."""
    bad = list(input_bad)
    for shard in range(job.n_shards):
        bad += [BadRow(**b) for b in json.loads(job.bad_file(shard).read_text())]
    bad.sort(key=lambda b: b.row)
    with (job.dir / "bad_rows.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "id", "uri", "reason"])
        w.writerows([b.row, b.id, b.uri, b.reason] for b in bad)
    report = {
        "input": job.meta["input"],
        "rows": job.n_rows + len(input_bad),
        "embedded": job.n_rows - (len(bad) - len(input_bad)),
        "bad_rows": len(bad),
        "bad_coordinates_or_ids": len(input_bad),
        "bad_images": len(bad) - len(input_bad),
        "bad_rows_file": str(job.dir / "bad_rows.csv"),
        "shards": job.n_shards,
    }
    atomic_write(job.dir / "report.json", json.dumps(report, indent=2).encode())
    return job.dir / "report.json", bad
