"""The FLUX.1 MMDiT: double-stream blocks, single-stream blocks, 3-axis RoPE, adaLN modulation.

Parameter names follow the Black Forest Labs reference (`double_blocks.0.img_attn.qkv.weight`), so a BFL
single file loads as it is; the diffusers layout is converted at load and save time (bottom of this file).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .checkpoint import (
    CheckpointError,
    load_into,
    parse_dtype,
    read_json,
    read_keys_and_shapes,
    read_state_dict,
    save_state_dict,
    strip_prefix,
    weight_files,
    write_json,
)

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


@dataclass
class FluxConfig:
    in_channels: int = 64
    out_channels: int | None = None  # None: same as in_channels
    num_heads: int = 24
    head_dim: int = 128
    depth: int = 19  # double-stream blocks
    depth_single: int = 38
    mlp_ratio: float = 4.0
    joint_attention_dim: int = 4096  # T5 width
    pooled_projection_dim: int = 768  # CLIP pooled width
    axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    theta: int = 10_000
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        self.axes_dim = tuple(self.axes_dim)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"RoPE axes {self.axes_dim} must be even and sum to head_dim {self.head_dim}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> FluxConfig:
        if cfg.get("patch_size", 1) != 1:
            raise CheckpointError(f"patch_size {cfg['patch_size']} is not FLUX.1 (expected 1)")
        return cls(
            in_channels=cfg.get("in_channels", 64), out_channels=cfg.get("out_channels"),
            num_heads=cfg.get("num_attention_heads", 24), head_dim=cfg.get("attention_head_dim", 128),
            depth=cfg.get("num_layers", 19), depth_single=cfg.get("num_single_layers", 38),
            joint_attention_dim=cfg.get("joint_attention_dim", 4096),
            pooled_projection_dim=cfg.get("pooled_projection_dim", 768),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))), guidance_embed=cfg.get("guidance_embeds", False),
        )

    def to_diffusers(self) -> dict:
        return {
            "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "num_layers": self.depth, "num_single_layers": self.depth_single,
            "attention_head_dim": self.head_dim, "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.joint_attention_dim, "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embed, "axes_dims_rope": list(self.axes_dim),
        }

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
        """Read a config off the tensor shapes of a checkpoint in our (= BFL) naming."""
        def count(prefix: str) -> int:
            return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})
        try:
            hidden, in_channels = shapes["img_in.weight"]
            qnorm = "double_blocks.0.img_attn.norm.query_norm.scale"
            head_dim = shapes[qnorm if qnorm in shapes else "single_blocks.0.norm.query_norm.scale"][0]
            if "double_blocks.0.img_mlp.0.weight" in shapes:
                mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
            else:
                mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
            cfg = dict(
                in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0],
                num_heads=hidden // head_dim, head_dim=head_dim,
                depth=count("double_blocks."), depth_single=count("single_blocks."), mlp_ratio=mlp_hidden / hidden,
                joint_attention_dim=shapes["txt_in.weight"][1],
                pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
                guidance_embed="guidance_in.in_layer.weight" in shapes,
            )
        except (KeyError, ValueError, IndexError) as e:
            raise CheckpointError(f"not a FLUX.1 transformer checkpoint (no {e})") from None
        if axes_dim is None:
            if head_dim != 128:  # RoPE axes leave no trace in the weights; only FLUX.1's own are known
                raise CheckpointError(f"cannot read the RoPE axes of a head_dim {head_dim} checkpoint; pass axes_dim")
            axes_dim = (16, 56, 56)
        return cls(axes_dim=tuple(axes_dim), **cfg)


# ----------------------------------------------------------------------------------------------------
# pure functions

def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of t (already scaled to [0, 1000]); computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """cos and sin tables for 3-axis RoPE, each (..., L, head_dim), repeated per (even, odd) channel pair.

    Angles are computed in float64: positions reach thousands and float32 would lose the low frequencies.
    """
    pos = ids.float().double()
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(pos[..., i, None] * omega)
    angles = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (even, odd) channel pair of x (B, H, L, D) by its angle; in float32, back to x's dtype."""
    xf = x.float()
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
    rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------
# modules

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class Modulation(nn.Module):
    def __init__(self, hidden: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(hidden, n * hidden)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class SelfAttention(nn.Module):
    """The per-stream half of a double block's joint attention: qkv in, q/k normalised, projection out."""

    def __init__(self, hidden: int, head_dim: int):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(hidden, hidden)


def split_heads(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*hidden) -> q, k, v as (B, H, L, D), with q and k RMS-normalised."""
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return norm.query_norm(q), norm.key_norm(k), v


def attention(q: Tensor, k: Tensor, v: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    q, k = apply_rope(q, *pe), apply_rope(k, *pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


class DoubleBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(h, 6))
            self.add_module(f"{stream}_attn", SelfAttention(h, cfg.head_dim))
            self.add_module(f"{stream}_mlp", nn.Sequential(
                nn.Linear(h, cfg.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_hidden, h)))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_qkv = split_heads(self.img_attn.qkv(modulate(img, *img_mod[:2])), self.num_heads, self.img_attn.norm)
        txt_qkv = split_heads(self.txt_attn.qkv(modulate(txt, *txt_mod[:2])), self.num_heads, self.txt_attn.norm)
        attn = attention(*(torch.cat([t, i], dim=2) for t, i in zip(txt_qkv, img_qkv, strict=True)), pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod[2] * self.img_attn.proj(img_attn)
        img = img + img_mod[5] * self.img_mlp(modulate(img, img_mod[3], img_mod[4]))
        txt = txt + txt_mod[2] * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod[5] * self.txt_mlp(modulate(txt, txt_mod[3], txt_mod[4]))
        if txt.dtype == torch.float16:  # the reference's guard against fp16 overflow in the text stream
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleBlock(nn.Module):
    """Attention and MLP in parallel over [txt; img], fused into one input and one output linear."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.hidden, self.mlp_hidden = cfg.num_heads, h, cfg.mlp_hidden
        self.modulation = Modulation(h, 3)
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_hidden)
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h)
        self.norm = QKNorm(cfg.head_dim)

    def forward(self, x: Tensor, vec: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        attn = attention(*split_heads(qkv, self.num_heads, self.norm), pe)
        x = x + gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(DoubleBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = LastLayer(h, cfg.out_channels)
        self.gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        # like the references, t is rounded to the model dtype before it is scaled by 1000
        vec = self.time_in(timestep_embedding(timesteps.to(self.dtype) * 1000).to(self.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this transformer has a guidance embedder (FLUX.1-dev style): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(self.dtype) * 1000).to(self.dtype))
        return vec + self.vector_in(y.to(self.dtype))

    def position_embedding(self, txt_ids: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE tables for [txt; img]; a sampler computes them once per generation and passes them as `pe`."""
        cos, sin = rope(torch.cat([txt_ids, img_ids], dim=-2), self.config.axes_dim, self.config.theta)
        return (cos[:, None], sin[:, None]) if cos.ndim == 3 else (cos, sin)  # batched ids: broadcast over heads

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None, pe: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Velocity for packed latents `img` (B, L_img, in_channels) given T5 tokens `txt` and pooled CLIP `y`."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C), got {tuple(img.shape)} and {tuple(txt.shape)}")
        img, txt = self.img_in(img.to(self.dtype)), self.txt_in(txt.to(self.dtype))
        vec = self.conditioning(timesteps, y, guidance)
        pe = self.position_embedding(txt_ids, img_ids) if pe is None else pe
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return grad_checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# ----------------------------------------------------------------------------------------------------
# checkpoint layouts: ours is BFL's; diffusers splits q, k, v (and the single blocks' MLP input) into separate
# linears and stores the final adaLN as (scale, shift) instead of (shift, scale).

def _diffusers_parts(cfg: FluxConfig) -> dict[str, list[str]]:
    """Our parameter prefix -> the diffusers prefixes whose rows it concatenates (in order)."""
    parts = {
        "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
        "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
        "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
        "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
        "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
        "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    }
    if cfg.guidance_embed:
        parts["guidance_in.in_layer"] = ["time_text_embed.guidance_embedder.linear_1"]
        parts["guidance_in.out_layer"] = ["time_text_embed.guidance_embedder.linear_2"]
    for i in range(cfg.depth):
        ours, theirs = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        parts |= {
            ours + "img_mod.lin": [theirs + "norm1.linear"], ours + "txt_mod.lin": [theirs + "norm1_context.linear"],
            ours + "img_attn.qkv": [theirs + f"attn.to_{c}" for c in "qkv"],
            ours + "txt_attn.qkv": [theirs + f"attn.add_{c}_proj" for c in "qkv"],
            ours + "img_attn.norm.query_norm": [theirs + "attn.norm_q"],
            ours + "img_attn.norm.key_norm": [theirs + "attn.norm_k"],
            ours + "txt_attn.norm.query_norm": [theirs + "attn.norm_added_q"],
            ours + "txt_attn.norm.key_norm": [theirs + "attn.norm_added_k"],
            ours + "img_attn.proj": [theirs + "attn.to_out.0"], ours + "txt_attn.proj": [theirs + "attn.to_add_out"],
            ours + "img_mlp.0": [theirs + "ff.net.0.proj"], ours + "img_mlp.2": [theirs + "ff.net.2"],
            ours + "txt_mlp.0": [theirs + "ff_context.net.0.proj"], ours + "txt_mlp.2": [theirs + "ff_context.net.2"],
        }
    for i in range(cfg.depth_single):
        ours, theirs = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        parts |= {
            ours + "modulation.lin": [theirs + "norm.linear"],
            ours + "linear1": [theirs + f"attn.to_{c}" for c in "qkv"] + [theirs + "proj_mlp"],
            ours + "norm.query_norm": [theirs + "attn.norm_q"], ours + "norm.key_norm": [theirs + "attn.norm_k"],
            ours + "linear2": [theirs + "proj_out"],
        }
    return parts


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _suffixes(ours: str) -> list[tuple[str, str]]:
    # RMSNorm scales are `scale` here and `weight` in diffusers
    return [("scale", "weight")] if ours.endswith("_norm") else [("weight", "weight"), ("bias", "bias")]


def from_diffusers(state: dict[str, Tensor], cfg: FluxConfig) -> dict[str, Tensor]:
    """diffusers names -> ours; consumes `state` so each tensor is held once."""
    out: dict[str, Tensor] = {}
    for ours, theirs in _diffusers_parts(cfg).items():
        for our_suffix, their_suffix in _suffixes(ours):
            keys = [f"{t}.{their_suffix}" for t in theirs]
            if not all(k in state for k in keys):
                continue  # load_into names what is missing
            tensors = [state.pop(k) for k in keys]
            t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            out[f"{ours}.{our_suffix}"] = _swap_halves(t) if ours == "final_layer.adaLN_modulation.1" else t
    out.update(state)  # whatever is left is unexpected: load_into reports it by its diffusers name
    return out


def to_diffusers(state: dict[str, Tensor], cfg: FluxConfig) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    h = cfg.hidden_size
    for ours, theirs in _diffusers_parts(cfg).items():
        for our_suffix, their_suffix in _suffixes(ours):
            t = state[f"{ours}.{our_suffix}"]
            if ours == "final_layer.adaLN_modulation.1":
                t = _swap_halves(t)
            sizes = [h, h, h, cfg.mlp_hidden][: len(theirs)] if len(theirs) > 1 else [t.shape[0]]
            for name, piece in zip(theirs, t.split(sizes, dim=0), strict=True):
                out[f"{name}.{their_suffix}"] = piece
    return out


def _is_diffusers(keys) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys)


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "transformer").is_dir():
        return path / "transformer"  # a whole pipeline folder
    return path


def read_config(path: str | os.PathLike, axes_dim: tuple[int, ...] | None = None) -> tuple[Path, FluxConfig, bool]:
    """(weights path, config, whether the diffusers layout) of a transformer checkpoint, reading no weight.

    The config comes from config.json for the diffusers layout, else from the tensor shapes (and the config
    our own BFL-layout saves keep in their metadata).
    """
    path = _resolve(path)
    shapes = read_keys_and_shapes(path)
    if _is_diffusers(shapes):
        config_file = (path if path.is_dir() else path.parent) / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"diffusers-layout weights {path} need their config.json beside them")
        cfg = FluxConfig.from_diffusers(read_json(config_file))
        if axes_dim is not None:
            cfg.axes_dim = tuple(axes_dim)
        return path, cfg, True
    if axes_dim is None:
        axes_dim = _saved_config(path).get("axes_dim")
    return path, FluxConfig.from_shapes(strip_prefix(shapes, BFL_PREFIXES), axes_dim), False


def load_transformer(path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
                     axes_dim: tuple[int, ...] | None = None, device: torch.device | str | None = None) -> Flux:
    """Load a FLUX.1 transformer from a diffusers folder or a BFL single .safetensors file.

    The model is built on the meta device and the memory-mapped tensors are assigned to it, so the
    weights are never held twice.
    """
    path, cfg, diffusers_layout = read_config(path, axes_dim)
    if diffusers_layout:
        state = from_diffusers(read_state_dict(path), cfg)
        what = f"diffusers transformer {path}"
    else:
        state = strip_prefix(read_state_dict(path), BFL_PREFIXES)
        what = f"BFL transformer {path}"
    with torch.device("meta"):
        model = Flux(cfg)
    model = load_into(model, state, parse_dtype(dtype), what).eval()
    return model.to(device) if device is not None else model


def _saved_config(path: Path) -> dict:
    """The config we store in a BFL-layout file's metadata (BFL's own files carry none)."""
    with safe_open(str(weight_files(path)[0]), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta.get("rectiflux_config", "{}"))
    except ValueError:
        return {}


def save_transformer(model: Flux, path: str | os.PathLike, layout: str = "diffusers") -> None:
    """Save in the diffusers layout (a folder diffusers can read) or the BFL layout (one .safetensors file)."""
    state = model.state_dict()
    cfg = model.config
    if layout == "diffusers":
        path = Path(path)
        save_state_dict(to_diffusers(state, cfg), path / "diffusion_pytorch_model.safetensors", {"format": "pt"})
        write_json(cfg.to_diffusers(), path / "config.json")
    elif layout == "bfl":
        save_state_dict(state, path, {"format": "pt", "rectiflux_config": json.dumps(asdict(cfg))})
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'diffusers' or 'bfl'")
