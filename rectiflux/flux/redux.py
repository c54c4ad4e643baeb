"""FLUX.1-Redux's image projector: SigLIP's patch features mapped into T5's space, to be appended to the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ReduxConfig:
    redux_dim: int = 1152  # SigLIP so400m's width
    txt_in_features: int = 4096  # T5-XXL's width


class ReduxProjector(nn.Module):
    """Linear up to 3x T5's width, SiLU, linear down to T5's width (diffusers' ReduxImageEncoder, BFL's names)."""

    def __init__(self, cfg: ReduxConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or ReduxConfig()
        self.redux_up = nn.Linear(cfg.redux_dim, 3 * cfg.txt_in_features)
        self.redux_down = nn.Linear(3 * cfg.txt_in_features, cfg.txt_in_features)

    def forward(self, features: Tensor) -> Tensor:
        return self.redux_down(F.silu(self.redux_up(features)))
