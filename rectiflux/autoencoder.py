"""The KL autoencoder of FLUX.1: an LDM-style VAE with 16 latent channels and no quant convs.

Parameter names are those of Black Forest Labs' `ae.safetensors`, so that file loads as it is; the
diffusers `AutoencoderKL` layout is converted on load and written on save.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (
    CheckpointError,
    load_into,
    parse_dtype,
    read_json,
    read_state_dict,
    save_state_dict,
    strip_prefix,
    write_json,
)
from .heap import keep_freed_memory
from .sampler import Generators, draw_noise
from .threads import threads_for

BFL_PREFIXES = ("first_stage_model.", "vae.", "ae.")  # how single-file bundles nest the autoencoder


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
            raise CheckpointError(f"autoencoder config.json lacks {', '.join(missing)}")
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
            raise CheckpointError(f"unsupported autoencoder config: {', '.join(bad)}")
        # SD-style VAEs have no shift (None), which is a shift of 0
        return cls(**{k: cfg[k] for k in keys}, shift_factor=cfg.get("shift_factor") or 0.0)

    def to_diffusers(self) -> dict[str, Any]:
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL", **asdict(self), "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "act_fn": "silu", "sample_size": 1024, "force_upcast": True, "latents_mean": None, "latents_std": None,
            "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
        }

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> AutoEncoderConfig:
        """Read a config off the tensor shapes of a checkpoint in our (= BFL) naming.

        Shapes do not show the GroupNorm group count (BFL's code fixes it at 32) nor the latent
        scaling, so those keep FLUX's values.
        """
        def count(pattern: str) -> int:
            return 1 + max(int(m[1]) for k in shapes if (m := re.match(pattern, k)))
        try:
            levels, layers = count(r"encoder\.down\.(\d+)\."), count(r"encoder\.down\.0\.block\.(\d+)\.")
            return cls(
                in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
                latent_channels=shapes["decoder.conv_in.weight"][1], layers_per_block=layers,
                block_out_channels=tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)),
            )
        except (KeyError, ValueError, IndexError) as e:
            raise CheckpointError(f"not a FLUX autoencoder checkpoint (no {e})") from None


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
    def __init__(self, config: AutoEncoderConfig | None = None):
        super().__init__()
        self.config = config or AutoEncoderConfig()
        self.encoder, self.decoder = Encoder(self.config), Decoder(self.config)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images in [-1, 1], (B, C, H, W) -> posterior over unscaled latents (B, latent, H/f, W/f)."""
        keep_freed_memory(x.device)
        with threads_for(self._work(x.shape[0], x.shape[-2] * x.shape[-1]), x.device):
            return DiagonalGaussian(self.encoder(self._channels_last(x)).contiguous())

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images in about [-1, 1]."""
        f = self.config.downscale
        keep_freed_memory(z.device)
        with threads_for(self._work(z.shape[0], z.shape[-2] * z.shape[-1] * f * f), z.device):
            return self.decoder(self._channels_last(z)).contiguous()

    @staticmethod
    def _channels_last(x: Tensor) -> Tensor:
        """On the CPU, activations in channels-last layout, which oneDNN convolves without reordering them.

        The weights keep the layout they were given: converting them would hand users non-contiguous state dicts
        (which safetensors refuses to save) and change parameter strides under a DistributedDataParallel wrapper.
        """
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def _work(self, batch: int, pixels: int) -> int:
        """Multiply-adds of one 3x3 convolution at full resolution (see threads.threads_for)."""
        return batch * pixels * self.config.block_out_channels[0] ** 2 * 9

    def scale_latents(self, z: Tensor) -> Tensor:
        """VAE latents -> the unit-variance latents the transformer works in."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor


# ----------------------------------------------------------------------------------------------------
# checkpoint layouts

# (ours, diffusers) name pieces, applied in this order both ways: the mid-block pairs come first so that
# `.block.` <-> `.resnets.` never touches them. Decoder level indices are flipped separately.
_RENAMES = [
    (".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."), (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."), (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".down.", ".down_blocks."), (".up.", ".up_blocks."), (".block.", ".resnets."),
    (".downsample.", ".downsamplers.0."), (".upsample.", ".upsamplers.0."),
    (".nin_shortcut.", ".conv_shortcut."), (".norm_out.", ".conv_norm_out."),
]
_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _flip_up(key: str, levels: int) -> str:
    # diffusers numbers decoder blocks in execution order (coarsest first), BFL by resolution (finest first)
    return re.sub(r"^decoder\.up\.(-?\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)


def diffusers_name(key: str, levels: int) -> str:
    key = _flip_up(key, levels)
    for ours, theirs in _RENAMES:
        key = key.replace(ours, theirs)
    return key


def our_name(key: str, levels: int) -> str:
    for ours, theirs in _RENAMES:
        key = key.replace(theirs, ours)
    return _flip_up(key, levels)


def to_diffusers(state: Mapping[str, Tensor], cfg: AutoEncoderConfig) -> dict[str, Tensor]:
    """Our (= BFL) layout -> diffusers; its attention projections are Linear [C, C], ours 1x1 convs [C, C, 1, 1]."""
    n = len(cfg.block_out_channels)
    return {diffusers_name(k, n): v.flatten(1) if _ATTN_WEIGHT.search(k) else v for k, v in state.items()}


def from_diffusers(state: Mapping[str, Tensor], cfg: AutoEncoderConfig) -> dict[str, Tensor]:
    out = {}
    for key, v in state.items():
        key = our_name(key, len(cfg.block_out_channels))
        out[key] = v[:, :, None, None] if _ATTN_WEIGHT.search(key) and v.ndim == 2 else v
    return out


def from_bfl(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL's ae.safetensors already uses our names; only a bundle prefix may need stripping."""
    return strip_prefix(state, BFL_PREFIXES)


def load_autoencoder(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                     config: AutoEncoderConfig | None = None) -> AutoEncoder:
    """Load from a diffusers `vae/` folder (or a pipeline folder holding one) or a BFL `ae.safetensors`.

    The model is built on the meta device and the memory-mapped tensors are assigned to it, so the
    weights are never held twice. `config` overrides the one read from config.json or the shapes.
    """
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae").is_dir():
        path = path / "vae"
    state = read_state_dict(path)
    diffusers = any(".down_blocks." in k or ".up_blocks." in k for k in state)
    if diffusers:
        if not path.is_dir():
            raise CheckpointError(f"{path} holds diffusers-layout weights: pass the folder with its config.json")
        config = config or AutoEncoderConfig.from_diffusers(read_json(path / "config.json"))
        state = from_diffusers(state, config)
    else:
        state = from_bfl(state)
        config = config or AutoEncoderConfig.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = AutoEncoder(config)
    try:
        load_into(model, state, parse_dtype(dtype), f"autoencoder {path}")
    except CheckpointError as e:
        if not diffusers:
            raise
        n = len(config.block_out_channels)  # name the tensors as the file does
        raise CheckpointError(re.sub(r"[\w.-]+\.(weight|bias)\b", lambda m: diffusers_name(m[0], n), str(e))) from None
    return model.eval()


def save_autoencoder(model: AutoEncoder, folder: str | os.PathLike) -> None:
    """Write a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    state = to_diffusers(model.state_dict(), model.config)
    save_state_dict(state, folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    write_json(model.config.to_diffusers(), folder / "config.json")  # last, so a folder with a config is whole
