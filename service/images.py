"""Decoding and validating images: by content, bounded in bytes and pixels."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from service.errors import ImageTooLargeError, InputImageError, UnsupportedMediaError

# Formats we accept, sniffed from the first bytes (never from a file name).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
)


def sniff_format(head: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(
    data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image"
) -> Image.Image:
    """Bytes -> RGB PIL image, EXIF orientation applied, first frame only.

    Raises an InputImageError subclass (with a stable type) for anything unusable.
    """
    if len(data) == 0:
        raise InputImageError(f"{name} is empty (0 bytes)", type="empty-image")
    if len(data) > max_bytes:
        raise ImageTooLargeError(
            f"{name} has {len(data)} bytes; the limit is {max_bytes} (GEOLOC_MAX_IMAGE_BYTES)"
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
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{name} is {width}x{height} = {width * height} pixels; the limit is "
                    f"{max_pixels} (GEOLOC_MAX_IMAGE_PIXELS)",
                    type="too-many-pixels",
                )
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
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


def read_image_file(path: str | Path, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Read and decode an image file, reading at most max_bytes + 1 bytes."""
    p = Path(path)
    if not p.is_file():
        raise InputImageError(f"{p}: no such file", type="file-not-found", status=404)
    with open(p, "rb") as fh:
        data = fh.read(max_bytes + 1)
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=str(p))


def read_image_files(
    paths: list[Path], *, max_bytes: int, max_pixels: int
) -> tuple[list[Image.Image], list[int], list[str]]:
    """Decode many files: the images, the positions of those that decoded, and one
    "[type] detail" line per file that did not."""
    images: list[Image.Image] = []
    ok: list[int] = []
    problems: list[str] = []
    for i, p in enumerate(paths):
        try:
            images.append(read_image_file(p, max_bytes=max_bytes, max_pixels=max_pixels))
            ok.append(i)
        except InputImageError as exc:
            problems.append(f"[{exc.type}] {exc.detail}")
    return images, ok, problems
