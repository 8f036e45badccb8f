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


#: Seconds the model hub has to answer once before weights missing from the cache are an error
#: (huggingface_hub would retry for about a minute).
HUB_PROBE_TIMEOUT_S = 5.0


def _clause(exc: BaseException) -> str:
    """An exception's message as a clause of a longer sentence: no trailing full stop."""
    return str(exc).strip().rstrip(".")


def _weights_advice(architecture: str, pretrained: str | None) -> str:
    return (
        "Either download an open_clip checkpoint file and set GEOLOC_BACKBONE_CHECKPOINT to its "
        "path, or fill the open_clip cache on a machine with internet access (`python -c "
        f"\"import open_clip; open_clip.create_model('{architecture}', "
        f"pretrained='{pretrained}')\"`) "
        "and copy it here (the Hugging Face cache: HF_HOME, by default ~/.cache/huggingface)."
    )


def _hub_files(architecture: str, pretrained: str) -> tuple[str, list[str]] | None:
    """The Hugging Face repository and the file names (safetensors first) that open_clip
    fetches for this tag; None when the tag is no hub download (unknown, a URL or a file)."""
    from open_clip import pretrained as oc_pretrained

    cfg = open_clip.get_pretrained_cfg(architecture, pretrained)
    if not cfg.get("hf_hub") or "file" in cfg or not oc_pretrained.has_hf_hub():
        return None
    repo, filename = cfg["hf_hub"].rsplit("/", 1)
    filename = filename or oc_pretrained.HF_WEIGHTS_NAME
    return repo, [*oc_pretrained._get_safe_alternatives(filename), filename]


def _hub_unreachable(endpoint: str) -> str | None:
    """Why the hub cannot be reached (one request, HUB_PROBE_TIMEOUT_S); None when it answers."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # connection refused, DNS, timeout, proxy: all mean offline here
        return f"{type(exc).__name__}: {_clause(exc)}"
    return None


@contextmanager
def _hub_weights(architecture: str, pretrained: str | None) -> Iterator[None]:
    """Hub weights without huggingface_hub's minute of retries on an offline machine.

    Weights already in the Hugging Face cache are read from it with the hub in offline mode
    (no request at all). Weights that are not there are fetched only when the hub answers one
    request within HUB_PROBE_TIMEOUT_S; else this is a WeightsNotFoundError at once, saying
    how to provide them. Start-up code: the offline switch is process-wide while it lasts.
    """
    files = _hub_files(architecture, pretrained) if pretrained else None
    if files is None:
        yield
        return
    from huggingface_hub import constants, try_to_load_from_cache

    repo, names = files
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
        offline = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = offline
        return
    missing = (
        f"open_clip weights '{architecture}' / '{pretrained}' are not in the cache "
        f"({constants.HF_HUB_CACHE}, {repo})"
    )
    if constants.is_offline_mode():
        raise WeightsNotFoundError(
            f"{missing} and HF_HUB_OFFLINE is set. {_weights_advice(architecture, pretrained)}"
        )
    why = _hub_unreachable(constants.ENDPOINT)
    if why is not None:
        raise WeightsNotFoundError(
            f"{missing} and the model hub {constants.ENDPOINT} cannot be reached ({why}); "
            f"this machine may be offline. {_weights_advice(architecture, pretrained)}"
        )
    yield


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
    hub = checkpoint is None and source is not None  # an open_clip tag: hub or its cache
    try:
        hub_tag = source if hub else None
        with _quiet_random_init(source is None), _hub_weights(architecture, hub_tag):
            model, _, preprocess = open_clip.create_model_and_transforms(
                architecture, pretrained=source, device=device
            )
    except WeightsNotFoundError:
        raise
    except RuntimeError as exc:
        if not hub:
            raise
        raise WeightsNotFoundError(
            f"could not load open_clip weights '{architecture}' / '{pretrained}': "
            f"{_clause(exc)}. {_weights_advice(architecture, pretrained)}"
        ) from exc
    except Exception as exc:  # hub errors come in many types (HTTP, offline mode, OS)
        if not hub:
            raise
        raise WeightsNotFoundError(
            f"could not fetch open_clip weights '{architecture}' / '{pretrained}' "
            f"({type(exc).__name__}: {_clause(exc)}); this machine may be offline. "
            f"{_weights_advice(architecture, pretrained)}"
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
