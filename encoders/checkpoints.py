"""A model built from a checkpoint's own profile config, not from the registry's.

Every geoloc checkpoint embeds the profile config it was trained with (``save_checkpoint``'s
``config``). When a profile's architecture changes, older weight files of that profile no
longer fit ``load_model``; ``load_checkpoint_model`` builds them as they were written, e.g.
to benchmark an old model beside a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from encoders.errors import CheckpointError
from encoders.model import GeoModel, load_state, read_checkpoint
from encoders.profiles import PROFILES, Profile, build_model, weights_identity

#: Fields that only describe a profile; they never change what is built.
_DESCRIPTIVE = ("description", "purpose", "weights", "domain")


def checkpoint_profile(blob: dict[str, Any], *, source: str = "checkpoint") -> Profile:
    """The profile a checkpoint (``read_checkpoint``'s dict) was written with.

    When its architecture config differs from the registered profile's of the same name, the
    architecture gets a name of its own (suffixed with a hash of the config), so building it
    never replaces the registered architecture in open_clip's registry.
    """
    config = blob.get("config")
    if not isinstance(config, dict) or not config:
        raise CheckpointError(f"{source} does not embed its profile config")
    known = {f.name for f in dataclasses.fields(Profile)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CheckpointError(f"{source}: profile config has fields this geoloc lacks: {unknown}")
    values = dict(config)
    for key in ("head_dims", "gps_sigmas"):
        if key in values:
            values[key] = tuple(values[key])
    values.setdefault("name", blob.get("profile"))
    try:
        profile = Profile(**values)
    except TypeError as exc:
        raise CheckpointError(f"{source}: incomplete profile config ({exc})") from None
    registered = PROFILES.get(profile.name)
    arch = profile.architecture_config
    if arch is not None and (
        registered is None
        or registered.architecture != profile.architecture
        or registered.architecture_config != arch
    ):
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:10]
        profile = dataclasses.replace(profile, architecture=f"{profile.architecture}-{digest}")
    return profile


def same_as_registered(profile: Profile) -> bool:
    """Whether ``profile`` builds exactly what the registry's profile of its name builds."""
    registered = PROFILES.get(profile.name)
    if registered is None:
        return False
    mine, theirs = profile.to_dict(), registered.to_dict()
    for key in _DESCRIPTIVE:
        mine.pop(key)
        theirs.pop(key)
    return mine == theirs


def load_checkpoint_model(path: str | Path, *, device: str | torch.device = "cpu") -> GeoModel:
    """Build the model that the checkpoint at ``path`` describes and load its weights.

    The model keeps the checkpoint's profile name (so indexes of that profile accept it);
    the architecture is the one stored in the file, whatever the registry says now.
    """
    path = Path(path)
    blob = read_checkpoint(path)
    profile = checkpoint_profile(blob, source=str(path))
    model = build_model(profile, device=device)
    load_state(model, blob, source=str(path), require_backbone=profile.pretrained is None)
    model.weights_id = weights_identity(profile, [path])
    return model.to(device).eval()
