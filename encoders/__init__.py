"""Model code: GPS tower, image tower, named profiles, checkpoints and training.

Pure model code: no HTTP, no settings. Functions take arguments and return
tensors or arrays. The names below load their module on first use, so that importing
``encoders.registry`` (the profiles as data) or ``encoders.errors`` costs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "CheckpointError": "encoders.errors",
    "EncoderError": "encoders.errors",
    "UnknownProfileError": "encoders.errors",
    "WeightsNotFoundError": "encoders.errors",
    "GPSTower": "encoders.gps",
    "equal_earth_projection": "encoders.gps",
    "ImageTower": "encoders.image",
    "GeoModel": "encoders.model",
    "read_checkpoint": "encoders.model",
    "save_checkpoint": "encoders.model",
    "Profile": "encoders.registry",
    "get_profile": "encoders.registry",
    "list_profiles": "encoders.registry",
    "load_model": "encoders.profiles",
}

__all__ = [
    "CheckpointError",
    "EncoderError",
    "GPSTower",
    "GeoModel",
    "ImageTower",
    "Profile",
    "UnknownProfileError",
    "WeightsNotFoundError",
    "equal_earth_projection",
    "get_profile",
    "list_profiles",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from encoders.errors import (
        CheckpointError,
        EncoderError,
        UnknownProfileError,
        WeightsNotFoundError,
    )
    from encoders.gps import GPSTower, equal_earth_projection
    from encoders.image import ImageTower
    from encoders.model import GeoModel, read_checkpoint, save_checkpoint
    from encoders.profiles import load_model
    from encoders.registry import Profile, get_profile, list_profiles


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'encoders' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
