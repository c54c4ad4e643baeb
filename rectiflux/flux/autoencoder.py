"""The KL autoencoder of FLUX.1: an LDM-style VAE with 16 latent channels and no quant convs.

Parameter names are those of Black Forest Labs' `ae.safetensors`; `rectiflux.weights.layout` maps diffusers'
`AutoencoderKL` names onto them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sampling.latents import Generators, draw_noise


@dataclass
class AutoEncoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    sample_size: int = 1024  # the image size it was trained on: the default tile of tiled coding (diffusers' too)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (diffusers' vae_scale_factor): one halving per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> AutoEncoderConfig:
        """Read a diffusers `AutoencoderKL` config.json, refusing the variants this module does not build."""
        keys = ["in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                "norm_num_groups", "scaling_factor"]
        if missing := [k for k in keys if k not in cfg]:
            raise ValueError(f"autoencoder config.json lacks {', '.join(missing)}")
        levels = len(cfg["block_out_channels"])
        unsupported = {  # diffusers' defaults apply to absent keys: quant convs are on unless switched off
            "act_fn": cfg.get("act_fn", "silu") != "silu",
            "use_quant_conv": cfg.get("use_quant_conv", True),
            "use_post_quant_conv": cfg.get("use_post_quant_conv", True),
            "mid_block_add_attention": not cfg.get("mid_block_add_attention", True),
            "down_block_types": list(cfg.get("down_block_types", ())) != ["DownEncoderBlock2D"] * levels,
            "up_block_types": list(cfg.get("up_block_types", ())) != ["UpDecoderBlock2D"] * levels,
        }
        if bad := [f"{k}={cfg.get(k)!r}" for k, v in unsupported.items() if v]:
            raise ValueError(f"unsupported autoencoder config: {', '.join(bad)}")
        sample = cfg.get("sample_size", 1024)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        # SD-style VAEs have no shift (None), which is a shift of 0
        return cls(**{k: cfg[k] for k in keys}, shift_factor=cfg.get("shift_factor") or 0.0, sample_size=int(sample))

    def to_diffusers(self) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL", **asdict(self), "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "act_fn": "silu", "force_upcast": True, "latents_mean": None, "latents_std": None,
            "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
        }


# ----------------------------------------------------------------------------------------------------
# model


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # in place at inference: the norms' outputs and conv2's are fresh, and a fresh tensor costs page faults
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(self.nin_shortcut(x)) if inplace else self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as projections."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # the projections as linears over (b, h*w, c) pixels: SDPA's fused CPU kernel needs unit-stride channels
        # (with a 1x1 conv's (b, c, h*w) output it fell back to the math kernel, 5x slower on a 64x64 latent)
        y = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (F.linear(y, proj.weight.flatten(1), proj.bias).unsqueeze(1) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (b, h*w, c)
        y = F.linear(y, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class Resample(nn.Module):
    def __init__(self, c: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        # padding only right and bottom is how the LDM VAE was trained; a symmetric pad shifts the latents
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """The ResNet blocks of one resolution, then an optional `downsample` or `upsample`."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n))
        self.resample = resample
        if resample:
            self.add_module(resample, Resample(c_out, up=resample == "upsample"))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample)(x) if self.resample else x


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(c, c, groups), AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                                        "downsample" if i < n - 1 else None) for i in range(n))
        self.mid = Mid(ch[-1], g)
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = Mid(ch[-1], g)
        # up[i] mirrors down[i] (same resolution and width), so it runs from the last index to the first
        self.up = nn.ModuleList(Level(ch[min(i + 1, n - 1)], ch[i], cfg.layers_per_block + 1, g,
                                      "upsample" if i > 0 else None) for i in range(n))
        self.norm_out = nn.GroupNorm(g, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), sampled exactly like diffusers' DiagonalGaussianDistribution."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as diffusers: keeps exp() finite for saturated channels
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: Generators = None) -> Tensor:
        # the reference's draws, so seeds reproduce across the two: on the generator's device, one per image
        return self.mean + self.std * draw_noise(tuple(self.mean.shape), generator, self.mean.device, self.mean.dtype)


class AutoEncoder(nn.Module):
    """The autoencoder. Like diffusers' AutoencoderKL it can code a batch one image at a time (`enable_slicing`: less
    memory, the same images) and large images in overlapping tiles blended at the seams (`enable_tiling`: bounded
    memory for any size, tiles of `tile_sample_min_size` pixels, by default the size it was trained on)."""

    def __init__(self, config: AutoEncoderConfig | None = None):
        super().__init__()
        self.config = config or AutoEncoderConfig()
        self.encoder, self.decoder = Encoder(self.config), Decoder(self.config)
        self.use_slicing = self.use_tiling = False
        self.tile_sample_min_size = self.config.sample_size
        self.tile_overlap_factor = 0.25

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True) -> None:
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.use_tiling = False

    @property
    def tile_latent_min_size(self) -> int:
        return self.tile_sample_min_size // self.config.downscale

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images in [-1, 1], (B, C, H, W) -> posterior over unscaled latents (B, latent, H/f, W/f)."""
        if self.use_slicing and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([self._moments(x[i:i + 1]) for i in range(x.shape[0])]))
        return DiagonalGaussian(self._moments(x))

    def _moments(self, x: Tensor) -> Tensor:
        def whole(t: Tensor) -> Tensor:
            return self.encoder(self._channels_last(t)).contiguous()
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return tiled(whole, x, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor)
        return whole(x)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images in about [-1, 1]."""
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(z[i:i + 1]) for i in range(z.shape[0])])
        return self._decode(z)

    def _decode(self, z: Tensor) -> Tensor:
        def whole(t: Tensor) -> Tensor:
            return self.decoder(self._channels_last(t)).contiguous()
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return tiled(whole, z, self.tile_latent_min_size, self.tile_sample_min_size, self.tile_overlap_factor)
        return whole(z)

    @staticmethod
    def _channels_last(x: Tensor) -> Tensor:
        """On the CPU, activations in channels-last layout, which oneDNN convolves without reordering them.

        The weights keep the layout they were given: converting them would hand users non-contiguous state dicts
        (which safetensors refuses to save) and change parameter strides under a DistributedDataParallel wrapper.
        """
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def work(self, batch: int, pixels: int) -> int:
        """Multiply-adds of one 3x3 convolution over `pixels` full-resolution pixels (rectiflux.runtime.threads_for's
        measure)."""
        return batch * pixels * self.config.block_out_channels[0] ** 2 * 9

    def scale_latents(self, z: Tensor) -> Tensor:
        """VAE latents -> the unit-variance latents the transformer works in."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor


def blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """Fade the first `extent` rows (dim -2) or columns (dim -1) of tile `b` in from the last ones of tile `a`,
    linearly, in place."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = extent
    w = (torch.arange(extent, dtype=torch.float64, device=b.device) / extent).to(b.dtype).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w) + head * w)
    return b


def tiled(code, x: Tensor, tile_in: int, tile_out: int, overlap: float) -> Tensor:
    """Apply `code` (an encoder or decoder mapping `tile_in` to `tile_out` along each side) to overlapping tiles of
    x, each blended into its upper and left neighbours, and join the tiles cut to their unshared part."""
    step, extent = int(tile_in * (1 - overlap)), int(tile_out * overlap)
    keep = tile_out - extent
    height, width = x.shape[-2:]
    rows = [[code(x[..., i:i + tile_in, j:j + tile_in]) for j in range(0, width, step)] for i in range(0, height, step)]
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if i > 0:
                blend(rows[i - 1][j], t, extent, dim=-2)
            if j > 0:
                blend(row[j - 1], t, extent, dim=-1)
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)
