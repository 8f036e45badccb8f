"""Structure descriptors: blind to colour, haze, gamma and colour ramps; not to where things
are."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from encoders.bluemarble import (
    ATLAS_TINTS,
    apply_palette,
    load_map,
    render_tile,
    rotate_hue,
    sample_centres,
)
from encoders.structure import (
    COLOUR_DIM,
    RAMP_LEVELS,
    STRUCTURE_DIM,
    colour_agreement,
    colour_thumbnails,
    picture_descriptors,
    ramp_position,
    ramp_view,
    structure_descriptors,
    structure_similarity,
)
from index.geo import is_land


def _tiles(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(11)
    mosaic = load_map()
    return [render_tile(a, o, 1.5, 64, mosaic) for a, o in sample_centres(n, rng, is_land, 0.0)]


def _floats(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.float32) / 255.0


def _image(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8))


def test_renderings_of_one_place_match_and_other_places_do_not():
    tiles = _tiles(24)
    d = structure_descriptors(tiles)
    assert d.dtype == np.int8 and d.shape == (24, STRUCTURE_DIM)
    changes = {
        "hue 120": lambda im: _image(rotate_hue(_floats(im), 120.0)),
        "grayscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
        "gamma 0.5": lambda im: _image(_floats(im) ** 0.5),
        "haze": lambda im: _image(0.4 * _floats(im) + 0.6 * np.array([0.8, 0.82, 0.86])),
    }
    for name, change in changes.items():
        shifted = structure_descriptors([change(t) for t in tiles])
        same = np.array(
            [structure_similarity(a, b[None])[0] for a, b in zip(d, shifted, strict=True)]
        )
        assert np.median(same) > 0.9, name
    others = np.array([structure_similarity(d[i], np.delete(d, i, 0)) for i in range(len(d))])
    assert np.median(np.abs(others)) < 0.4
    assert np.median(same) - np.median(others) > 0.5


def test_flat_pictures_have_no_layout_and_match_nothing():
    d = structure_descriptors([Image.new("RGB", (40, 30), (90, 120, 30)), _tiles(1)[0]])
    assert not d[0].any()
    assert structure_similarity(d[0], d[1:])[0] == 0.0


def test_a_picture_is_framed_as_its_centre_square():
    tile = _tiles(1)[0]
    wide = Image.new("RGB", (128, 64), (0, 0, 0))
    wide.paste(tile, (32, 0))
    np.testing.assert_array_equal(structure_descriptors([wide]), structure_descriptors([tile]))


def _through_ramp(tile: Image.Image) -> Image.Image:
    """The tile's luminance drawn through a smooth colour ramp whose own luminance rises,
    falls and rises again (red grows while green and blue swing against each other)."""
    y = _floats(ImageOps.grayscale(tile))
    t = (y - y.min()) / max(float(np.ptp(y)), 1e-6)
    swing = np.sin(3.0 * np.pi * t)
    return _image(np.stack([t, 0.5 + 0.4 * swing, 0.5 - 0.2 * swing], axis=-1))


def test_a_false_colour_picture_is_laid_out_along_its_ramp():
    tiles = _tiles(24)
    grey = structure_descriptors([ImageOps.grayscale(t).convert("RGB") for t in tiles])
    ramped = [_through_ramp(t) for t in tiles]
    read = [ramp_position(np.asarray(r)) is not None for r in ramped]
    assert sum(read) >= 20
    reading = picture_descriptors(ramped)
    along, unsure = reading.descriptors, reading.unsure
    np.testing.assert_array_equal(structure_descriptors(ramped, follow_ramps=True), along)
    # Its luminance rises and falls: the direction of most is unsure, and only of ramps.
    assert unsure.sum() >= 12 and not np.any(unsure & ~np.array(read))
    # A ramp whose luminance rises with it runs surely dark to bright.
    rising = [
        _image(np.repeat(_floats(ImageOps.grayscale(t))[..., None], 3, axis=-1) ** [1, 0.7, 0.4])
        for t in tiles
    ]
    assert all(ramp_position(np.asarray(r)) is not None for r in rising)
    assert not picture_descriptors(rising).unsure.any()
    # What luminance alone makes of the same pictures; references are always described so.
    luminance = structure_descriptors([ImageOps.grayscale(r).convert("RGB") for r in ramped])
    np.testing.assert_array_equal(structure_descriptors(ramped), luminance)

    def same(a: np.ndarray) -> float:
        return float(
            np.median([structure_similarity(x, y[None])[0] for x, y in zip(a, grey, strict=True)])
        )

    assert same(along) > 0.9
    assert same(along) - same(luminance) > 0.2


def _through_tints(tile: Image.Image) -> Image.Image:
    """The tile's luminance, stretched to [0, 1], drawn through the atlas tints."""
    y = _floats(ImageOps.grayscale(tile))
    return _image(apply_palette((y - y.min()) / max(float(np.ptp(y)), 1e-6), ATLAS_TINTS))


def test_a_ramp_that_turns_sharply_is_read_with_its_bends(monkeypatch):
    """Near a sharp bend the ramp's two arms lie a step apart and the bend's tip hangs off the
    curve; a few such tips are still a ramp's, laid out where they hang."""
    import encoders.structure as structure

    tiles = _tiles(24)
    pictures = [_through_tints(t) for t in tiles]
    grey = structure_descriptors([ImageOps.grayscale(t).convert("RGB") for t in tiles])
    reading = picture_descriptors(pictures)
    read = [i for i, ramp in enumerate(reading.ramps) if ramp is not None]
    assert len(read) >= 14
    same = [structure_similarity(reading.descriptors[i], grey[i][None])[0] for i in read]
    assert np.median(same) > 0.9
    monkeypatch.setattr(structure, "RAMP_TIPS", 0)  # no tips: the bends break the curve
    assert sum(ramp_position(np.asarray(p)) is not None for p in pictures) <= len(read) - 6


def _curve_with_a_tip(length: int) -> np.ndarray:
    """64x64 colours whose red rises over ``length`` steps of the ramp reader's quantisation,
    with a tip three steps deep off the middle of the curve (48 pixels)."""
    k = np.minimum(np.arange(64) * length // 63, length)
    levels = np.zeros((64, 64, 3), int)
    levels[..., 0] = 10 + k[None, :]
    levels[..., 1:] = 30
    for depth in (1, 2, 3):
        levels[8 * (depth - 1) : 8 * depth, 30:32] = (10 + k[30], 30 + depth, 30)
    return (levels * (256 // RAMP_LEVELS) + 2).astype(np.uint8)


def test_a_few_steps_off_a_short_curve_are_no_bend(monkeypatch):
    """A tip a few steps deep is a bend's on a long curve; on a short one (a dull picture's few
    colours) the same steps are a large part of the whole, and it is no ramp."""
    import encoders.structure as structure

    assert ramp_position(_curve_with_a_tip(50)) is not None
    assert ramp_position(_curve_with_a_tip(16)) is None
    monkeypatch.setattr(structure, "RAMP_TIP_LENGTH", 0.0)
    assert ramp_position(_curve_with_a_tip(16)) is not None


def test_each_limit_on_bend_tips_alone_breaks_a_ramp():
    """Colours off a curve are bend tips only while every limit holds: few places, few steps
    off, few colours at a place, a long curve. Breaking any one of them alone is no ramp."""
    from encoders.structure import (
        RAMP_TIP_COLOURS,
        RAMP_TIP_LENGTH,
        RAMP_TIP_STEPS,
        RAMP_TIPS,
        _bend_tips,
    )

    def tips(places: int, colours: int, steps: float, length: float) -> bool:
        hung_at = np.repeat(np.linspace(5.0, length - 5.0, places), colours)
        return _bend_tips(hung_at, np.full(hung_at.size, steps), length)

    ok = (RAMP_TIPS, RAMP_TIP_COLOURS, RAMP_TIP_STEPS, RAMP_TIP_LENGTH)
    assert tips(*ok)
    assert not tips(RAMP_TIPS + 1, *ok[1:])
    assert not tips(ok[0], RAMP_TIP_COLOURS + 1, *ok[2:])
    assert not tips(*ok[:2], RAMP_TIP_STEPS + 0.5, ok[3])
    assert not tips(*ok[:3], RAMP_TIP_LENGTH - 1.0)


def test_a_ramp_seen_in_grey_follows_the_quantity_it_draws():
    """The grey view of a false-colour picture is the layout of what its ramp draws: its
    luminance where the ramp surely rises, its position along the ramp (turned as the caller
    says) where the direction is unsure; at any size, colours the sample missed too."""
    from scipy.stats import spearmanr

    def order(a: Image.Image, b: Image.Image) -> float:
        return float(spearmanr(np.asarray(a.convert("L")).ravel(), np.asarray(b).ravel())[0])

    seen = {True: 0, False: 0}
    for tile in _tiles(12):
        grey = ImageOps.grayscale(tile)
        rising = _image(np.repeat(_floats(grey)[..., None], 3, axis=-1) ** [1, 0.7, 0.4])
        for picture in (_through_ramp(tile), rising):
            ramp = picture_descriptors([picture]).ramps[0]
            if ramp is None:
                continue
            seen[ramp.sure] += 1
            view = ramp_view(picture, ramp)
            assert view.size == picture.size and view.mode == "RGB"
            if ramp.sure:
                assert view.tobytes() == picture.convert("L").convert("RGB").tobytes()
            else:
                turned = np.asarray(ramp_view(picture, ramp, turned=True), np.int16)
                assert np.abs(turned + np.asarray(view, np.int16) - 255).max() <= 1
            assert abs(order(view, grey)) > 0.95  # the read direction may be either
            big = picture.resize((200, 200), Image.Resampling.BICUBIC)  # colours in between
            assert abs(order(ramp_view(big, ramp), grey.resize((200, 200)))) > 0.9
    assert seen[True] >= 10 and seen[False] >= 6


def test_true_colour_views_and_drawings_are_not_ramps():
    tiles = _tiles(40)
    read = [ramp_position(np.asarray(t)) is not None for t in tiles]
    assert np.mean(read) <= 0.1
    drawing = Image.new("RGB", (96, 96), (20, 40, 160))
    pen = ImageDraw.Draw(drawing)
    pen.rectangle((10, 10, 50, 70), fill=(200, 180, 40))
    assert ramp_position(np.asarray(drawing)) is None  # two flat colours
    pen.ellipse((40, 30, 90, 90), fill=(30, 150, 60))
    # Soft edges blend each pair of its three colours: three curves, not one.
    assert ramp_position(np.asarray(drawing.filter(ImageFilter.GaussianBlur(2)))) is None


def test_colour_agreement_credits_only_close_colour_matches():
    """A tile's own colours agree fully, a lightly re-encoded copy's nearly, other places' and
    the same place in shifted colours (a hue turn, a gamma, grey) not at all, though their
    layouts still match; a flat grey picture and unknown references never agree."""
    tiles = _tiles(12)
    thumbs = colour_thumbnails(tiles)
    assert thumbs.dtype == np.uint8 and thumbs.shape == (12, COLOUR_DIM)
    framed = ImageOps.expand(tiles[0], border=(16, 0), fill=(255, 0, 0))  # wider: centre square
    np.testing.assert_array_equal(colour_thumbnails([framed])[0], thumbs[0])

    own = colour_agreement(thumbs[0], thumbs, 0.6)
    assert own[0] == 1.0 and own.shape == (12,)
    assert (own[1:] < 0.5).mean() >= 0.9  # other places
    for tile, thumb in zip(tiles, thumbs, strict=True):
        buf = io.BytesIO()
        tile.save(buf, "JPEG", quality=75)
        again = colour_thumbnails([Image.open(buf)])[0]
        assert colour_agreement(again, thumb[None], 0.6)[0] > 0.8
    x = _floats(tiles[0])
    for shifted in (_image(rotate_hue(x, 135.0)), _image(x**0.6), tiles[0].convert("L")):
        p = colour_thumbnails([shifted.convert("RGB")])[0]
        assert colour_agreement(p, thumbs[:1], 0.6)[0] == 0.0
        assert structure_similarity(structure_descriptors([shifted])[0], _desc(tiles[:1]))[0] > 0.8

    grey = colour_thumbnails([Image.new("RGB", (32, 32), (90, 90, 90))])[0]
    assert not colour_agreement(grey, thumbs, 0.0).any()
    # A flat colour has its hue to compare: the same colour agrees, another does not.
    green, tan = (Image.new("RGB", (32, 32), c) for c in ((40, 90, 30), (200, 170, 120)))
    flat = colour_thumbnails([green, tan])
    np.testing.assert_array_equal(colour_agreement(flat[0], flat, 0.6), [1.0, 0.0])
    unknown = np.zeros((1, COLOUR_DIM), np.uint8)
    assert np.isnan(colour_agreement(thumbs[0], unknown, 0.0)[0])
    assert np.isnan(colour_agreement(grey, unknown, 0.0)[0])
    assert colour_agreement(thumbs[0], thumbs[:0], 0.6).shape == (0,)


def _desc(tiles: list[Image.Image]) -> np.ndarray:
    return structure_descriptors(tiles)
