"""The web page served at ``/``: our own HTML/JS/CSS (committed, ``service/web/page``) plus
front-end libraries from npm and an offline base map, built into a static folder. The API docs
(``/docs``: Swagger UI, ``/redoc``: ReDoc) load their scripts from the same folder, never from a
CDN, so they work on a machine without internet.

    make install                      # npm ci in service/web, then:
    python -m service.api.webpage build   # copy the libraries, downscale Blue Marble once

The built folder (``service/web/static`` unless GEOLOC_WEB_ASSETS_DIR) is gitignored. When it
is incomplete the app still starts and ``/`` says how to build it.
"""

from __future__ import annotations

import argparse
import html
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
PAGE_DIR = WEB_DIR / "page"  # our own files, committed
NODE_MODULES = WEB_DIR / "node_modules"
DEFAULT_ASSETS_DIR = WEB_DIR / "static"
#: Where the app serves the static folder (service/api/routes/web.py mounts it).
ASSETS_URL = "/web/lib"

# What the API docs pages load (service/api/openapi.py), by their names in the static folder.
SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
REDOC_JS = "redoc.standalone.js"
DOCS_FAVICON = "swagger-ui-favicon-32x32.png"

BASEMAP = "bluemarble.jpg"
# Three quarters of the mosaic's 5400x2700: sharp when zoomed in, about 1 MB to load.
BASEMAP_SIZE = (4096, 2048)
BASEMAP_QUALITY = 85


@dataclass(frozen=True)
class Vendored:
    """One file (or folder) of an npm package, copied to ``target`` in the static folder."""

    package: str
    source: str  # path inside node_modules/<package>
    target: str


# What the page loads; licences travel with the code they cover.
VENDORED: tuple[Vendored, ...] = (
    Vendored("leaflet", "dist/leaflet.js", "leaflet.js"),
    Vendored("leaflet", "dist/leaflet.css", "leaflet.css"),
    Vendored("leaflet", "dist/images", "images"),
    Vendored("leaflet", "LICENSE", "LICENSE-leaflet.txt"),
    Vendored("topojson-client", "dist/topojson-client.min.js", "topojson-client.min.js"),
    Vendored("topojson-client", "LICENSE", "LICENSE-topojson-client.txt"),
    Vendored("world-atlas", "countries-50m.json", "countries-50m.json"),
    Vendored("world-atlas", "LICENSE", "LICENSE-world-atlas.txt"),
    Vendored("exifr", "dist/lite.umd.js", "exifr.lite.umd.js"),
    Vendored("exifr", "LICENSE", "LICENSE-exifr.txt"),
    # The API docs; the bundles' own notices name the libraries bundled into them.
    Vendored("swagger-ui-dist", SWAGGER_JS, SWAGGER_JS),
    Vendored("swagger-ui-dist", f"{SWAGGER_JS}.LICENSE.txt", f"{SWAGGER_JS}.LICENSE.txt"),
    Vendored("swagger-ui-dist", SWAGGER_CSS, SWAGGER_CSS),
    Vendored("swagger-ui-dist", "favicon-32x32.png", DOCS_FAVICON),
    Vendored("swagger-ui-dist", "LICENSE", "LICENSE-swagger-ui.txt"),
    Vendored("swagger-ui-dist", "NOTICE", "NOTICE-swagger-ui.txt"),
    Vendored("redoc", f"bundles/{REDOC_JS}", REDOC_JS),
    Vendored("redoc", f"bundles/{REDOC_JS}.LICENSE.txt", f"{REDOC_JS}.LICENSE.txt"),
    Vendored("redoc", "LICENSE", "LICENSE-redoc.txt"),
)

BUILD_HINT = (
    "make install    (runs `npm ci` in service/web, then `python -m service.api.webpage build`)"
)


def required_files() -> list[str]:
    """Names, relative to the static folder, that the page needs."""
    return [v.target for v in VENDORED] + [BASEMAP]


def missing_assets(assets_dir: Path) -> list[str]:
    return [name for name in required_files() if not (assets_dir / name).exists()]


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dst)


#: bmng.jpg paints the Southern Ocean south of about 60.3°S between about 125°W and 90°E one
#: flat near-black blue (no depth shading), a dark rectangle beside the shaded ocean around it.
FLAT_SOUTHERN_OCEAN = ((2, 5, 20), -60.3, 3)  # colour, northern edge (lat), tolerance


def clean_southern_ocean(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` (equirectangular, H x W x 3) with that flat rectangle painted in the median
    colour of the shaded ocean of the same latitudes."""
    colour, north, tolerance = FLAT_SOUTHERN_OCEAN
    out = rgb.copy()
    band = out[int((90 - north) / 180 * len(out)) :]
    flat = np.abs(band.astype(int) - colour).sum(axis=-1) <= tolerance
    pixel = band.astype(int)
    ocean = ~flat & (pixel[..., 2] > pixel[..., 0] + 15) & (pixel.sum(axis=-1) < 250)
    if flat.any() and ocean.any():
        band[flat] = np.median(band[ocean], axis=0).astype(np.uint8)
    return out


def build_basemap(dst: Path, size: tuple[int, int] = BASEMAP_SIZE) -> None:
    """Blue Marble (equirectangular, 2:1) cleaned and downscaled once for the page's map."""
    from encoders.bluemarble import bmng_path  # the one place that knows where bmng.jpg is

    with Image.open(bmng_path()) as im:
        rgb = clean_southern_ocean(np.asarray(im.convert("RGB")))
    small = Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS)
    tmp = dst.with_suffix(".tmp")
    small.save(tmp, "JPEG", quality=BASEMAP_QUALITY, optimize=True, progressive=True)
    tmp.replace(dst)


def build_assets(assets_dir: Path, node_modules: Path = NODE_MODULES) -> list[Path]:
    """Copy the vendored files from node_modules and make the base map; returns what was
    written. Raises FileNotFoundError naming the first missing npm file (run npm ci)."""
    assets_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for v in VENDORED:
        src = node_modules / v.package / v.source
        if not src.exists():
            raise FileNotFoundError(f"{src} is missing: run `npm ci` in {node_modules.parent}")
        _copy(src, assets_dir / v.target)
        written.append(assets_dir / v.target)
    basemap = assets_dir / BASEMAP
    # The slow part (a few seconds): once, and again when this module (how it is made) changes.
    if not basemap.exists() or basemap.stat().st_mtime < Path(__file__).stat().st_mtime:
        build_basemap(basemap)
    written.append(basemap)
    return written


def not_built_page(assets_dir: Path, missing: list[str]) -> str:
    """What ``/`` shows while the static folder is incomplete."""
    items = "".join(f"<li><code>{html.escape(m)}</code></li>" for m in missing)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>geoloc: web page not built</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto">
<main>
<h1>The web page is not built</h1>
<p>The API works (its OpenAPI document: <a href="/openapi.json">/openapi.json</a>); the page
and the API docs (<code>/docs</code>, <code>/redoc</code>) need their front-end libraries and
base map in <code>{html.escape(str(assets_dir))}</code>. Build them with</p>
<pre>{html.escape(BUILD_HINT)}</pre>
<p>then restart the service.{" Missing:" if missing else ""}</p><ul>{items}</ul>
</main></body></html>"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.api.webpage", description=__doc__)
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--out", type=Path, default=None, help="static folder (default: settings)")
    args = ap.parse_args(argv)
    if args.out is None:
        from service.config import Settings

        args.out = Settings().web_assets_path
    try:
        written = build_assets(args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"web page assets: {len(written)} files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
