"""The text tower: an open_clip text encoder whose features feed the image head.

GeoCLIP's image head takes CLIP's projected image features; CLIP puts text in the same space,
so a caption goes through CLIP's text encoder and then the same head into the GPS space (the
GeoCLIP paper queries locations with text this way). The text weights come from the same
open_clip checkpoint as the image backbone, and like it they stay frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
from torch import nn


class TextTower(nn.Module):
    """open_clip text encoder + its tokenizer -> unnormalised CLIP text features."""

    def __init__(self, clip: nn.Module, tokenizer: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        # The visual tower is held by the ImageTower; dropping it here keeps one copy of its
        # weights in the model and none in this module's state dict.
        clip.visual = nn.Identity()
        self.clip = clip
        self.tokenizer = tokenizer
        for p in self.clip.parameters():
            p.requires_grad = False

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.clip.encode_text(tokens, normalize=False)


def create_text_tower(clip: nn.Module, architecture: str) -> TextTower:
    """Wrap the text half of an open_clip model built by ``create_backbone``."""
    return TextTower(clip, open_clip.get_tokenizer(architecture))
