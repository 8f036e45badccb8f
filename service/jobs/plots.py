"""PNG figures of evaluation reports (matplotlib, Agg): Recall-vs-Area, reliability diagram,
error CDF and a world map of errors. Each figure draws one or more runs (the JSON reports of
``geoloc eval --json``), so two runs compare on one figure."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap, LogNorm
from PIL import Image

from index.geo import is_land
from service.engine.scores import RECALL_LEVELS, THRESHOLDS_KM
from service.jobs.evaluate import km2

FILES = {
    "rva": "recall_vs_area.png",
    "reliability": "reliability.png",
    "cdf": "error_cdf.png",
    "map": "error_map.png",
}
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
LINES = ("-", "--", "-.", ":")  # a second run stays visible where it lies on the first
DPI = 100
_LAND_SEA = ListedColormap(["#e3ecf5", "#c9c9c9"])  # sea, land

Run = tuple[str, dict[str, Any]]  # (legend label, eval report)


def _finish(fig: Any, ax: Any, path: Path, title: str) -> Path:
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    # A palette of 128 colours: the same figure at a third of the bytes or less.
    with Image.open(buf) as img:
        small = img.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, format="PNG", optimize=True)
    return path


def _log_x_percent_y(ax: Any, xlim: tuple[float, float], xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xlim(*xlim)
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", fontsize=8)


def plot_recall_vs_area(runs: list[Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, rep), colour, line in zip(runs, COLOURS, LINES, strict=False):
        rva = rep["recall_vs_area"]
        area = np.asarray(rva["curve"]["area_km2"])
        recall = 100 * np.asarray(rva["curve"]["recall"], dtype=float)
        at = rva["area_km2_at_recall"]
        note = ", ".join(f"{float(r):.0%}: {km2(a)}" for r, a in at.items())
        ax.plot(area, recall, color=colour, ls=line, lw=2, label=f"{label} ({note})")
        for a in at.values():
            if a is not None:
                ax.axvline(a, color=colour, ls=":", lw=1)
    for r in RECALL_LEVELS:
        ax.axhline(100 * r, color="grey", ls="--", lw=0.8)
    _log_x_percent_y(
        ax,
        (10, 5.1e8),
        "area searched, in the model's ranking of H3 cells (km², log scale)",
        "recall: truth inside the searched area (%)",
    )
    return _finish(fig, ax, path, "Recall vs area")


def plot_reliability(runs: list[Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    within = runs[0][1]["calibration"]["within_km"]
    for (label, rep), colour, line in zip(runs, COLOURS, LINES, strict=False):
        cal = rep["calibration"]
        bins = cal["bins"]
        if not bins:
            continue
        conf = [b["confidence"] for b in bins]
        acc = [b["accuracy"] for b in bins]
        n = np.array([b["n"] for b in bins], dtype=float)
        ax.plot(conf, acc, color=colour, ls=line, lw=1.5, label=f"{label} (ECE {cal['ece']:.3f})")
        ax.scatter(conf, acc, s=20 + 200 * n / n.sum(), color=colour, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 probability (mean in each bin)")
    ax.set_ylabel(f"share of top-1 answers within {within:g} km")
    ax.legend(loc="upper left", fontsize=8, title="marker area ∝ images in the bin")
    return _finish(fig, ax, path, f"Reliability of the top-1 probability ({within:g} km)")


def plot_error_cdf(runs: list[Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, rep), colour, line in zip(runs, COLOURS, LINES, strict=False):
        q = np.maximum(np.asarray(rep["error_cdf_km"], dtype=float), 0.1)
        share = np.linspace(0, 100, len(q))
        med = "no median" if rep["median_km"] is None else f"median {rep['median_km']:,.0f} km"
        ax.plot(q, share, color=colour, ls=line, lw=2, label=f"{label} ({med})")
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="grey", ls=":", lw=0.8)
        ax.text(t * 1.08, 1, f"{t:g} km", ha="left", va="bottom", fontsize=7, color="grey")
    _log_x_percent_y(
        ax,
        (0.5, 20_100),
        "top-1 error (km, log scale)",
        "share of images with a smaller error (%)",
    )
    return _finish(fig, ax, path, "Error distance CDF")


@cache
def _base_map() -> np.ndarray:
    """Land (1) and sea (0) at 0.5° from the project's land mask (GSHHG, offline). Two flat
    colours keep the map quiet and the PNG small."""
    lat = 89.75 - 0.5 * np.arange(360)
    lon = -179.75 + 0.5 * np.arange(720)
    grid = np.stack(np.meshgrid(lat, lon, indexing="ij"), axis=-1).reshape(-1, 2)
    return is_land(grid).reshape(360, 720).astype(np.float32)


def plot_error_map(runs: list[Run], path: Path) -> Path:
    fig, axes = plt.subplots(
        len(runs), 1, figsize=(9, 4.4 * len(runs)), squeeze=False, layout="constrained"
    )
    norm = LogNorm(vmin=1, vmax=20_000)
    scatter = None
    for ax, (label, rep) in zip(axes[:, 0], runs, strict=True):
        ax.imshow(
            _base_map(), extent=(-180, 180, -90, 90), cmap=_LAND_SEA, vmin=0, vmax=1,
            interpolation="nearest",
        )  # fmt: skip
        rows = np.asarray(rep.get("points", {}).get("rows", []), dtype=float).reshape(-1, 3)
        order = np.argsort(-rows[:, 2])  # small errors drawn last, on top
        scatter = ax.scatter(
            rows[order, 1],
            rows[order, 0],
            c=np.maximum(rows[order, 2], 1),
            s=9,
            cmap="RdYlGn_r",
            norm=norm,
            linewidths=0,
        )
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_xticks(range(-180, 181, 60))
        ax.set_yticks(range(-90, 91, 30))
        ax.set_xlabel("longitude (°)")
        ax.set_ylabel("latitude (°)")
        ax.set_title(f"Top-1 error at each true location: {label}", fontsize=11)
    if scatter is not None:
        bar = fig.colorbar(scatter, ax=axes[:, 0].tolist(), shrink=0.9, pad=0.01)
        bar.set_label("top-1 error (km, log scale)")
    return _save(fig, path)


def write_plots(runs: list[Run], out_dir: Path) -> list[Path]:
    """All four figures into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_recall_vs_area(runs, out_dir / FILES["rva"]),
        plot_reliability(runs, out_dir / FILES["reliability"]),
        plot_error_cdf(runs, out_dir / FILES["cdf"]),
        plot_error_map(runs, out_dir / FILES["map"]),
    ]
