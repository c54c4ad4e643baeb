"""Latents in the transformer's shapes: 2x2 packing into tokens, RoPE ids, noise drawn as the reference draws it.

The 16-channel latents are folded into 2x2 patches ("packing") for the transformer; random numbers are drawn in the
reference's order and shapes, so a seed gives the same latents here as in diffusers.
"""

from __future__ import annotations

import torch


def noise_latents(x: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Put clean latents x at noise level sigma on the straight path to noise (computed in float32)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return (sigma * noise.float() + (1.0 - sigma) * x.float()).to(x.dtype)


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


def fold_pixels(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * factor^2, H / factor, W / factor): each factor x factor block of pixels becomes channels,
    index dy * factor + dx (Fill's pixel mask, read by the transformer at the latents' resolution)."""
    batch, channels, height, width = x.shape
    if height % factor or width % factor:
        raise ValueError(f"a {height}x{width} image does not fold into {factor}x{factor} blocks")
    blocks = x.reshape(batch, channels, height // factor, factor, width // factor, factor)
    return blocks.permute(0, 1, 3, 5, 2, 4).reshape(batch, channels * factor * factor, height // factor,
                                                     width // factor)


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
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    index: int = 0,
) -> torch.Tensor:
    """RoPE positions (index, row, col) of each packed token for a height x width latent grid.

    Axis 0 is 0 for the generated image; Kontext marks its reference image's tokens with 1.
    """
    _check_even(height, width)
    rows, cols = torch.meshgrid(torch.arange(height // 2, device=device),
                                torch.arange(width // 2, device=device), indexing="ij")
    ids = torch.stack([torch.full_like(rows, index), rows, cols], dim=-1).reshape(-1, 3)
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
