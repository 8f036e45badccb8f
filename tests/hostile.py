"""Hostile pictures shared by the tests of every decode path: small files that would cost a
lot to decode."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def scan_bomb(side: int, repeats: int) -> bytes:
    """A flat progressive JPEG whose last scan is repeated: a few bytes a scan, but every scan
    is a pass over all of the image's blocks (libjpeg warns and goes on)."""
    data = encoded(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    end = data.rindex(b"\xff\xd9")
    last = data[data.rindex(b"\xff\xda") : end]
    return data[:end] + last * repeats + data[end:]


def animated(fmt: str, frames: int, side: int) -> bytes:
    """Frames of flat colours, each unlike the one before (a few bytes a frame)."""
    imgs = [Image.new("RGB", (side, side), (i % 256, (7 * i) % 256, 90)) for i in range(frames)]
    return encoded(imgs[0], fmt, save_all=True, append_images=imgs[1:], duration=20)
