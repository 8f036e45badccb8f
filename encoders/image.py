"""The image tower: an open_clip vision backbone plus an MLP head into the GPS space."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image
from torch import nn

from encoders.errors import WeightsNotFoundError


def mlp_head(dims: Sequence[int]) -> nn.Sequential:
    """Linear/ReLU stack; ``(768, 768, 512)`` gives GeoCLIP's head and its key layout."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def register_architecture(name: str, config: dict[str, Any]) -> None:
    """Make a custom architecture (open_clip model config as data) buildable by name."""
    # open_clip keeps its registry in a module-level dict; registering twice is harmless.
    open_clip.factory._MODEL_CONFIGS[name] = config


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def _quiet_random_init(quiet: bool) -> Iterator[None]:
    """Without a pretrained tag open_clip warns that the model is "initialized randomly".
    The callers that build without one load their weights right after (a profile's own
    checkpoint) or asked for random weights (timing), so the warning only misleads."""
    if not quiet:
        yield
        return
    root, flt = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def create_backbone(
    architecture: str,
    pretrained: str | None,
    *,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    with_text: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor], nn.Module | None]:
    """Build an open_clip model by name and return (visual, preprocess, full model or None).

    Weights come from ``checkpoint`` (a local file: the same loader as hub weights), else
    from the open_clip ``pretrained`` tag (hub or local cache). ``random_weights`` must be
    asked for explicitly; it exists for timing, never as a fallback.
    """
    source: str | None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"backbone checkpoint {path} does not exist; pass the path of an open_clip "
                f"'{architecture}' checkpoint file (state dict .pt/.bin/.safetensors)"
            )
        source = str(path)
    elif random_weights:
        source = None
    else:
        source = pretrained
    try:
        with _quiet_random_init(source is None):
            model, _, preprocess = open_clip.create_model_and_transforms(
                architecture, pretrained=source, device=device
            )
    except RuntimeError as exc:
        if source is None or checkpoint is not None:
            raise
        raise WeightsNotFoundError(
            f"could not load open_clip weights '{architecture}' / '{pretrained}': {exc}. "
            "On a machine with internet access run "
            f"`python -c \"import open_clip; open_clip.create_model('{architecture}', "
            f"pretrained='{pretrained}')\"` to fill the open_clip cache, or download the "
            "checkpoint file and set GEOLOC_BACKBONE_CHECKPOINT to its path."
        ) from exc
    except Exception as exc:  # hub errors come in many types (HTTP, offline mode, OS)
        if source is None or checkpoint is not None:
            raise
        raise WeightsNotFoundError(
            f"could not fetch open_clip weights '{architecture}' / '{pretrained}' "
            f"({type(exc).__name__}: {exc}). This machine may be offline: download the "
            "checkpoint elsewhere and set GEOLOC_BACKBONE_CHECKPOINT to its path."
        ) from exc
    visual = model.visual
    model.eval()
    return visual, preprocess, (model if with_text else None)


class ImageTower(nn.Module):
    """Backbone (open_clip visual tower) -> MLP head -> unnormalised GPS-space vector."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, freeze_backbone: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.set_backbone_trainable(not freeze_backbone)

    def set_backbone_trainable(self, trainable: bool) -> None:
        for p in self.backbone.parameters():
            p.requires_grad = trainable

    @property
    def feature_dim(self) -> int:
        return self.head[0].in_features

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone features (e.g. 768-d CLIP image embeddings), before the head."""
        return self.backbone(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))
