"""`geoloc eval` measures what the service answers: pictures are read as the service reads
them, grey views of pictures in false colour included."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image

from encoders import load_model
from encoders.bluemarble import load_map, luma, render_tile, sample_centres
from index.geo import is_land
from index.geocode import ReverseGeocoder
from index.store import load_index
from service.config import Settings
from service.engine.images import read_image_files
from service.engine.locator import Locator
from service.engine.options import LocateOptions
from service.jobs.datasets import LabelledImage
from service.jobs.evaluate import embed_rows
from service.jobs.indexes import GallerySpec, build_index


def test_eval_locates_false_colour_pictures_from_their_grey_views_as_the_service_does(
    tmp_path,
):
    settings = Settings(data_dir=tmp_path / "data")
    model = load_model("bluemarble")
    build_index(settings, "bm", GallerySpec(kind="h3", res=2), model=model, progress=False)
    locator = Locator(model, load_index(settings.data_dir, "bm"), ReverseGeocoder())
    rng = np.random.default_rng(21)
    mosaic, jet = load_map(), matplotlib.colormaps["jet"]
    rows = []
    for i, (lat, lon) in enumerate(sample_centres(16, rng, is_land, sea_weight=0.0)):
        tile = np.asarray(render_tile(lat, lon, 2.0, 64, mosaic), np.float32) / 255.0
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.round(jet(luma(tile))[..., :3] * 255).astype(np.uint8)).save(path)
        rows.append(LabelledImage(i + 2, path, float(lat), float(lon)))
    limits = settings.image_limits()
    opts = LocateOptions(top_k=1)

    emb = embed_rows(locator, rows, limits=limits, batch_size=8, grey_views=True)
    assert emb.views is not None and sum(v is not None for v in emb.views) >= 14
    measured = []
    for start in range(0, len(rows), 8):
        part = slice(start, start + 8)
        measured += locator.locate_embeddings(emb.vectors[part], opts, **emb.part(part))
    served = locator.locate(read_image_files([r.path for r in rows], limits)[0], opts)
    assert any("grey_view" in r.stages for r in served)
    for got, want in zip(measured, served, strict=True):
        assert ("grey_view" in got.stages) == ("grey_view" in want.stages)
        assert (got.candidates[0].lat, got.candidates[0].lon) == pytest.approx(
            (want.candidates[0].lat, want.candidates[0].lon), abs=1e-4
        )
