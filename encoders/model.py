"""GeoModel: image tower + GPS tower + temperature, and the geoloc checkpoint format."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from encoders.errors import CheckpointError
from encoders.gps import GPSTower
from encoders.image import ImageTower
from encoders.text import TextTower
from index.files import atomic_write, sha256_file

CHECKPOINT_FORMAT = "geoloc.checkpoint"
CHECKPOINT_VERSION = 1
#: Parameters that come from the open_clip checkpoint (image backbone, text tower): a
#: checkpoint may leave them out when they have that other source.
BACKBONE_PREFIXES = ("image_tower.backbone.", "text_tower.")
#: ``GeoModel.weights_id`` of a model whose weights come from no file (random or untrained).
RANDOM_WEIGHTS = "random"


#: The towers' preprocessing scales a picture's short side to the input size and frames the
#: centre square; a picture much longer than wide would first be scaled up whole (a 1,000,000
#: x 1 PNG of 3 KB to gigabytes). Longer pictures are cut to their centre at this ratio first,
#: which frames the same square and bounds the work by the decoded pixels.
MAX_PREPROCESS_ASPECT = 2.0


def centre_for_preprocessing(im: Image.Image) -> Image.Image:
    """``im``, or its centre at MAX_PREPROCESS_ASPECT when it is longer than that."""
    w, h = im.size
    keep = max(1, math.ceil(min(w, h) * MAX_PREPROCESS_ASPECT))
    if max(w, h) <= keep:
        return im
    if w > h:
        left = (w - keep) // 2
        return im.crop((left, 0, left + keep, h))
    top = (h - keep) // 2
    return im.crop((0, top, w, top + keep))


def state_digest(module: nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes, bytes): the identity of weights
    that may come from no file (random ones), for artifacts made from them."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


class GeoModel(nn.Module):
    """Both towers of one profile. Embeddings are unit vectors; logits are
    ``exp(logit_scale) · cos`` as in GeoCLIP.

    ``weights_id`` names the weights it was loaded with (``profiles.weights_identity``):
    indexes and calibrations record it, so that artifacts made by other weights of the same
    profile are refused rather than served.
    """

    def __init__(
        self,
        image_tower: ImageTower,
        gps_tower: GPSTower,
        preprocess: Callable[[Image.Image], torch.Tensor],
        profile: str,
        logit_scale: float = math.log(1 / 0.07),
        text_tower: TextTower | None = None,
        weights_id: str = RANDOM_WEIGHTS,
    ) -> None:
        super().__init__()
        self.weights_id = weights_id
        self.image_tower = image_tower
        self.gps_tower = gps_tower
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.preprocess = preprocess
        self.profile = profile
        self.text_tower = text_tower
        #: Set by ``encoders.runtime.load_image_runtime``: the tower as another runtime runs
        #: it (pixels -> unnormalised vectors), used for inference instead of image_tower.
        self.image_runtime: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def embed_dim(self) -> int:
        return self.gps_tower.out_dim

    @property
    def scale(self) -> float:
        """The multiplier of cosine similarities in the logits (exp of logit_scale)."""
        return float(self.logit_scale.detach().exp())

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One PIL image as the image tower's input (its preprocessing, on at most
        MAX_PREPROCESS_ASPECT of it)."""
        return self.preprocess(centre_for_preprocessing(image).convert("RGB"))

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocess PIL images into one batch tensor on the model's device."""
        return torch.stack([self.prepare(im) for im in images]).to(self.device)

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        # Training needs the torch tower's gradients; the runtime serves inference only.
        if self.image_runtime is not None and not torch.is_grad_enabled():
            return F.normalize(self.image_runtime(pixels), dim=-1)
        return F.normalize(self.image_tower(pixels), dim=-1)

    def gps_embedding(self, latlon: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.gps_tower(latlon), dim=-1)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images -> (N, D) float32 unit vectors in the GPS space."""
        return self.image_embedding(self.pixels(images)).float().cpu().numpy()

    def embed_backbone_features(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone output -> unit vectors in the GPS space (the head only; differentiable)."""
        return F.normalize(self.image_tower.head(features), dim=-1)

    @torch.inference_mode()
    def embed_features(self, features: np.ndarray) -> np.ndarray:
        """Backbone features (e.g. 768-d CLIP) -> GPS-space unit vectors (head only)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.device)
        return self.embed_backbone_features(x).cpu().numpy()

    @property
    def has_text(self) -> bool:
        return self.text_tower is not None

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D) unit vectors in the GPS space: text tower, then the image head."""
        if self.text_tower is None:
            raise ValueError(f"profile '{self.profile}' has no text tower")
        return F.normalize(self.image_tower.head(self.text_tower(texts)), dim=-1).cpu().numpy()

    def embed_gps(self, latlon: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """(N, 2) degrees -> (N, D) float32 unit vectors."""
        return self.gps_tower.embed(latlon, batch_size=batch_size)


def save_checkpoint(
    model: GeoModel,
    path: str | Path,
    *,
    config: dict[str, Any],
    include_backbone: bool = True,
    extra: dict[str, Any] | None = None,
) -> str:
    """Save a self-describing checkpoint atomically; returns its sha256.

    ``config`` is the profile's architecture description, so the file alone says what
    model it belongs to. ``extra`` carries training state (optimizer, epoch, ...).
    """
    state = {
        k: v.detach().cpu()
        for k, v in model.state_dict().items()
        if include_backbone or not k.startswith(BACKBONE_PREFIXES)
    }
    blob = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "profile": model.profile,
        "config": config,
        "state_dict": state,
        "extra": extra or {},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda fh: torch.save(blob, fh))
    return sha256_file(Path(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate the envelope of a geoloc checkpoint (not yet the tensors)."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt: re-create it or copy it again"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a geoloc checkpoint (no '{CHECKPOINT_FORMAT}' format tag); "
            "write checkpoints with `geoloc train` or encoders.save_checkpoint"
        )
    if blob.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {blob.get('format_version')}, "
            f"this geoloc reads version {CHECKPOINT_VERSION}"
        )
    return blob


def load_state(
    model: GeoModel, blob: dict[str, Any], *, source: str, require_backbone: bool
) -> None:
    """Load a checkpoint's tensors. The backbone may be absent (frozen during training)
    unless ``require_backbone``: then it has no other source and must be there."""
    if blob.get("profile") != model.profile:
        raise CheckpointError(
            f"{source} was written for profile '{blob.get('profile')}', "
            f"not '{model.profile}'; load it with --profile {blob.get('profile')}"
        )
    state = blob["state_dict"]
    own = model.state_dict()
    missing = [
        k
        for k in own
        if k not in state and (require_backbone or not k.startswith(BACKBONE_PREFIXES))
    ]
    # A text tower saved by a model that had one is of no use to a model built without it.
    unexpected = [k for k in state if k not in own and not k.startswith("text_tower.")]
    bad_shape = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{source} does not fit profile '{model.profile}': "
            f"missing={missing[:5]} unexpected={unexpected[:5]} wrong shape={bad_shape[:5]}"
        )
    model.load_state_dict(state, strict=False)


def resolve_device(requested: str, cuda_available: bool | None = None) -> str:
    """The torch device the encoders use: 'auto' is CUDA when a GPU is visible, else CPU."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested.startswith("cuda") and not cuda_available:
        raise ValueError(
            f"device {requested!r} asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'"
        )
    return requested
