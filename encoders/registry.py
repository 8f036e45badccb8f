"""The named model profiles, as data: what each is, what it locates and how it is built.

Light on purpose (no torch, no open_clip): `geoloc profiles` and the settings read it at once;
encoders/profiles.py builds and loads the models it describes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from encoders.errors import UnknownProfileError

#: The GPS tower's random-Fourier-feature scales (GeoCLIP's hierarchy of three).
DEFAULT_SIGMAS: tuple[float, ...] = (2.0**0, 2.0**4, 2.0**8)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Profile:
    """Everything needed to build a model; serialisable into manifests and checkpoints."""

    name: str
    description: str
    #: What the model locates, shown wherever the profile is shown.
    purpose: str
    #: open_clip architecture name (a built-in one, or registered from ``architecture_config``).
    architecture: str
    #: open_clip pretrained tag of the backbone (None: the backbone comes from ``weights``).
    pretrained: str | None
    head_dims: tuple[int, ...]
    gps_sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    gps_hidden: int = 1024
    gps_rff: int = 256
    #: "geoclip-package" (GeoCLIP's own weight files) or a checkpoint file under encoders/weights.
    weights: str = ""
    #: A custom open_clip model config, registered under ``architecture`` before building.
    architecture_config: dict[str, Any] | None = field(default=None, compare=False)
    #: The open_clip text encoder is loaded with the backbone and feeds the image head, so
    #: text queries ("a beach in Brittany") land in the GPS space.
    has_text: bool = False
    #: The kind of pictures it locates: "satellite" (views from above) or "photo" (taken on
    #: the ground). It chooses the synthetic negatives of the localizability verdict.
    domain: str = "photo"

    @property
    def embed_dim(self) -> int:
        return self.head_dims[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_dims"] = list(self.head_dims)
        d["gps_sigmas"] = list(self.gps_sigmas)
        return d


# A small ViT for satellite tiles (32x32 input, 4x4 patches of 8 px, 6 layers of width
# 192), sized so that it trains on two CPU cores; `geoloc train` reproduces it
# (docs/TRAINING.md).
BLUEMARBLE_ARCH: dict[str, Any] = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 32, "layers": 6, "width": 192, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}

PROFILES: dict[str, Profile] = {
    "geoclip": Profile(
        name="geoclip",
        description="GeoCLIP (NeurIPS 2023): CLIP ViT-L/14 + GeoCLIP head, GPS tower, logit scale",
        purpose="ground-level photos taken anywhere on Earth",
        architecture="ViT-L-14",
        pretrained="openai",
        head_dims=(768, 768, 512),
        weights="geoclip-package",
        has_text=True,
        domain="photo",
    ),
    "bluemarble": Profile(
        name="bluemarble",
        description="Small ViT trained by geoloc on NASA Blue Marble imagery (about 7.4 km/pixel)",
        purpose="satellite views of the Earth's surface (not ground photos)",
        architecture="geoloc-bluemarble-vit",
        pretrained=None,
        head_dims=(192, 256, 256),
        gps_sigmas=DEFAULT_SIGMAS,
        gps_hidden=256,
        gps_rff=64,
        weights="bluemarble.pt",
        architecture_config=BLUEMARBLE_ARCH,
        domain="satellite",
    ),
}


def list_profiles() -> list[str]:
    return sorted(PROFILES)


def text_profiles() -> list[str]:
    """Profiles whose model can embed text queries."""
    return sorted(name for name, p in PROFILES.items() if p.has_text)


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown profile '{name}'; known profiles: {', '.join(list_profiles())}"
        ) from None
