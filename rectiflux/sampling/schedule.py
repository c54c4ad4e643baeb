"""The noise schedule of FLUX.1 as small pure functions: the sigma grid, its size-dependent shift, img2img's start.

The model predicts a velocity v = noise - x0 along the straight path x_sigma = sigma * noise + (1 - sigma) * x0, so
sampling is plain Euler integration from sigma = 1 down to sigma = 0 (`denoise.py`); the only FLUX-specific part here
is how the sigma grid is bent towards high noise (the "shift").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

# Settings that a diffusers FlowMatchEulerDiscreteScheduler may carry but this sampler does not
# implement; each maps to the value that leaves the schedule untouched. Dropping a non-neutral one
# silently would sample on a different schedule than the checkpoint's authors intended.
_NEUTRAL_DIFFUSERS_SETTINGS: dict[str, Any] = {
    "shift_terminal": 0,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
}


@dataclass(frozen=True)
class SchedulerConfig:
    """Schedule settings; the defaults are FLUX.1-dev's (schnell: shift 1.0, no dynamic shifting)."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        """Read a diffusers scheduler_config.json dict, ignoring keys that do not affect sampling."""
        for key, neutral in _NEUTRAL_DIFFUSERS_SETTINGS.items():
            if config.get(key) not in (None, neutral):
                raise ValueError(f"scheduler setting {key}={config[key]!r} is not supported")
        # A missing key must mean what it means to diffusers, whose constructor defaults to no shift.
        values: dict[str, Any] = {"shift": 1.0, "use_dynamic_shifting": False}
        values.update({f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None})
        # JSON may give 3 for 3.0 or 1000.0 for 1000; coerce to each field's own type.
        return cls(**{f.name: type(f.default)(values[f.name]) for f in fields(cls) if f.name in values})

    def to_diffusers(self) -> dict[str, Any]:
        """A dict that FlowMatchEulerDiscreteScheduler.from_config (or a scheduler_config.json) accepts."""
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **asdict(self)}


def compute_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
               base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift: linear in the token count, and deliberately not clamped past max."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Exponential shift; more tokens (larger mu) spend more of the steps at high noise."""
    # sigma = 0 gives 1/0 = inf and so a shifted 0, which is the right limit.
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def static_shift(shift: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Resolution-independent shift, the same map as time_shift with e^mu = shift."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def get_sigmas(num_steps: int, image_seq_len: int, config: SchedulerConfig,
               sigmas: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """The N + 1 float32 noise levels of an N-step run, from about 1 down to a terminal 0.

    image_seq_len is the packed token count of the full image; it only matters with dynamic shifting.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if sigmas is None:
        # 1/N rather than 0 as the last level: the terminal 0 is appended after shifting.
        base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    else:
        base = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if base.numel() != num_steps:
            raise ValueError(f"got {base.numel()} sigmas for {num_steps} steps")
    # The shift runs in float32 like the reference's, so that the rounding, and so a seed's image, is the same.
    base = base.to(torch.float32)
    if config.use_dynamic_shifting:
        mu = compute_mu(image_seq_len, config.base_image_seq_len, config.max_image_seq_len,
                        config.base_shift, config.max_shift)
        shifted = time_shift(mu, base)
    else:
        shifted = static_shift(config.shift, base)
    return torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32)


def timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The model's timestep for each step: sigma * 1000, without the terminal 0."""
    return sigmas[:-1] * num_train_timesteps


def strength_start(num_steps: int, strength: float) -> int:
    """Index of the first sigma an img2img run keeps; strength 1 starts from pure noise.

    The float arithmetic mirrors the reference pipelines on purpose, so a given strength starts at
    exactly the same sigma (e.g. 25 steps at strength 0.56 run 15 steps, not 14, because
    25 * 0.56 is a hair above 14 in binary floating point).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_steps = min(num_steps * strength, num_steps)
    start = int(max(num_steps - init_steps, 0))
    if start >= num_steps:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no denoising step to run")
    return start
