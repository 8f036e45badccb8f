"""Decoding and validating images: by content, bounded in bytes and pixels."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageFilter, ImageOps

from encoders.structure import COLOURS_FLATTENED
from service.engine.options import ImageLimits
from service.errors import (
    ImageShapeError,
    ImageTooComplexError,
    ImageTooLargeError,
    InputImageError,
    UnsupportedMediaError,
)

# Formats we accept, sniffed from the first bytes (never from a file name).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
)


#: Gaussian radius (px of the decoded picture) that smooths a heavily compressed JPEG's 8 x 8
#: blocks; chosen on validation draws (bench/tune.py's JPEG sets), like GEOLOC_DEBLOCK_ABOVE.
DEBLOCK_RADIUS = 1.2
_BLOCKINESS_SIDE = 512


def sniff_format(head: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_scans(data: bytes, max_scans: int, name: str) -> None:
    """Refuse a JPEG with more scans than the limit, before decoding it. Inside entropy-coded
    data every 0xFF byte is followed by 0x00 or a restart marker, so counting FF DA counts the
    start-of-scan markers (an embedded thumbnail's count too, which only errs on the safe side).
    """
    scans = data.count(b"\xff\xda")
    if scans > max_scans:
        raise ImageTooComplexError(
            f"{name} is a JPEG of {scans} scans; the limit is {max_scans} "
            "(GEOLOC_MAX_JPEG_SCANS; a progressive JPEG has about 10)"
        )


def decode_image(data: bytes, limits: ImageLimits, *, name: str = "image") -> Image.Image:
    """Bytes -> RGB PIL image, EXIF orientation applied, first frame only.

    Raises an InputImageError subclass (with a stable type) for anything unusable; the size
    and shape are checked from the header, before the pixels are decoded.
    """
    if len(data) == 0:
        raise InputImageError(f"{name} is empty (0 bytes)", type="empty-image")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"{name} has {len(data)} bytes; the limit is {limits.max_bytes} "
            "(GEOLOC_MAX_IMAGE_BYTES)"
        )
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise UnsupportedMediaError(f"{name} is not a JPEG, PNG or WebP image")
    # Pillow refuses to be forgiving about truncation unless told to; we want it strict.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageTooLargeError(
                    f"{name} is {width}x{height} = {width * height} pixels; the limit is "
                    f"{limits.max_pixels} (GEOLOC_MAX_IMAGE_PIXELS)",
                    type="too-many-pixels",
                )
            aspect = limits.max_aspect
            if aspect is not None and max(width, height) > aspect * min(width, height):
                raise ImageShapeError(
                    f"{name} is {width}x{height}: its long side is more than {aspect:g} "
                    "times its short side (GEOLOC_MAX_IMAGE_ASPECT)"
                )
            if fmt == "JPEG" and limits.max_jpeg_scans is not None:
                _check_scans(data, limits.max_jpeg_scans, name)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img).convert("RGB")
            flattened = bool(limits.deblock_above) and blockiness(img) >= limits.deblock_above
            if flattened:
                img = img.filter(ImageFilter.GaussianBlur(DEBLOCK_RADIUS))
            # Set either way: a PNG text chunk of the same name lands in info too.
            img.info[COLOURS_FLATTENED] = flattened  # True: not to be read as a colour ramp
            return img
    except InputImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            f"{name} decompresses to too many pixels: {exc}", type="too-many-pixels"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputImageError(
            f"{name} is corrupt or truncated ({exc})", type="corrupt-image"
        ) from exc


def blockiness(img: Image.Image) -> float:
    """How much sharper a picture's luminance steps are on one of the 8 pixel phases than on
    the typical one, across columns and rows (mean of the two): about 1.1 for a picture never
    compressed, 1.5 for JPEG quality 75, 4 for quality 12, 6 and far beyond for quality 8,
    whose 8 x 8 blocks are flat inside. Phase-free, so a rotated or cropped JPEG counts too.
    Measured on the central 512 x 512 pixels at most (a few milliseconds)."""
    w, h = img.size
    x0, y0 = max(0, (w - _BLOCKINESS_SIDE) // 2), max(0, (h - _BLOCKINESS_SIDE) // 2)
    box = (x0, y0, min(w, x0 + _BLOCKINESS_SIDE), min(h, y0 + _BLOCKINESS_SIDE))
    y = np.asarray(img.crop(box).convert("L"), dtype=np.int16)

    def ratio(steps: np.ndarray) -> float:
        n = len(steps) // 8 * 8
        if n < 16:
            return 1.0  # too small to tell
        phases = steps[:n].reshape(-1, 8).mean(axis=0)
        return float(phases.max() / (np.median(phases) + 1e-3))

    across = np.abs(np.diff(y, axis=1)).mean(axis=0)  # one value per column step
    down = np.abs(np.diff(y, axis=0)).mean(axis=1)
    return 0.5 * (ratio(across) + ratio(down))


def read_image_file(path: str | Path, limits: ImageLimits) -> Image.Image:
    """Read and decode an image file, reading at most max_bytes + 1 bytes."""
    p = Path(path)
    if not p.is_file():
        raise InputImageError(f"{p}: no such file", type="file-not-found", status=404)
    with open(p, "rb") as fh:
        data = fh.read(limits.max_bytes + 1)
    return decode_image(data, limits, name=str(p))


def read_image_files(
    paths: list[Path], limits: ImageLimits
) -> tuple[list[Image.Image], list[int], list[str]]:
    """Decode many files: the images, the positions of those that decoded, and one
    "[type] detail" line per file that did not."""
    images: list[Image.Image] = []
    ok: list[int] = []
    problems: list[str] = []
    for i, p in enumerate(paths):
        try:
            images.append(read_image_file(p, limits))
            ok.append(i)
        except InputImageError as exc:
            problems.append(f"[{exc.type}] {exc.detail}")
    return images, ok, problems


# Text tags a camera or an editor writes into EXIF (IFD0), and UserComment (Exif IFD).
_EXIF_TEXT = {
    0x010E: "ImageDescription",
    0x010F: "Make",
    0x0110: "Model",
    0x0131: "Software",
    0x013B: "Artist",
    0x8298: "Copyright",
    0x9C9B: "XPTitle",
    0x9C9C: "XPComment",
    0x9C9D: "XPAuthor",
    0x9C9E: "XPKeywords",
    0x9C9F: "XPSubject",
}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def _exif_str(tag: int, value: object) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes):
        return str(value)
    if 0x9C9B <= tag <= 0x9C9F:  # Windows XP tags: UTF-16LE
        return value.decode("utf-16-le", "replace")
    if tag == _USER_COMMENT:  # an 8-byte character code, then the text
        code, text = value[:8], value[8:]
        return text.decode("utf-16" if code.startswith(b"UNICODE") else "latin-1", "replace")
    return value.decode("utf-8", "replace")


def image_text(data: bytes) -> list[tuple[str, str]]:
    """Text the image file carries (EXIF text tags, PNG text chunks) as (name, text).

    Only headers are parsed; a file without any, or one that does not parse, gives []."""
    out: list[tuple[str, str]] = []
    try:
        with Image.open(io.BytesIO(data)) as im:
            # A PNG without an eXIf chunk in its header: Pillow would decode the pixels to
            # look for one after them.
            has_exif = im.format != "PNG" or "exif" in im.info
            exif = im.getexif() if has_exif else Image.Exif()
            items = [(t, exif.get(t)) for t in _EXIF_TEXT]
            items.append((_USER_COMMENT, exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)))
            # Text chunks before the pixels (im.text would decode the whole image).
            png_text = {
                k: v for k, v in im.info.items() if im.format == "PNG" and isinstance(v, str)
            }
    except Exception:  # metadata is optional context; the decoder judges the image itself
        return []
    for tag, value in items:
        if value is None:
            continue
        text = _exif_str(tag, value).replace("\x00", "").strip()
        if text:
            out.append((f"exif.{_EXIF_TEXT.get(tag, 'UserComment')}", text))
    out += [(f"png.{k}", str(v).strip()) for k, v in png_text.items() if str(v).strip()]
    return out
