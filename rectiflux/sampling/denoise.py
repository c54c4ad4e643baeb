"""The one denoising loop of every FLUX.1 variant: Euler steps from noise to latents, with slots for image
conditioning on channels (Fill, Control) and on the sequence (Kontext), true CFG, the inpainting mask, the step
cache, callbacks, progress and interruption.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import FirstBlockCache
from .latents import noise_latents


class NonFiniteLatents(ArithmeticError):
    """The latents became NaN or infinite while sampling; the message names the step and the likely cause."""


@dataclass
class Conditioning:
    """Everything the transformer sees at each step besides the latents, for one side of classifier-free guidance.

    `img_cond` is concatenated to the latents on channels at every step (Fill: the masked image and the mask;
    Control: the control image), `img_cond_seq` appended to them on the sequence with its own RoPE ids
    `img_cond_seq_ids` (Kontext: the reference image); the prediction for those tokens is dropped.
    """

    txt: Tensor  # T5 tokens (B, L_txt, joint_attention_dim)
    y: Tensor  # pooled CLIP (B, pooled_projection_dim)
    txt_ids: Tensor
    img_ids: Tensor
    guidance: Tensor | None = None
    img_cond: Tensor | None = None
    img_cond_seq: Tensor | None = None
    img_cond_seq_ids: Tensor | None = None


@dataclass
class Inpainting:
    """Outside `mask` (1 = repaint, packed like the latents) the latents are reset after every step to the source's
    latents noised to the next step's level."""

    mask: Tensor
    source: Tensor  # packed clean latents of the source image
    noise: Tensor  # packed noise they are noised with


@dataclass
class Denoised:
    latents: Tensor
    steps: int  # the steps that ran (fewer than asked when interrupted)
    cached_steps: int = 0  # steps whose later blocks the step cache skipped


def euler_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """One Euler step of dx/dsigma = v, in float32 because bf16 steps drift over a whole run."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return (x.float() + dt.to(x.device) * v.float()).to(x.dtype)


def velocity(model: torch.nn.Module, x: Tensor, t: Tensor, cond: Conditioning, pe: Tensor,
             cache: FirstBlockCache | None) -> Tensor:
    """The model's prediction for the generated tokens `x`, its image conditioning put in the slots it uses."""
    img = x if cond.img_cond is None else torch.cat([x, cond.img_cond.to(x.dtype)], dim=-1)
    img_ids = cond.img_ids
    if cond.img_cond_seq is not None:
        img = torch.cat([img, cond.img_cond_seq.to(x.dtype)], dim=1)
        img_ids = torch.cat([img_ids, cond.img_cond_seq_ids], dim=-2)
    v = model(img=img, img_ids=img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t, y=cond.y,
              guidance=cond.guidance, pe=pe, cache=cache)
    return v[:, : x.shape[1]]


def position_embedding(model: torch.nn.Module, cond: Conditioning) -> Tensor:
    img_ids = cond.img_ids
    if cond.img_cond_seq_ids is not None:
        img_ids = torch.cat([img_ids, cond.img_cond_seq_ids], dim=-2)
    return model.position_embedding(cond.txt_ids, img_ids)


def denoise(model: torch.nn.Module, x: Tensor, sigmas: Tensor, cond: Conditioning, *,
            negative: Conditioning | None = None, true_cfg_scale: float = 1.0, inpainting: Inpainting | None = None,
            cache_threshold: float | None = None, num_train_timesteps: int = 1000,
            on_step: Callable[[int, Tensor, Tensor, Conditioning], Tensor | None] | None = None,
            progress: Callable[[int, int], None] | None = None,
            stop: Callable[[], bool] | None = None) -> Denoised:
    """Integrate packed latents `x` along `sigmas` (N + 1 levels, N steps) with the model's velocity.

    With `negative` and `true_cfg_scale` > 1 each step runs the model twice: v_neg + scale * (v - v_neg).
    `on_step(i, t, x, cond)` runs after each step and may return new latents (and change `cond.txt`);
    `progress(step, total)` is told of each step; `stop()` is asked before each step and ends the loop early
    (the latents so far are returned, as diffusers does for `pipe.interrupt`).
    """
    model_t = sigmas[:-1] * num_train_timesteps
    sigmas = sigmas.to(x.device)
    n = len(model_t)
    pe = position_embedding(model, cond)
    pe_negative = position_embedding(model, negative) if negative is not None else None
    caches = [FirstBlockCache(cache_threshold) if cache_threshold is not None else None for _ in range(2)]
    steps = 0
    for i in range(n):
        if stop is not None and stop():
            break
        # the reference passes (sigma * 1000) / 1000 rather than sigma: the same rounding keeps seeds exact
        t = model_t[i].expand(x.shape[0]).to(x.device, x.dtype) / 1000
        v = velocity(model, x, t, cond, pe, caches[0])
        if negative is not None and true_cfg_scale > 1:
            v_negative = velocity(model, x, t, negative, pe_negative, caches[1])
            v = v_negative + true_cfg_scale * (v - v_negative)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        if inpainting is not None:
            m = inpainting
            kept = noise_latents(m.source, m.noise, sigmas[i + 1]) if i < n - 1 else m.source
            x = (1 - m.mask) * kept + m.mask * x
        if not torch.isfinite(x).all():
            hint = (" (float16 overflows in FLUX's activations: use bfloat16 or float32)" if x.dtype == torch.float16
                    else " (check the guidance and true CFG scales and the model's weights)")
            raise NonFiniteLatents(f"the latents became NaN or infinite at step {i + 1} of {n}{hint}")
        if on_step is not None:
            result = on_step(i, model_t[i], x, cond)
            x = x if result is None else result
        steps += 1
        if progress is not None:
            progress(steps, n)
    return Denoised(x, steps, caches[0].skipped if caches[0] is not None else 0)
