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
from pathlib import Path
from typing import Any

import torch

from encoders.errors import WeightsNotFoundError
from encoders.gps import GPSTower
from encoders.image import ImageTower, create_backbone, mlp_head, register_architecture
from encoders.model import RANDOM_WEIGHTS, GeoModel, load_state, read_checkpoint
from encoders.registry import (
    BLUEMARBLE_ARCH,
    PROFILES,
    WEIGHTS_DIR,
    Profile,
    get_profile,
    list_profiles,
    text_profiles,
)
from encoders.text import create_text_tower
from index.files import sha256_file

__all__ = [
    "BLUEMARBLE_ARCH",
    "PROFILES",
    "WEIGHTS_DIR",
    "Profile",
    "build_model",
    "geoclip_weight_files",
    "get_profile",
    "list_profiles",
    "load_model",
    "text_profiles",
    "weights_id",
    "weights_identity",
]


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
