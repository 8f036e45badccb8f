"""Named model profiles: which image tower, GPS tower, weights and preprocessing.

A profile is data. ``load_model(name)`` builds it; an unknown name lists the known
ones, a missing weight file says how to get it. Nothing falls back to random weights
unless ``random_backbone=True`` is asked for (timing only).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from encoders.errors import UnknownProfileError, WeightsNotFoundError
from encoders.gps import DEFAULT_SIGMAS, GPSTower
from encoders.image import ImageTower, create_backbone, mlp_head, register_architecture
from encoders.model import RANDOM_WEIGHTS, GeoModel, load_state, read_checkpoint, sha256_file
from encoders.text import create_text_tower

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


def geoclip_weight_files() -> dict[str, Path]:
    """The GeoCLIP weight files shipped inside the `geoclip` package (found, not imported)."""
    spec = importlib.util.find_spec("geoclip")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            "the 'geoclip' profile reads GeoCLIP's weights from the `geoclip` package, which "
            "is not installed: pip install 'geoloc[geoclip]' (or pip install geoclip)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "model"
    files = {
        "head": root / "weights" / "image_encoder_mlp_weights.pth",
        "gps": root / "weights" / "location_encoder_weights.pth",
        "logit_scale": root / "weights" / "logit_scale_weights.pth",
        "gallery": root / "gps_gallery" / "coordinates_100K.csv",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise WeightsNotFoundError(
            f"the installed `geoclip` package lacks {missing}; reinstall it: "
            "pip install --force-reinstall geoclip"
        )
    return files


def build_model(
    profile: Profile,
    *,
    random_backbone: bool = False,
    backbone_checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> GeoModel:
    """Build the architecture of ``profile`` with its backbone weights (not yet the head)."""
    if profile.architecture_config is not None:
        register_architecture(profile.architecture, profile.architecture_config)
    # Backbones trained by geoloc come with the profile checkpoint, not from a tag.
    backbone_random = random_backbone or profile.pretrained is None
    visual, preprocess, clip = create_backbone(
        profile.architecture,
        profile.pretrained,
        checkpoint=backbone_checkpoint,
        random_weights=backbone_random and backbone_checkpoint is None,
        with_text=profile.has_text and not random_backbone,
        device=device,
    )
    tower = ImageTower(visual, mlp_head(profile.head_dims))
    gps = GPSTower(profile.gps_sigmas, profile.gps_hidden, profile.embed_dim, profile.gps_rff)
    text = create_text_tower(clip, profile.architecture) if clip is not None else None
    model = GeoModel(tower, gps, preprocess, profile.name, text_tower=text)
    return model.to(device).eval()


def _load_geoclip_weights(model: GeoModel) -> None:
    files = geoclip_weight_files()

    def load(p: Path) -> Any:
        return torch.load(p, map_location="cpu", weights_only=True)

    model.image_tower.head.load_state_dict(load(files["head"]))
    model.gps_tower.load_state_dict(load(files["gps"]))
    with torch.no_grad():
        model.logit_scale.copy_(load(files["logit_scale"]).reshape(()))


#: Hex digits of a weights identity: 64 bits of sha256, plenty to tell weight files apart.
WEIGHTS_ID_CHARS = 16


def _stat_key(path: Path) -> tuple[Path, int, int]:
    st = path.stat()
    return path.resolve(), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a weights file, once per process while its size and mtime stay the same
    (`geoloc setup` asks for the identity before it loads the model)."""
    return sha256_file(path)


def weights_identity(
    profile: Profile,
    files: Sequence[Path],
    *,
    backbone_checkpoint: str | Path | None = None,
    random_backbone: bool = False,
) -> str:
    """A stable identity of the weights a model of ``profile`` gets from ``files``.

    One file that holds everything (a bluemarble checkpoint): the first hex digits of its
    sha256, so ``sha256sum`` shows it. Otherwise a sha256 over the files' digests and, for a
    backbone that comes from elsewhere, where it comes from: the open_clip tag, or a backbone
    checkpoint's path and size. A backbone file is not hashed: a ViT-L checkpoint would cost
    seconds at every start, and the head and GPS tower files change with any retraining.
    ``RANDOM_WEIGHTS`` for a random backbone (timing only).
    """
    if profile.pretrained is not None and random_backbone:
        return RANDOM_WEIGHTS
    digests = [_file_digest(*_stat_key(Path(f))) for f in files]
    if profile.pretrained is None and len(digests) == 1:
        return digests[0][:WEIGHTS_ID_CHARS]
    parts = list(digests)
    if profile.pretrained is not None:
        if backbone_checkpoint is not None:
            path = Path(backbone_checkpoint).resolve()
            if not path.is_file():
                raise WeightsNotFoundError(f"backbone checkpoint {path} is missing")
            parts.append(f"backbone-file:{path}:{path.stat().st_size}")
        else:
            parts.append(f"open_clip:{profile.architecture}:{profile.pretrained}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:WEIGHTS_ID_CHARS]


def _weight_files(profile: Profile, checkpoint: str | Path | None) -> list[Path]:
    """The files ``load_model`` reads the weights of ``profile`` from (not the backbone's)."""
    if checkpoint is None and profile.weights == "geoclip-package":
        files = geoclip_weight_files()
        return [files["head"], files["gps"], files["logit_scale"]]
    if checkpoint is not None:
        path = Path(checkpoint)
        hint = "pass the path of a checkpoint written by `geoloc train`"
    else:
        path = WEIGHTS_DIR / profile.weights
        hint = (
            "it ships in the geoloc repository (git checkout it) or is re-created with "
            "the command in docs/TRAINING.md"
        )
    if not path.is_file():
        raise WeightsNotFoundError(
            f"profile '{profile.name}' needs {path}, which is missing; {hint}"
        )
    return [path]


def weights_id(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    backbone_checkpoint: str | Path | None = None,
    random_backbone: bool = False,
) -> str:
    """The ``weights_id`` that ``load_model`` with these arguments gives, without building
    the model (hashes the weight files only)."""
    profile = get_profile(name)
    return weights_identity(
        profile,
        _weight_files(profile, checkpoint),
        backbone_checkpoint=backbone_checkpoint,
        random_backbone=random_backbone,
    )


def load_model(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    backbone_checkpoint: str | Path | None = None,
    random_backbone: bool = False,
    device: str | torch.device = "cpu",
) -> GeoModel:
    """Build profile ``name`` with its weights.

    ``checkpoint``: a geoloc checkpoint (e.g. from `geoloc train`) that replaces the
    profile's bundled weights. ``backbone_checkpoint``: a local open_clip checkpoint file
    for the image backbone, loaded through the same path as hub weights. The model's
    ``weights_id`` is computed here, once (``weights_identity``).
    """
    profile = get_profile(name)
    files = _weight_files(profile, checkpoint)
    model = build_model(
        profile,
        random_backbone=random_backbone,
        backbone_checkpoint=backbone_checkpoint,
        device=device,
    )
    model.weights_id = weights_identity(
        profile, files, backbone_checkpoint=backbone_checkpoint, random_backbone=random_backbone
    )
    if checkpoint is None and profile.weights == "geoclip-package":
        _load_geoclip_weights(model)
        return model.to(device).eval()
    (path,) = files
    load_state(
        model,
        read_checkpoint(path),
        source=str(path),
        require_backbone=profile.pretrained is None and not random_backbone,
    )
    return model.to(device).eval()
