"""Flow-matching Euler sampling for FLUX.1, written as small pure functions.

The model predicts a velocity v = noise - x0 along the straight path x_sigma = sigma * noise +
(1 - sigma) * x0, so sampling is plain Euler integration from sigma = 1 down to sigma = 0. The
only FLUX-specific parts are how the sigma grid is bent towards high noise (the "shift") and how
the 16-channel latents are folded into 2x2 patches ("packing") for the transformer.
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


def noise_latents(x: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Put clean latents x at noise level sigma on the straight path to noise (computed in float32)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return (sigma * noise.float() + (1.0 - sigma) * x.float()).to(x.dtype)


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """One Euler step of dx/dsigma = v, in float32 because bf16 steps drift over a whole run."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return (x.float() + dt.to(x.device) * v.float()).to(x.dtype)


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(
            f"latent grid {height}x{width} must have even sides to pack into 2x2 patches "
            "(image sides must be multiples of 16 pixels)"
        )


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, row-major over 2x2 patches.

    Within a token the channel index is c * 4 + dy * 2 + dx; the transformer's input layer was
    trained on this order, so it must not change.
    """
    batch, channels, height, width = z.shape
    _check_even(height, width)
    patches = z.reshape(batch, channels, height // 2, 2, width // 2, 2)
    # to (B, patch row, patch col, C, dy, dx) so that flattening gives tokens, then features
    patches = patches.permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents; height and width are the latent grid (pixels / 8), not pixels."""
    _check_even(height, width)
    batch, seq_len, features = tokens.shape
    if seq_len != (height // 2) * (width // 2) or features % 4:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit a {height}x{width} latent grid")
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2)
    patches = patches.permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """RoPE positions (0, row, col) of each packed token for a height x width latent grid."""
    _check_even(height, width)
    rows, cols = torch.meshgrid(torch.arange(height // 2, device=device),
                                torch.arange(width // 2, device=device), indexing="ij")
    # axis 0 stays zero for the generated image; later FLUX variants use it to mark conditioning images
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    # cast last: bf16 cannot count past 256 exactly
    return ids.to(dtype)


def text_ids(
    seq_len: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """RoPE positions of the T5 tokens: all zero, so text carries no rotary position."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


Generators = torch.Generator | list[torch.Generator] | None


def draw_noise(shape: tuple[int, ...], generator: Generators, device: torch.device | str,
               dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn as the reference draws it: on the generator's device, one generator per row for a list."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} images")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
