"""Model code: GPS tower, image tower, named profiles, checkpoints and training.

Pure model code: no HTTP, no settings. Functions take arguments and return
tensors or arrays.
"""

from encoders.errors import CheckpointError, EncoderError, UnknownProfileError, WeightsNotFoundError
from encoders.gps import GPSTower, equal_earth_projection
from encoders.image import ImageTower
from encoders.model import GeoModel, read_checkpoint, save_checkpoint
from encoders.profiles import Profile, get_profile, list_profiles, load_model

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
