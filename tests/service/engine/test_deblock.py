"""A heavily compressed JPEG is smoothed when it is decoded; other pictures pass untouched."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from encoders.bluemarble import load_map, render_tile
from service.engine.images import blockiness, decode_image
from service.engine.options import ImageLimits

ON = ImageLimits(1 << 25, 40_000_000, deblock_above=5.0)
OFF = ImageLimits(1 << 25, 40_000_000)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tiles(n: int = 12) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    m = load_map()
    return [
        render_tile(float(rng.uniform(-50, 60)), float(rng.uniform(-170, 170)), 1.5, 64, m)
        for _ in range(n)
    ]


def test_blockiness_rises_as_jpeg_quality_falls():
    tiles = _tiles()
    median = {
        q: float(np.median([blockiness(decode_image(_jpeg(t, q), OFF)) for t in tiles]))
        for q in (95, 50, 8)
    }
    clean = float(np.median([blockiness(t) for t in tiles]))
    assert clean < 1.3 and median[95] < 1.5 < median[50] < 5.0 < median[8]
    # Phase-free: the same picture shifted by 3 pixels (its blocks no longer at 0, 8, ...).
    shifted = decode_image(_jpeg(tiles[0], 8), OFF).crop((3, 3, 64, 64))
    assert blockiness(shifted) > 5.0


def test_decode_smooths_only_heavily_compressed_pictures():
    tile = _tiles(1)[0]
    heavy = _jpeg(tile, 8)
    smoothed, raw = decode_image(heavy, ON), decode_image(heavy, OFF)
    assert blockiness(smoothed) < 5.0 < blockiness(raw)
    # Closer to the picture before compression than the blocks were.
    truth = np.asarray(tile, np.float32)
    err = {
        k: np.abs(np.asarray(v, np.float32) - truth).mean()
        for k, v in (("s", smoothed), ("r", raw))
    }
    assert err["s"] < err["r"]
    # A lossless or lightly compressed picture is left exactly as decoded.
    for data in (_png(tile), _jpeg(tile, 90)):
        assert np.array_equal(
            np.asarray(decode_image(data, ON)), np.asarray(decode_image(data, OFF))
        )


def test_a_picture_whose_colours_the_codec_flattened_is_never_read_as_a_ramp():
    """Quality 8 keeps a few chroma levels per 16 x 16 block, so a true-colour view's colours
    may fall on one curve: the decoder that smooths such a picture marks it, and its layout is
    its luminance's, with no ramp (nor grey view) read from it."""
    from encoders.structure import COLOURS_FLATTENED, picture_descriptors, structure_descriptors

    tiles = _tiles(60)
    decoded = [decode_image(_jpeg(t, 8), ON) for t in tiles]
    heavy = [im for im in decoded if im.info.get(COLOURS_FLATTENED)]
    assert len(heavy) >= 30  # the smoothed ones (a near-flat view has no blocks to see)
    assert all(
        blockiness(decode_image(_jpeg(t, 8), OFF)) >= 5.0
        for t, im in zip(tiles, decoded, strict=True)
        if im.info.get(COLOURS_FLATTENED)
    )
    assert not any(decode_image(_jpeg(t, 90), ON).info.get(COLOURS_FLATTENED) for t in tiles)
    reading = picture_descriptors(heavy)
    assert all(r is None for r in reading.ramps) and not reading.unsure.any()
    assert np.array_equal(reading.descriptors, structure_descriptors(heavy))
    # The same pixels unmarked: some of them read as ramps.
    unmarked = [Image.fromarray(np.asarray(im)) for im in heavy]
    assert any(r is not None for r in picture_descriptors(unmarked).ramps)


def test_a_picture_cannot_claim_flattened_colours_itself():
    """The mark is the decoder's alone: a PNG text chunk of the same name does not set it."""
    from PIL import PngImagePlugin

    from encoders.structure import COLOURS_FLATTENED

    meta = PngImagePlugin.PngInfo()
    meta.add_text(COLOURS_FLATTENED, "yes")
    buf = io.BytesIO()
    _tiles(1)[0].save(buf, format="PNG", pnginfo=meta)
    assert Image.open(io.BytesIO(buf.getvalue())).info.get(COLOURS_FLATTENED) == "yes"
    assert decode_image(buf.getvalue(), ON).info[COLOURS_FLATTENED] is False
