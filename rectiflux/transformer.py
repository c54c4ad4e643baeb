"""The FLUX.1 MMDiT: double-stream blocks, single-stream blocks, 3-axis RoPE, adaLN modulation.

Parameter names follow the Black Forest Labs reference (`double_blocks.0.img_attn.qkv.weight`), so a BFL
single file loads as it is; the diffusers layout is converted at load and save time (bottom of this file).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .checkpoint import (
    CAN_DROP_MAPPED_PAGES,
    CheckpointError,
    TensorSpan,
    advise_mapped,
    check_fits,
    file_backed,
    load_into,
    parse_dtype,
    read_json,
    read_keys_and_shapes,
    read_rows,
    read_spans,
    read_state_dict,
    save_state_dict,
    strip_prefix,
    weight_files,
    write_json,
)
from .heap import keep_freed_memory, return_freed_memory_to_the_system, weights_in_their_own_mappings
from .threads import threads_for

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
    """Rotate each (even, odd) channel pair of x by its angle, given `rope`'s tables; in float32, back to x's dtype."""
    xf = x.float()
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
    rotated = torch.stack([-x_odd, x_even], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


def rope_rotations(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """The same angles as `rope`, as unit complex numbers: (..., L, head_dim / 2) complex64, one per channel pair.

    Rotating a pair is then one complex multiplication: a single pass over q or k instead of five.
    """
    cos, sin = rope(ids, axes_dim, theta)
    return torch.complex(cos[..., 0::2], sin[..., 0::2])


def rotate(x: Tensor, rotations: Tensor, out: Tensor | None = None) -> Tensor:
    """`apply_rope` for x (..., D) and `rope_rotations` broadcastable to (..., D/2): (a + ib) e^{i angle}.

    Computed in float32 like the references; with `out` (x's shape, any float dtype) the result is written there,
    which lets two streams rotate straight into the halves of one joint tensor.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    if out is not None and out.dtype == torch.float32:
        torch.mul(pairs, rotations, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
        return out
    rotated = torch.view_as_real(pairs * rotations).flatten(-2)
    return rotated.to(x.dtype) if out is None else out.copy_(rotated)


def rotate_joint(streams: list[Tensor], rotations: Tensor) -> Tensor:
    """Rotate each stream's (B, L_s, H, D) q or k by its rows of `rotations` and join them along L.

    At inference each stream is rotated straight into its rows of the joint tensor (no concatenation pass);
    `out=` has no autograd, so while gradients are recorded the rotated streams are concatenated instead.
    """
    offsets = [0]
    for x in streams:
        offsets.append(offsets[-1] + x.shape[1])
    rows = [slice(a, b) for a, b in zip(offsets, offsets[1:], strict=False)]
    if torch.is_grad_enabled():
        return torch.cat([rotate(x, rotations[..., r, :, :]) for x, r in zip(streams, rows, strict=True)], dim=1)
    first = streams[0]
    joint = first.new_empty(first.shape[0], offsets[-1], *first.shape[2:])
    for x, r in zip(streams, rows, strict=True):
        rotate(x, rotations[..., r, :, :], out=joint[:, r])
    return joint


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: layer norm without its own affine, then `(1 + scale) * x + shift` from the conditioning vector.

    For a single image the modulation is one value per channel, which is layer_norm's own affine: one pass over
    x instead of two.
    """
    if x.shape[0] == 1 and shift.shape[0] == 1:
        return F.layer_norm(x, x.shape[-1:], (1 + scale).flatten(), shift.flatten(), eps=1e-6)
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=1e-6), 1 + scale)


def gelu(x: Tensor) -> Tensor:
    """tanh GELU, in place at inference: a fresh activation buffer costs a page fault per 4 KiB page on first touch."""
    if torch.is_grad_enabled():
        return F.gelu(x, approximate="tanh")
    return torch.ops.aten.gelu_(x, approximate="tanh")


def mlp(layers: nn.Sequential, x: Tensor) -> Tensor:
    """A double block's (Linear, GELU, Linear) with the GELU of `gelu`."""
    return layers[2](gelu(layers[0](x)))


def linear_of_concat(linear: nn.Module, parts: list[Tensor]) -> Tensor:
    """`linear(torch.cat(parts, -1))`; for a plain nn.Linear at inference, without building the concatenation.

    Each part multiplies its own column block of the weight and the products are summed in place, which saves
    writing and re-reading the (tokens x 7 hidden) input of a single block's output linear.
    """
    if type(linear) is not nn.Linear or torch.is_grad_enabled():
        return linear(torch.cat(parts, dim=-1))
    y, start = None, 0
    for part in parts:
        x2d = part.reshape(-1, part.shape[-1])
        weight = linear.weight[:, start: start + part.shape[-1]]
        start += part.shape[-1]
        if y is None:
            y = F.linear(x2d, weight, linear.bias)
        else:  # in-place ops are not autocast: under autocast y may be bf16 while the weight is float32
            y.addmm_(x2d.to(y.dtype), weight.t().to(y.dtype))
    return y.view(*parts[0].shape[:-1], -1)


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
        # one fused kernel (float32 inside); under autocast x may be bf16 while the scale is float32
        return F.rms_norm(x, self.scale.shape, self.scale.to(x.dtype), eps=1e-6)


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


def attention(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Joint attention over (B, L, H, D) tensors (any strides), returned as (B, L, H*D) in q's dtype.

    SDPA takes the head-major views without copying and writes its output token-major, so no layout copy is made.
    `dtype` computes it in another precision (bfloat16 for the int8 mode: 3x faster with AMX, 0.4% error, measured
    by python -m benchmarks.kernels).
    """
    out_dtype = q.dtype
    if dtype is not None and dtype != q.dtype:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return x.transpose(1, 2).flatten(2).to(out_dtype)


def _split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*hidden) -> views q, k, v, each (B, L, H, D)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).unbind(dim=2)


class DoubleBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention_dtype: torch.dtype | None = None  # see Flux.set_attention_dtype
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(h, 6))
            self.add_module(f"{stream}_attn", SelfAttention(h, cfg.head_dim))
            self.add_module(f"{stream}_mlp", nn.Sequential(
                nn.Linear(h, cfg.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_hidden, h)))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor]:
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        n_txt = txt.shape[1]
        streams = [(self.txt_attn, txt, txt_mod), (self.img_attn, img, img_mod)]  # joint sequence is [txt; img]
        qkv = [_split_qkv(attn.qkv(modulate(x, *mod[:2])), self.num_heads) for attn, x, mod in streams]
        norms = [attn.norm for attn, _, _ in streams]
        q = rotate_joint([n.query_norm(q) for n, (q, _, _) in zip(norms, qkv, strict=True)], rotations)
        k = rotate_joint([n.key_norm(k) for n, (_, k, _) in zip(norms, qkv, strict=True)], rotations)
        out = attention(q, k, torch.cat([qkv[0][2], qkv[1][2]], dim=1), self.attention_dtype)
        txt_attn, img_attn = out[:, :n_txt], out[:, n_txt:]

        img = torch.addcmul(img, img_mod[2], self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod[5], mlp(self.img_mlp, modulate(img, img_mod[3], img_mod[4])))
        txt = torch.addcmul(txt, txt_mod[2], self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod[5], mlp(self.txt_mlp, modulate(txt, txt_mod[3], txt_mod[4])))
        if txt.dtype == torch.float16:  # the reference's guard against fp16 overflow in the text stream
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleBlock(nn.Module):
    """Attention and MLP in parallel over [txt; img], fused into one input and one output linear."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.hidden, self.mlp_hidden = cfg.num_heads, h, cfg.mlp_hidden
        self.attention_dtype: torch.dtype | None = None
        self.modulation = Modulation(h, 3)
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_hidden)
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h)
        self.norm = QKNorm(cfg.head_dim)

    def forward(self, x: Tensor, vec: Tensor, rotations: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, hidden = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = _split_qkv(qkv, self.num_heads)
        q, k = rotate(self.norm.query_norm(q), rotations), rotate(self.norm.key_norm(k), rotations)
        y = linear_of_concat(self.linear2, [attention(q, k, v, self.attention_dtype), gelu(hidden)])
        x = torch.addcmul(x, gate, y)
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


class FirstBlockCache:
    """Opt-in step cache (first-block caching): skip the transformer's blocks after the first on steps where the
    first double block's image residual has barely changed, adding instead what those blocks added at the last
    step that ran them all.

    The change is the mean absolute difference of the first block's residual from the previous step's, relative
    to the previous one's mean magnitude; it accumulates over skipped steps, so a run of small changes still
    triggers a full step once their sum reaches `threshold` (TeaCache's rule). 0 never skips; FLUX users run
    0.05-0.25 (docs/benchmarks.md measures speed and PSNR). Use one cache per sequence of steps: a true-CFG
    sampler keeps one for the conditional and one for the negative prompt.
    """

    def __init__(self, threshold: float):
        if not threshold >= 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.previous: Tensor | None = None  # the first block's residual at the previous step
        self.rest: Tensor | None = None  # what the other blocks added at the last fully computed step
        self.accumulated = 0.0
        self.skipped = self.computed = 0

    def lookup(self, first_residual: Tensor) -> Tensor | None:
        """The residual to reuse for this step, or None when the step must run every block."""
        previous, self.previous = self.previous, first_residual
        if previous is None or self.rest is None or previous.shape != first_residual.shape:
            return None
        change = ((first_residual - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()
        self.accumulated += change
        if self.accumulated >= self.threshold:
            return None
        self.skipped += 1
        return self.rest

    def store(self, rest_residual: Tensor) -> None:
        self.rest, self.accumulated = rest_residual, 0.0
        self.computed += 1


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
        self.block_weights: BlockWeights | None = None  # blocks read on demand (load_transformer(blocks=...))

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def set_attention_dtype(self, dtype: torch.dtype | None) -> Flux:
        """Compute the blocks' attention in `dtype` (None: the activations' own dtype)."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.attention_dtype = dtype
        return self

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        # like the references, t is rounded to the model dtype before it is scaled by 1000
        vec = self.time_in(timestep_embedding(timesteps.to(self.dtype) * 1000).to(self.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this transformer has a guidance embedder (FLUX.1-dev style): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(self.dtype) * 1000).to(self.dtype))
        return vec + self.vector_in(y.to(self.dtype))

    def position_embedding(self, txt_ids: Tensor, img_ids: Tensor) -> Tensor:
        """RoPE rotations for [txt; img], (L, 1, D/2) or (B, L, 1, D/2) to broadcast over the heads of (B, L, H, D)
        tensors; a sampler computes them once per generation and passes them as `pe`."""
        rotations = rope_rotations(torch.cat([txt_ids, img_ids], dim=-2), self.config.axes_dim, self.config.theta)
        return rotations.unsqueeze(-2)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None, pe: Tensor | None = None,
                cache: FirstBlockCache | None = None) -> Tensor:
        """Velocity for packed latents `img` (B, L_img, in_channels) given T5 tokens `txt` and pooled CLIP `y`.

        With a `cache` (one per sequence of denoising steps), the blocks after the first are skipped on steps where
        the first block's output barely changed, and their effect at the last computed step is reused.
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C), got {tuple(img.shape)} and {tuple(txt.shape)}")
        h = self.config.hidden_size
        device = self.img_in.weight.device
        keep_freed_memory(device)
        with threads_for(img.shape[0] * (img.shape[1] + txt.shape[1]) * h * h, device):
            return self._forward(img, img_ids, txt, txt_ids, timesteps, y, guidance, pe, cache)

    def _forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None, pe: Tensor | None, cache: FirstBlockCache | None) -> Tensor:
        img, txt = self.img_in(img.to(self.dtype)), self.txt_in(txt.to(self.dtype))
        vec = self.conditioning(timesteps, y, guidance)
        pe = self.position_embedding(txt_ids, img_ids) if pe is None else pe
        after_first = None
        for i, block in enumerate(self.double_blocks):
            before = img
            img, txt = self._run(f"double_blocks.{i}", block, img, txt, vec, pe)
            if i == 0 and cache is not None:
                reused = cache.lookup(img - before)
                if reused is not None:
                    return self._run("final_layer", self.final_layer, img + reused, vec)
                after_first = img
        x = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            x = self._run(f"single_blocks.{i}", block, x, vec, pe)
        img = x[:, txt.shape[1]:]
        if after_first is not None:
            cache.store(img - after_first)
        return self._run("final_layer", self.final_layer, img, vec)

    def _run(self, name: str, block: nn.Module, *args):
        if self.block_weights is not None:
            self.block_weights.before(name, block, self.img_in.weight.device)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            out = grad_checkpoint(block, *args, use_reentrant=False)
        else:
            out = block(*args)
        if self.block_weights is not None:
            self.block_weights.after(name, block)
        return out

    def to(self, *args, **kwargs) -> Flux:
        if self.block_weights is None:
            return super().to(*args, **kwargs)
        # units still on disk (on the meta device) stay there: they are read onto img_in's device when they run
        weights = self.block_weights
        for name, module in self.named_children():
            units = (list(zip([f"{name}.{i}" for i in range(len(module))], module, strict=True))
                     if name in ("double_blocks", "single_blocks") else [(name, module)])
            for unit, m in units:
                if unit not in weights.next or unit in weights.loaded:
                    m.to(*args, **kwargs)
        return self

    def materialize(self) -> Flux:
        """Read every block that is still on disk (a lazily loaded model) and stop reading on demand."""
        if self.block_weights is not None:
            if self.block_weights.mode == "stream":
                raise ValueError("a streamed transformer keeps its blocks on disk; load it with blocks='memory'")
            device = self.img_in.weight.device
            for unit in self.block_weights.next:
                self.block_weights.before(unit, self.get_submodule(unit), device)
            self.block_weights = None
        return self


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


def unit_of(key: str) -> str:
    """The piece of the model a tensor belongs to: `double_blocks.3`, `single_blocks.0`, `img_in`, ..."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") and len(parts) > 2 else parts[0]


def blocks_of(cfg: FluxConfig) -> list[str]:
    """The names of the double and single blocks, in the order they run."""
    return [f"double_blocks.{i}" for i in range(cfg.depth)] + [f"single_blocks.{i}" for i in range(cfg.depth_single)]


class CheckpointUnits:
    """The tensors of a transformer checkpoint, by our names, read one unit (a block, an embedder) at a time.

    Only the headers are read up front. `read(unit)` builds each tensor by plain reads into fresh memory: a
    diffusers q/k/v triple is read straight into the rows of the fused weight, so nothing is mapped or copied
    twice. `check(model)` compares names and shapes with the model before any weight is read.
    """

    def __init__(self, path: Path, cfg: FluxConfig, diffusers_layout: bool, what: str):
        self.path, self.what = path, what
        self._mapped: dict[str, Tensor] | None = None
        self._droppable = False  # whether _mapped really is file mappings, whose pages can be given back
        spans = read_spans(path)
        self.parts: dict[str, list[tuple[TensorSpan, int, int]]] = {}
        self.stored: dict[str, str] = {}  # our name -> stored name, for tensors used exactly as stored
        if diffusers_layout:
            for ours, theirs in _diffusers_parts(cfg).items():
                for our_suffix, their_suffix in _suffixes(ours):
                    keys = [f"{t}.{their_suffix}" for t in theirs]
                    if not all(k in spans for k in keys):
                        continue  # check() names what is missing
                    parts = [(span, 0, span.shape[0]) for span in (spans.pop(k) for k in keys)]
                    if ours == "final_layer.adaLN_modulation.1":  # stored (scale, shift), ours (shift, scale)
                        span, _, rows = parts[0]
                        parts = [(span, rows // 2, rows), (span, 0, rows // 2)]
                    elif len(keys) == 1:
                        self.stored[f"{ours}.{our_suffix}"] = keys[0]
                    self.parts[f"{ours}.{our_suffix}"] = parts
            renamed = spans  # whatever is left is unexpected: check() names it by its diffusers name
        else:
            prefix = next((p for p in BFL_PREFIXES if spans and all(k.startswith(p) for k in spans)), "")
            renamed = {k[len(prefix):]: v for k, v in spans.items()}
            self.stored.update({k[len(prefix):]: k for k in spans})
        self.parts.update({k: [(v, 0, v.shape[0] if v.shape else 1)] for k, v in renamed.items()})
        self.units: dict[str, list[str]] = {}
        for key in self.parts:
            self.units.setdefault(unit_of(key), []).append(key)

    def shape(self, key: str) -> tuple[int, ...]:
        first = self.parts[key][0][0]
        if len(self.parts[key]) == 1:
            return first.shape
        return (sum(stop - start for _, start, stop in self.parts[key]), *first.shape[1:])

    def check(self, model: nn.Module) -> None:
        """Refuse, naming the tensors, a checkpoint whose names or shapes do not fit `model`."""
        check_fits(model, {k: self.shape(k) for k in self.parts}, self.what)

    def read(self, unit: str, mapped: bool = False) -> dict[str, Tensor]:
        """The tensors of one unit, named relative to it (`img_attn.qkv.weight` for `double_blocks.3`).

        With `mapped`, tensors used exactly as stored are memory-mapped views of the file (their pages are read,
        from the page cache, as they are used, and belong to the page cache rather than to this process's own
        memory); only the fused ones are read into fresh memory.
        """
        if mapped and self._mapped is None:
            self._mapped = read_state_dict(self.path)  # maps the files; reads no weight
            self._droppable = file_backed(self._mapped.values())
        strip = len(unit) + 1
        return {k[strip:]: self._mapped[self.stored[k]] if mapped and k in self.stored
                else read_rows(self.parts[k]).view(self.shape(k)) for k in self.units.get(unit, [])}

    def mapped_tensors(self, unit: str) -> list[Tensor]:
        """The memory-mapped views `read(unit, mapped=True)` hands out, whose pages can be given back and mapped
        ahead (`advise_mapped`); none before the first such read, or if the files were not really mapped."""
        if not self._droppable:
            return []
        return [self._mapped[self.stored[k]] for k in self.units.get(unit, []) if k in self.stored]


class BlockWeights:
    """Reads a transformer's blocks from disk when they are first needed ("lazy") or each time ("stream").

    "lazy" loads in the time it takes to read the headers and then holds each block from its first use on,
    as a memory-mapped file would; "stream" frees each block after it ran, so peak memory is about two blocks
    plus the activations and the small float parts, for machines that cannot hold the model. While a streamed
    block, or a lazy one on a GPU, runs, the next one is read by a background thread (file reads release the GIL).
    With `mapped`, blocks on the CPU use the tensors they keep as stored straight from the memory-mapped file; a
    streamed block then gives its pages back to the page cache after it ran (`advise_mapped`) and the background
    thread maps the next block's pages in advance, which costs page-table work instead of a copy of every weight.
    `prepare(block)` runs on each block right after it was read (casting, quantisation, attention dtype).
    """

    def __init__(self, units: CheckpointUnits, mode: str, order: list[str],
                 prepare: Callable[[nn.Module], None] | None = None, mapped: bool = False):
        if mode not in ("lazy", "stream"):
            raise ValueError(f"unknown blocks mode {mode!r}; use 'memory', 'lazy' or 'stream'")
        # a streamed block may only use the mapped file where its pages can be given back after it ran
        mapped = mapped and (mode == "lazy" or CAN_DROP_MAPPED_PAGES)
        self.units, self.mode, self.prepare, self.mapped = units, mode, prepare, mapped
        self.next = dict(zip(order, [*order[1:], order[0]], strict=True)) if order else {}
        self.loaded: set[str] = set()
        self.pending: tuple[str, Future] | None = None
        self.reader = None
        if mode == "stream":
            self.reader = ThreadPoolExecutor(1, thread_name_prefix="rectiflux-blocks")
            return_freed_memory_to_the_system()

    def _read(self, name: str, mapped: bool) -> dict[str, Tensor]:
        if self.pending is not None and self.pending[0] == name:
            state, self.pending = self.pending[1].result(), None
            return state
        return self.units.read(name, mapped=mapped)

    def before(self, name: str, block: nn.Module, device: torch.device) -> None:
        if name in self.loaded or name not in self.next:  # in memory already, or not one of ours
            return
        # A lazy model on the CPU that keeps its tensors as stored maps them: cheaper than copying into fresh
        # memory (measured on a 1.3 B-parameter model, the first step took 15.4 s with every tensor copied,
        # diffusers' mapped 7.9 s). A streamed one must really free each block, so it copies; so does one on a
        # GPU, where the block is copied to the device anyway and the mapped pages would stay resident beside
        # the copy (benchmarks.bench on an H100, FLUX.1-dev-sized in bfloat16: 17.8 GiB peak RSS mapped,
        # diffusers 10.7 GiB), and where reading the next block while this one runs hides the reads.
        on_cpu = torch.device(device).type == "cpu"
        mapped = self.mapped and on_cpu
        with weights_in_their_own_mappings():
            state = {k: v.to(device) for k, v in self._read(name, mapped).items()}
            if not on_cpu and self.reader is None:
                self.reader = ThreadPoolExecutor(1, thread_name_prefix="rectiflux-blocks")
            upcoming = self.next[name]
            if self.reader is not None and self.pending is None and upcoming not in self.loaded:
                self.pending = (upcoming, self.reader.submit(self._read_ahead, upcoming, mapped))
            load_into(block, state, None, f"{self.units.what} ({name})")
            if self.prepare is not None:
                self.prepare(block)
        self.loaded.add(name)

    def _read_ahead(self, name: str, mapped: bool) -> dict[str, Tensor]:
        state = self.units.read(name, mapped=mapped)
        if mapped:
            advise_mapped(self.units.mapped_tensors(name), "populate")
        return state

    def after(self, name: str, block: nn.Module) -> None:
        if self.mode == "stream" and name in self.next:
            block.to_empty(device="meta")  # drops the weights; the next call reads them again
            if self.mapped:  # harmless if the block ran elsewhere: its mapped pages were then never touched
                advise_mapped(self.units.mapped_tensors(name), "drop")
            self.loaded.discard(name)


BLOCK_MODES = ("memory", "lazy", "stream")


def load_transformer(path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
                     axes_dim: tuple[int, ...] | None = None, device: torch.device | str | None = None,
                     blocks: str = "memory", prepare: Callable[[nn.Module], None] | None = None) -> Flux:
    """Load a FLUX.1 transformer from a diffusers folder or a BFL single .safetensors file.

    The model is built on the meta device and the stored tensors are assigned to it, so the weights are never
    held twice. `blocks` says when the double and single blocks are read: "memory" (now: tensors used as stored
    are memory-mapped, a diffusers folder's q/k/v are read straight into their fused tensors), "lazy" (at first
    use) or "stream" (before every use, freed after it). `prepare(block)` runs on each block once it is in
    memory, in every mode (quantisation uses it). The final layer is read with the blocks (in the diffusers
    layout its modulation's halves are swapped, a copy); the small embedders are read (mapped) at once.
    """
    if blocks not in BLOCK_MODES:
        raise ValueError(f"unknown blocks mode {blocks!r}; use one of {', '.join(BLOCK_MODES)}")
    path, cfg, diffusers_layout = read_config(path, axes_dim)
    what = f"{'diffusers' if diffusers_layout else 'BFL'} transformer {path}"
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = Flux(cfg)
    units = CheckpointUnits(path, cfg, diffusers_layout, what)
    units.check(model)
    block_names = blocks_of(cfg)
    # Tensors used exactly as stored are memory-mapped; but where every block is rewritten (cast to another
    # dtype, quantised), a mapping would keep the pages it touched resident beside the result, so those read
    # into fresh memory that is freed once the block is rewritten.
    as_stored = prepare is None and all(dtype in (None, parts[0][0].dtype) for parts in units.parts.values()
                                        if parts[0][0].dtype.is_floating_point)
    if blocks == "memory" and as_stored:
        mapped = read_state_dict(path)  # memory-mapped: nothing is read until used
        state = {k: mapped.pop(units.stored[k]) if k in units.stored else read_rows(units.parts[k]).view(units.shape(k))
                 for k in units.parts}
        del mapped
        load_into(model, state, dtype, what)
    else:
        on_demand = [*block_names, "final_layer"]
        for unit in units.units.keys() - set(on_demand):
            load_into(model.get_submodule(unit), units.read(unit, mapped=as_stored), dtype, what)

        def cast_and_prepare(block: nn.Module) -> None:
            if dtype is not None:
                block.to(dtype)
            if prepare is not None and block is not model.final_layer:  # `prepare` is for blocks
                prepare(block)

        weights = BlockWeights(units, "stream" if blocks == "stream" else "lazy", on_demand, cast_and_prepare,
                               mapped=as_stored)
        if blocks == "memory":  # one block at a time: peak is the rewritten model plus one block as stored
            device_now = model.img_in.weight.device
            for name in on_demand:
                weights.before(name, model.get_submodule(name), device_now)
        else:
            model.block_weights = weights
    model = model.eval()
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
