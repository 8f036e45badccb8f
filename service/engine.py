"""Domain functions that join settings, encoders and index: load a Locator, build an index.

The CLI and the HTTP app call these; they hold no parsing or presentation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encoders import GeoModel, load_model
from index.gallery import Gallery, csv_gallery, encode_gallery, h3_gallery
from index.geocode import ReverseGeocoder
from index.store import (
    IndexStoreError,
    Manifest,
    PointTable,
    latest_version,
    list_indexes,
    load_index,
    publish_index,
)
from service.datasets import read_labelled_csv
from service.errors import GeolocError
from service.images import read_image_files
from service.pipeline import Locator
from service.settings import Settings


def load_geomodel(
    settings: Settings, profile: str | None = None, random_backbone: bool = False
) -> GeoModel:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return load_model(
        profile or settings.profile,
        checkpoint=settings.checkpoint,
        backbone_checkpoint=settings.backbone_checkpoint,
        random_backbone=random_backbone,
        device=settings.device,
    )


def load_locator(
    settings: Settings,
    *,
    model: GeoModel | None = None,
    index_name: str | None = None,
    index_version: str | None = None,
) -> Locator:
    """Load model (unless given), indexes and geocoder once; check they belong together."""
    model = model or load_geomodel(settings)
    index = load_index(
        settings.index_dir,
        index_name or settings.default_index,
        index_version or settings.index_version or None,
        profile=model.profile,
        dim=model.embed_dim,
    )
    refs_name = settings.reference_index or f"refs-{model.profile}"
    neighbours = None
    if any(m.name == refs_name for m in list_indexes(settings.index_dir)):
        neighbours = load_index(
            settings.index_dir, refs_name, profile=model.profile, dim=model.embed_dim
        )
    elif settings.reference_index:
        raise IndexStoreError(
            f"reference index '{refs_name}' does not exist; "
            "create it with `geoloc images add DATA.csv`"
        )
    return Locator(model, index, ReverseGeocoder(), neighbours=neighbours)


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
    """Encode a gallery with the profile's GPS tower and publish it as a new version."""
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


def add_reference_images(
    settings: Settings,
    data: Path,
    *,
    model: GeoModel,
    name: str = "",
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[Manifest, list[str]]:
    """Embed labelled reference photos into the image-neighbour index (a new version that
    holds the previous version's images too). Returns the manifest and the bad rows."""
    from tqdm import tqdm

    name = name or f"refs-{model.profile}"
    rows, problems = read_labelled_csv(data)
    vectors, latlon, kept = [], [], 0
    with tqdm(total=len(rows), disable=not progress, unit="img") as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images, ok, bad = read_image_files(
                [r.path for r in chunk],
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
            )
            latlon += [(chunk[i].lat, chunk[i].lon) for i in ok]
            failed = sorted(set(range(len(chunk))) - set(ok))
            problems += [
                f"{data}:{chunk[i].line}: {msg}" for i, msg in zip(failed, bad, strict=True)
            ]
            if images:
                vectors.append(model.embed_images(images))
                kept += len(images)
            bar.update(len(chunk))
    if not kept:
        raise GeolocError(f"no usable images in {data}", type="invalid-dataset")
    new_vec = np.concatenate(vectors)
    new_pts = np.asarray(latlon, dtype=np.float64)
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
    if old is not None:
        n_old = len(old)
        new_vec = np.concatenate([old.vectors(np.arange(n_old)), new_vec])
        new_pts = np.concatenate([np.asarray(old.points.latlon), new_pts])
    countries = ReverseGeocoder().country_codes(new_pts)
    points = PointTable(
        ids=np.arange(len(new_pts), dtype=np.int64), latlon=new_pts, country=countries
    )
    manifest = publish_index(
        settings.index_dir,
        name,
        new_vec,
        points,
        profile=model.profile,
        gallery_kind="images",
        h3_resolution=None,
        extra={"source": str(data), "added": kept},
    )
    return manifest, problems
