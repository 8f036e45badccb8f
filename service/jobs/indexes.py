"""Build indexes: the GPS gallery (H3 cells or CSV points) and the reference-image index, each
published atomically under the build lock and registered in the database. The CLI
(`geoloc index build`, `geoloc images add`) and `geoloc setup` call these.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders import GeoModel
from encoders.model import resolve_device
from encoders.structure import COLOUR_DIM, STRUCTURE_DIM
from index.gallery import Gallery, csv_gallery, encode_gallery, h3_gallery
from index.geocode import ReverseGeocoder
from index.store import (
    WEIGHTS_KEY,
    IndexStoreError,
    Manifest,
    PointTable,
    VectorChunk,
    latest_version,
    list_indexes,
    load_index,
    publish_index,
    publish_index_chunked,
    remove_unfinished,
)
from service.config import Settings
from service.db import index_build_lock
from service.errors import GeolocError


@dataclass(frozen=True)
class GallerySpec:
    kind: str  # "h3" | "csv"
    res: int = 4
    land_only: bool = True
    csv: Path | None = None

    def build(self) -> Gallery:
        if self.kind == "h3":
            return h3_gallery(self.res, land_only=self.land_only)
        if self.kind == "csv":
            if self.csv is None:
                raise ValueError("a csv gallery needs --csv PATH")
            return csv_gallery(self.csv)
        raise ValueError(f"unknown gallery kind '{self.kind}'; use 'h3' or 'csv'")


def build_index(
    settings: Settings,
    name: str,
    spec: GallerySpec,
    *,
    model: GeoModel,
    factory: str = "Flat",
    batch_size: int = 4096,
    progress: bool = True,
) -> Manifest:
    """Encode a gallery with the profile's GPS tower and publish it as a new version.

    Holds the build lock of ``name`` throughout, so two builds of one name never both publish
    (IndexBuildLockedError for the second), and first clears what killed builds left behind.
    """
    with index_build_lock(settings.db_url, name, settings.database_connect_timeout_s):
        remove_unfinished(settings.index_dir, name)
        return _build_index(
            settings,
            name,
            spec,
            model=model,
            factory=factory,
            batch_size=batch_size,
            progress=progress,
        )


def _build_index(
    settings: Settings,
    name: str,
    spec: GallerySpec,
    *,
    model: GeoModel,
    factory: str,
    batch_size: int,
    progress: bool,
) -> Manifest:
    t0 = time.perf_counter()
    gallery = spec.build()
    t_gallery = time.perf_counter()
    vectors = encode_gallery(
        gallery, model.embed_gps, model.embed_dim, batch_size=batch_size, progress=progress
    )
    t_encode = time.perf_counter()
    countries = ReverseGeocoder().country_codes(gallery.latlon)
    points = PointTable(ids=gallery.ids, latlon=gallery.latlon, country=countries)
    manifest = publish_index(
        settings.index_dir,
        name,
        vectors,
        points,
        profile=model.profile,
        gallery_kind=gallery.kind,
        h3_resolution=gallery.h3_resolution,
        factory=factory,
        extra={
            WEIGHTS_KEY: model.weights_id,
            "source": gallery.source,
            "land_mask": "roaring-landmask (GSHHG)"
            if spec.kind == "h3" and spec.land_only
            else None,
            "gallery_seconds": round(t_gallery - t0, 3),
            "encode_seconds": round(t_encode - t_gallery, 3),
            "points_per_second": round(len(gallery.ids) / max(t_encode - t_gallery, 1e-9), 1),
            "embedding_bytes": int(np.asarray(vectors).nbytes),
        },
    )
    return manifest


@dataclass(frozen=True)
class ReferencesAdded:
    manifest: Manifest
    problems: list[str]  # one line per bad row
    report: Path  # report.json of the job (bad_rows.csv beside it)
    runner: str  # "inprocess" or "ray"
    resumed_shards: int  # shards a previous run had finished
    already_published: bool = False

    @property
    def left_out(self) -> str:
        """Why the previous version's images are not in the new version ("": they are)."""
        d = self.manifest.extra.get("left_out")
        if not d or self.already_published:
            return ""
        why = (
            "--replace"
            if d["reason"] == "replace"
            else f"they were embedded with weights {d['weights']}, the model has "
            f"{self.manifest.weights}"
        )
        return f"the {d['images']} images of {d['index']} are not in the new version ({why})"


def add_reference_images(
    settings: Settings,
    data: Path,
    *,
    model: GeoModel,
    name: str = "",
    batch_size: int = 64,
    progress: bool = True,
    runner: str = "auto",
    ray_address: str = "",
    shard_rows: int = 0,
    actors: int = 0,
    factory: str = "",
    device: str = "",
    replace: bool = False,
) -> ReferencesAdded:
    """Embed a table of reference photos (CSV or Parquet: uri, lat, lon, optional id) into
    the image-neighbour index: a new version that also holds the previous version's images,
    unless ``replace`` or they were embedded with other weights than the model's (they would
    be another model's vectors); the new version's manifest then says so (``left_out``).

    The work is a resumable job (service/jobs/references.py): shards with done-markers, encoded in
    this process or on Ray (``runner``; 'auto' picks Ray at GEOLOC_REFS_RAY_MIN_ROWS rows),
    on ``device`` ('auto': CUDA when a GPU is visible; default GEOLOC_DEVICE).
    Bad rows are listed in the job's report, never stop it. Above
    GEOLOC_COMPRESSED_MIN_ROWS vectors the index is compressed (IVF-PQ, merged on disk).
    """
    from tqdm import tqdm

    from service.jobs import references as refjobs

    name = name or f"refs-{model.profile}"
    with index_build_lock(settings.db_url, name, settings.database_connect_timeout_s):
        remove_unfinished(settings.index_dir, name)
        job, input_bad = refjobs.prepare_job(
            settings.data_dir / "jobs",
            data,
            index_name=name,
            profile=model.profile,
            checkpoint=str(settings.checkpoint) if settings.checkpoint else None,
            weights=model.weights_id,
            shard_rows=shard_rows or settings.refs_shard_rows,
            image_runtime=f"{settings.image_runtime}-{settings.image_precision}",
        )
        done = job.done()
        chosen = refjobs.choose_runner(
            runner,
            job.n_rows,
            ray_min_rows=settings.refs_ray_min_rows,
            ray_address=ray_address or settings.ray_address,
        )
        # A replacing run publishes again from the finished shards: the version it published
        # before may no longer be the newest.
        if job.meta.get("published") and not replace:
            report, bad = refjobs.write_report(job, input_bad)
            version = job.meta["published"].split("/", 1)[1]
            m = next(m for m in list_indexes(settings.index_dir, name) if m.version == version)
            return ReferencesAdded(m, _bad_lines(data, bad), report, chosen, len(done), True)
        spec = refjobs.EncoderSpec(
            profile=model.profile,
            checkpoint=str(settings.checkpoint) if settings.checkpoint else None,
            backbone_checkpoint=str(settings.backbone_checkpoint)
            if settings.backbone_checkpoint
            else None,
            device=resolve_device(device or settings.device),
            batch_size=batch_size,
            limits=settings.image_limits(),
            torch_threads=settings.torch_threads,
            weights_id=model.weights_id,
            image_runtime=settings.image_runtime,
            image_precision=settings.image_precision,
            runtimes_dir=str(settings.runtimes_dir),
            image_int8_portable=settings.image_int8_portable,
        )
        pending = job.pending()
        initial = job.n_rows - sum(job.shard_rows(s) for s in pending)
        with tqdm(
            total=job.n_rows, initial=initial, disable=not progress, unit="img", desc="embedding"
        ) as bar:

            def on_done(stat: dict) -> None:
                bar.update(job.shard_rows(int(stat["shard"])))

            if pending and chosen == "ray":
                refjobs.run_on_ray(
                    job,
                    pending,
                    spec,
                    on_done,
                    address=ray_address or settings.ray_address,
                    num_cpus=settings.ray_num_cpus,
                    actors=actors or settings.ray_actors,
                )
            elif pending:
                # The caller's model serves when it is on the job's device; else one is loaded.
                own = model if torch.device(spec.device) == model.device else None
                refjobs.run_inprocess(job, pending, spec, on_done, model=own)
        report, bad = refjobs.write_report(job, input_bad)
        manifest = _publish_references(
            settings, name, job, model=model, factory=factory, replace=replace
        )
        job.meta["published"] = f"{manifest.name}/{manifest.version}"
        job.save_meta()
    return ReferencesAdded(manifest, _bad_lines(data, bad), report, chosen, len(done))


def _bad_lines(data: Path, bad: list) -> list[str]:
    return [f"{data}: row {b.row}: {b.reason}" for b in bad]


def _publish_references(
    settings: Settings, name: str, job: Any, *, model: GeoModel, factory: str, replace: bool
) -> Manifest:
    """The previous version's images plus the job's shards, as one new index version."""
    from service.jobs import references as refjobs

    try:
        old = load_index(
            settings.index_dir,
            name,
            latest_version(settings.index_dir, name),
            profile=model.profile,
            dim=model.embed_dim,
        )
    except IndexStoreError:
        old = None
    left_out = None
    if old is not None and (replace or old.manifest.weights not in (None, model.weights_id)):
        # Vectors of other weights would sit beside this model's and match nothing it embeds.
        left_out = {
            "index": f"{name}/{old.manifest.version}",
            "images": len(old),
            "weights": old.manifest.weights,
            "reason": "replace" if replace else "other weights",
        }
        old = None
    if old is not None and old.manifest.factory != "Flat" and old.exact is None:
        # Its vectors exist only as compression codes: re-adding them decoded would compress
        # them twice (and they are no longer unit length). An index that kept its exact
        # vectors (GEOLOC_INDEX_RERANK_K > 0) is rebuilt from those instead.
        raise GeolocError(
            f"reference index {name} ({old.manifest.version}) is compressed "
            f"({old.manifest.factory}) without its exact vectors; adding images to it is not "
            "supported: add every table to a new index name in one job (with "
            "GEOLOC_INDEX_RERANK_K > 0 it keeps them), or raise GEOLOC_COMPRESSED_MIN_ROWS",
            type="invalid-option",
            status=422,
        )
    n_old = len(old) if old is not None else 0
    # Ids and positions only: each shard's vectors are read when its chunk is wanted.
    shards = list(refjobs.iter_shard_points(job))
    n_new = sum(len(ids) for _, ids, _ in shards)
    if not n_new:
        raise GeolocError(f"no usable images in {job.meta['input']}", type="invalid-dataset")
    # Rows without an id get the next free ones after the previous version's.
    next_id = int(np.max(old.points.ids)) + 1 if n_old else 0
    given = np.concatenate([ids for _, ids, _ in shards])
    own = given[given >= 0]
    clash = own[np.isin(own, np.asarray(old.points.ids))] if n_old else own[:0]
    if clash.size:
        raise GeolocError(
            f"ids {clash[:5].tolist()} are already in index {name}; use new ids or none",
            type="invalid-dataset",
        )
    next_id = max(next_id, int(given.max()) + 1)
    geocoder = ReverseGeocoder()
    new_points: list[tuple[int, PointTable]] = []
    for shard, ids, latlon in shards:
        missing = ids < 0
        ids[missing] = np.arange(next_id, next_id + int(missing.sum()))
        next_id += int(missing.sum())
        new_points.append((shard, PointTable(ids, latlon, geocoder.country_codes(latlon))))
    total = n_old + n_new

    def chunks() -> Iterator[VectorChunk]:
        step = 65_536
        for start in range(0, n_old, step):
            rows = np.arange(start, min(start + step, n_old))
            yield VectorChunk(
                old.vectors(rows),  # type: ignore[union-attr]
                PointTable(
                    ids=np.asarray(old.points.ids[rows]),  # type: ignore[union-attr]
                    latlon=np.asarray(old.points.latlon[rows]),  # type: ignore[union-attr]
                    country=np.asarray(old.points.country[rows]),  # type: ignore[union-attr]
                    structure=old_rows(old.points.structure, rows, STRUCTURE_DIM, np.int8),  # type: ignore[union-attr]
                    width=old_width(rows),
                    colour=old_rows(old.points.colour, rows, COLOUR_DIM, np.uint8),  # type: ignore[union-attr]
                ),
            )
        for shard, points in new_points:
            yield VectorChunk(
                refjobs.shard_vectors(job, shard),
                PointTable(
                    ids=points.ids,
                    latlon=points.latlon,
                    country=points.country,
                    structure=refjobs.shard_member(job, shard, "structure"),
                    width=refjobs.shard_member(job, shard, "width"),
                    colour=refjobs.shard_member(job, shard, "colour"),
                ),
            )

    def old_rows(stored: np.ndarray | None, rows: np.ndarray, dim: int, dtype: type) -> np.ndarray:
        """Carried images' descriptors or thumbnails; zeros (unknown) from a version that has
        none, or has them of another kind (another size)."""
        if stored is None or stored.shape[1] != dim:
            return np.zeros((len(rows), dim), dtype=dtype)
        return np.asarray(stored[rows])

    def old_width(rows: np.ndarray) -> np.ndarray:
        """Carried images' view widths; nan (unknown) from a version that has none."""
        stored = old.points.width  # type: ignore[union-attr]
        return np.full(len(rows), np.nan) if stored is None else np.asarray(stored[rows])

    extra = {
        # Images carried from a version that records no weights keep the new one unrecorded
        # too: which model embedded them is unknown.
        WEIGHTS_KEY: model.weights_id if old is None or old.manifest.weights else None,
        "left_out": left_out,
        "source": job.meta["input"],
        "added": n_new,
        "image_runtime": job.meta.get("image_runtime", "torch-fp32"),  # what embedded them
        "job": str(job.dir),
        "report": str(job.dir / "report.json"),
    }
    compressed = factory not in ("", "Flat") or (
        not factory and total >= settings.compressed_min_rows
    )
    if not compressed:
        parts = list(chunks())
        width = np.concatenate([p.points.width for p in parts])  # type: ignore[misc]
        return publish_index(
            settings.index_dir,
            name,
            np.concatenate([p.vectors for p in parts]),
            PointTable(
                ids=np.concatenate([p.points.ids for p in parts]),
                latlon=np.concatenate([p.points.latlon for p in parts]),
                country=np.concatenate([p.points.country for p in parts]),
                structure=np.concatenate([p.points.structure for p in parts]),  # type: ignore[misc]
                colour=np.concatenate([p.points.colour for p in parts]),  # type: ignore[misc]
                width=width if np.isfinite(width).any() else None,  # stored where some known
            ),
            profile=model.profile,
            gallery_kind="images",
            h3_resolution=None,
            extra=extra,
        )
    # Training sample: the same share of every chunk, up to GEOLOC_INDEX_TRAIN_SIZE vectors.
    rng = np.random.default_rng(0)
    share = min(1.0, settings.index_train_size / total)
    train = np.concatenate([c.vectors[rng.random(len(c.vectors)) < share] for c in chunks()])
    return publish_index_chunked(
        settings.index_dir,
        name,
        chunks,
        count=total,
        dim=model.embed_dim,
        train_vectors=train,
        profile=model.profile,
        gallery_kind="images",
        factory=factory,
        extra=extra,
        device=settings.faiss_device,
        recall_queries=settings.index_recall_queries,
        nprobe=settings.index_nprobe,
        rerank_k=settings.index_rerank_k,
    )
