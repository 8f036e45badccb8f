"""Preprocessing a picture costs what its decoded pixels cost, whatever its shape: a very long
picture is cut to its centre before the towers' resize, which frames the same square."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from encoders.model import MAX_PREPROCESS_ASPECT, centre_for_preprocessing


def test_long_pictures_are_cut_to_their_centre() -> None:
    square = Image.new("RGB", (50, 50))
    assert centre_for_preprocessing(square) is square
    wide = Image.new("RGB", (int(40 * MAX_PREPROCESS_ASPECT), 40))
    assert centre_for_preprocessing(wide) is wide  # at the ratio: untouched
    assert centre_for_preprocessing(Image.new("RGB", (300, 40))).size == (80, 40)
    assert centre_for_preprocessing(Image.new("RGB", (40, 300))).size == (40, 80)
    assert centre_for_preprocessing(Image.new("RGB", (1_000_000, 1))).size == (2, 1)
    # the kept part is the middle: a marker at the centre stays at the centre
    strip = np.zeros((10, 1000, 3), np.uint8)
    strip[:, 495:505] = 255
    kept = np.asarray(centre_for_preprocessing(Image.fromarray(strip)))
    assert kept.shape[1] == 20 and kept[:, 5:15].min() == 255 and kept[:, :5].max() == 0


def test_the_cut_frames_what_the_towers_frame() -> None:
    """The embedding of a 5:1 picture is the one of its whole, uncut preprocessing."""
    from encoders import load_model

    bm_model = load_model("bluemarble")
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (40, 200, 3), dtype=np.uint8)).resize((600, 120))
    cut = bm_model.embed_images([im])[0]
    whole = bm_model.image_embedding(bm_model.preprocess(im)[None]).detach().numpy()[0]
    assert float(cut @ whole) > 0.999


def test_a_one_pixel_high_picture_costs_no_memory() -> None:
    """A 1,000,000 x 1 PNG (a few KB) used to grow to gigabytes in preprocessing."""
    script = textwrap.dedent(
        """
        import io, sys
        from PIL import Image
        from encoders import load_model
        from service.engine.images import decode_image
        from service.engine.options import ImageLimits

        def peak_mib():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

        model = load_model("bluemarble")
        model.embed_images([Image.new("RGB", (64, 64))])  # warm: lazy allocations
        buf = io.BytesIO()
        Image.new("RGB", (1_000_000, 1), (120, 90, 60)).save(buf, "PNG")
        image = decode_image(buf.getvalue(), ImageLimits(1 << 25, 40_000_000))
        before = peak_mib()
        model.embed_images([image])
        print(peak_mib() - before)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    grown = float(r.stdout.strip().splitlines()[-1])
    assert grown < 100, f"peak RSS grew by {grown:.0f} MiB"
