"""How the localizability verdict's negative kinds and features were chosen: variants of the
verdict, each fitted as `geoloc setup` fits it (the same 2,000 TRAIN_STYLE tiles, the same
generated negatives, `fit_localizability`), judged on pictures bench/shift.py never reports:

- **validation natural pictures**, from other wheels' data than bench/shift.py's photos:
  matplotlib's sample data (a portrait, a photo of a gift box, the matplotlib logo, an MRI
  slice), scikit-learn's two sample photos and scipy 1.9's `misc` face and ascent, each wheel
  fetched once with `pip download --no-deps` for one pinned platform into bench/out;
- **bench/tune.py's validation tile draws** (zooms and colour shifts): the share of them judged
  `not_locatable`, and flagged (`not_locatable` or `uncertain`);
- **the newest negative kinds, drawn from another seed** (HELD_SEED): the share flagged, by a
  verdict fitted with that kind and by one fitted without it (how the verdict holds for kinds
  of pictures it never saw; such a fit's blurred negatives blur only the kinds it keeps).

Variants: the served verdict; the same without a negative kind; the same without the framing
features (frame_std and frame_gap held constant, so the classifier cannot use them).
``--stability``: the served fit on three other draws of the negatives and with three fit seeds.

    .venv/bin/python bench/verdict.py [--per-set 300] [--stability]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import pickle
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shift import wheel_files
from tilesets import (
    CALIB_SEED,
    OUT,
    bundled_weights,
    command_line,
    machine_line,
    markdown_table,
    pct,
    served_setup,
    short_hash,
)
from tune import validation_sets

from index.files import sha256_file
from service.config import Settings
from service.engine import negatives as negatives_module
from service.engine.images import read_image_file
from service.engine.loading import load_locator
from service.engine.localizability import (
    FEATURES,
    FORMAT,
    LocalizabilityModel,
    fit_localizability,
)
from service.engine.negatives import KINDS, kinds_for, negatives
from service.jobs.calibrate import NEGATIVES_SEED
from service.jobs.evaluate import embed_rows

#: Wheels whose bundled pictures are the validation natural pictures, pinned to one file each.
MPL_WHEEL, SKLEARN_WHEEL, SCIPY_WHEEL = "matplotlib==3.9.2", "scikit-learn==1.5.2", "scipy==1.9.3"
#: Kinds measured left out (the newest: object on a backdrop, micrograph).
LEFT_OUT = ("object", "micrograph")
FRAMING = ("frame_std", "frame_gap")
#: The seed of the left-out kinds' pictures judged here (never fitted on).
HELD_SEED = 70801
#: Other draws of every negative kind, for --stability.
STABILITY_SEEDS = (21, 22, 23)


def _grey(a: np.ndarray) -> Image.Image:
    a = np.asarray(a, np.float64)
    return Image.fromarray(np.round(255 * (a - a.min()) / max(np.ptp(a), 1e-9)).astype(np.uint8))


def validation_pictures(load: Callable[[Path], Image.Image]) -> dict[str, Image.Image]:
    """name -> picture: natural pictures from other wheels than bench/shift.py's."""
    out: dict[str, Image.Image] = {}
    sample = "matplotlib/mpl-data/sample_data"
    d = wheel_files(MPL_WHEEL, lambda m: m.startswith(sample + "/")) / "files" / sample
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        out[name] = load(d / name)
    mri = np.frombuffer(gzip.decompress((d / "s1045.ima.gz").read_bytes()), "<u2")
    out["MRI slice (s1045.ima)"] = _grey(mri.reshape(256, 256)).convert("RGB")
    d = wheel_files(SKLEARN_WHEEL, lambda m: m.startswith("sklearn/datasets/images/"))
    for name in ("china.jpg", "flower.jpg"):
        out[name] = load(d / "files/sklearn/datasets/images" / name)
    d = wheel_files(SCIPY_WHEEL, lambda m: m in ("scipy/misc/face.dat", "scipy/misc/ascent.dat"))
    face = np.frombuffer(bz2.decompress((d / "files/scipy/misc/face.dat").read_bytes()), np.uint8)
    out["face (scipy.misc)"] = Image.fromarray(face.reshape(768, 1024, 3))
    with open(d / "files/scipy/misc/ascent.dat", "rb") as f:
        out["ascent (scipy.misc)"] = _grey(pickle.load(f)).convert("RGB")
    return out


def flagged(model: LocalizabilityModel, x: np.ndarray) -> tuple[float, float]:
    """The shares of rows ``x`` the verdict judges not_locatable, and flags."""
    shares = model.shares(x)
    return shares["not_locatable"], shares["flagged"]


def cached_rows(name: str, make: Callable[[], np.ndarray]) -> np.ndarray:
    path = OUT / f"{name}.npy"
    if not path.exists():
        tmp = path.with_suffix(".part.npy")
        np.save(tmp, make())
        tmp.replace(path)  # a killed run leaves no truncated file under the final name
    return np.load(path)


def stability(
    pos: np.ndarray,
    features: Callable[[list[Image.Image]], np.ndarray],
    natural: np.ndarray,
    names: list[str],
    tiles: dict[str, np.ndarray],
    key: str,
    per_kind: int,
) -> None:
    """The served fit on three other draws of the negatives (STABILITY_SEEDS), and on the
    first draw with three classifier seeds: how far t_high, the validation natural pictures'
    scores and the validation tiles' verdicts move with them."""
    draws = {}
    labels = [k for _ in range(per_kind) for k in KINDS]  # the order `negatives` yields
    for s in STABILITY_SEEDS:
        x = cached_rows(
            f"verdict-{key}-draw-{s}-{per_kind}",
            lambda s=s: features([im for _, im in negatives(KINDS, per_kind, s)]),
        )
        draws[s] = (x, labels)
    runs = {
        f"negatives drawn with seeds {', '.join(map(str, STABILITY_SEEDS))}": [
            fit_localizability(pos, *draws[s], purpose="", domain="satellite", leave_one_out=False)
            for s in STABILITY_SEEDS
        ],
        f"seed {STABILITY_SEEDS[0]}'s draw, fit seeds 0, 1, 2": [
            fit_localizability(
                pos,
                *draws[STABILITY_SEEDS[0]],
                purpose="",
                domain="satellite",
                seed=seed,
                leave_one_out=False,
            )
            for seed in (0, 1, 2)
        ],
    }
    rows = []
    for label, models in runs.items():
        nat = np.array([m.scores(natural) for m in models])
        judged = [[flagged(m, x) for x in tiles.values()] for m in models]
        not_loc = [np.mean([lo for lo, _ in js]) for js in judged]
        shares = [np.mean([fl for _, fl in js]) for js in judged]
        rows.append(
            [
                label,
                " / ".join(f"{m.t_high:.3f}" for m in models),
                " / ".join(
                    str(int(np.sum(n < m.t_high))) for n, m in zip(nat, models, strict=True)
                ),
                f"{nat.std(axis=0).mean():.3f} (largest {nat.std(axis=0).max():.3f}, "
                f"{names[int(nat.std(axis=0).argmax())]})",
                " / ".join(pct(v) for v in not_loc),
                " / ".join(pct(v) for v in shares),
            ]
        )
    header = [
        "fits",
        "t_high",
        f"natural flagged (of {len(names)})",
        "natural score: mean sd over fits",
        "tiles not_locatable (mean of sets)",
        "tiles flagged (mean of sets)",
    ]
    print("\nStability of the served fit:\n")
    print(markdown_table(header, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-set", type=int, default=300, help="validation tiles per set")
    ap.add_argument(
        "--stability", action="store_true", help="also: the verdict over draws and seeds"
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"command: {command_line()}")
    print(machine_line())
    n_refs, n_calib = Settings().setup_reference_tiles, 2000
    served = served_setup(bundled_weights().resolve(), 4, n_refs, n_calib)
    settings = served.settings
    # Features as `geoloc setup` fits on them: through the uncalibrated locator.
    locator = load_locator(settings.model_copy(update={"calibration": "off"}), model=served.model)
    opts = settings.locate_options(top_k=1, describe=False)
    # Rows are cached by what they depend on: weights, set-up, features, generators, seeds.
    generators = sha256_file(Path(negatives_module.__file__))
    seeds = (NEGATIVES_SEED, HELD_SEED)
    key = short_hash(
        (served.model.weights_id, str(settings.data_dir), FEATURES, FORMAT, generators, seeds)
    )
    per_kind = settings.calibration_negatives

    def features(images: list[Image.Image]) -> np.ndarray:
        batches = range(0, len(images), 32)
        return np.vstack([locator.picture_features(images[s : s + 32], opts) for s in batches])

    def positives() -> np.ndarray:
        emb = embed_rows(
            locator, served.calibration, limits=settings.image_limits(), image_stats=True
        )
        return locator.judge_features(emb.vectors, emb.stats, opts, emb.structure)

    pos = cached_rows(f"verdict-{key}-pos", positives)
    neg = {
        k: cached_rows(
            f"verdict-{key}-neg-{k}-{per_kind}",
            lambda k=k: features([im for _, im in negatives((k,), per_kind, NEGATIVES_SEED)]),
        )
        for k in KINDS
    }
    # `blurred` blurs pictures of the other kinds: a variant that leaves kinds out gets blurred
    # pictures drawn from the rest only, so that it never sees the left-out kinds at all.
    base = tuple(k for k in kinds_for("satellite") if k != "blurred")
    blurred_without = {
        out: cached_rows(
            f"verdict-{key}-neg-blurred-without-{'-'.join(out)}-{per_kind}",
            lambda out=out: features(
                [
                    im
                    for _, im in negatives(
                        ("blurred",),
                        per_kind,
                        NEGATIVES_SEED,
                        blur_from=tuple(k for k in base if k not in out),
                    )
                ]
            ),
        )
        for out in ((LEFT_OUT[0],), (LEFT_OUT[1],), LEFT_OUT)
    }
    held = {
        k: cached_rows(
            f"verdict-{key}-held-{k}-{per_kind}",
            lambda k=k: features([im for _, im in negatives((k,), per_kind, HELD_SEED)]),
        )
        for k in LEFT_OUT
    }
    sets = validation_sets(args.per_set)
    tiles = {
        name: cached_rows(
            f"verdict-{key}-val-{short_hash(rows[0].path.parent.name)}",
            lambda rows=rows: features([Image.open(r.path).convert("RGB") for r in rows]),
        )
        for name, rows in sets.items()
    }
    load = partial(read_image_file, limits=settings.image_limits())
    pictures = validation_pictures(load)
    natural = features(list(pictures.values()))
    print(
        f"verdict fitted on {len(pos):,} TRAIN_STYLE tiles (seed {CALIB_SEED}) and {per_kind} "
        f"generated pictures of each kind (seed {NEGATIVES_SEED}); {args.per_set} validation "
        f"tiles a set; {len(pictures)} validation natural pictures"
    )

    def fit(
        kinds: tuple[str, ...], blind: tuple[str, ...]
    ) -> tuple[LocalizabilityModel, Callable[[np.ndarray], np.ndarray]]:
        """A verdict fitted on ``kinds`` with the ``blind`` features held at 0, and what hides
        them from the rows it judges."""
        cols = [FEATURES.index(f) for f in blind]
        out = tuple(k for k in LEFT_OUT if k not in kinds)
        rows = {k: blurred_without[out] if k == "blurred" and out else neg[k] for k in kinds}

        def hide(x: np.ndarray) -> np.ndarray:
            x = x.copy()
            x[:, cols] = 0.0
            return x

        x = np.vstack([hide(rows[k]) for k in kinds])
        labels = [k for k in kinds for _ in range(len(rows[k]))]
        m: LocalizabilityModel = fit_localizability(
            hide(pos), x, labels, purpose="", domain="satellite", leave_one_out=False
        )
        return m, hide

    variants: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
        "served (every kind, framing features)": (KINDS, ()),
        **{f"without the {k} kind": (tuple(x for x in KINDS if x != k), ()) for k in LEFT_OUT},
        f"without {' and '.join(LEFT_OUT)}": (tuple(x for x in KINDS if x not in LEFT_OUT), ()),
        "without the framing features": (KINDS, FRAMING),
        "without both kinds and the framing features": (
            tuple(x for x in KINDS if x not in LEFT_OUT),
            FRAMING,
        ),
    }
    header = ["variant", *(f"{k} flagged" for k in LEFT_OUT), "natural flagged", "located"]
    header += ["tiles not_locatable: mean, worst set", "tiles flagged: mean"]
    rows, per_set = [], []
    for label, (kinds, blind) in variants.items():
        m, hide = fit(kinds, blind)
        verdicts = [m.verdict(v) for v in m.scores(hide(natural))]
        located = [n for n, v in zip(pictures, verdicts, strict=True) if v == "located"]
        judged = {name: flagged(m, hide(x)) for name, x in tiles.items()}
        worst = max(judged, key=lambda name: judged[name][0])
        row = [label, *(pct(flagged(m, hide(held[k]))[1]) for k in LEFT_OUT)]
        row += [f"{len(verdicts) - len(located)} / {len(verdicts)}", ", ".join(located) or "-"]
        row += [
            f"{pct(np.mean([lo for lo, _ in judged.values()]))}, {pct(judged[worst][0])} ({worst})",
            pct(np.mean([fl for _, fl in judged.values()])),
        ]
        rows.append(row)
        per_set.append([label, *(f"{pct(lo)} / {pct(fl)}" for lo, fl in judged.values())])
    print(markdown_table(header, rows))
    print("\nValidation tiles judged not_locatable / flagged, by set:\n")
    print(markdown_table(["variant", *tiles], per_set))
    if args.stability:
        stability(pos, features, natural, list(pictures), tiles, key, per_kind)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
