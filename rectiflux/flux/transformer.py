"""The FLUX.1 MMDiT: double-stream blocks, single-stream blocks, 3-axis RoPE, adaLN modulation.

Parameter names follow the Black Forest Labs reference (`double_blocks.0.img_attn.qkv.weight`), so a BFL single file
loads as it is; `rectiflux.weights.layout` maps the diffusers names onto these. The model only computes: weights
read on demand come through its `block_weights` hooks (rectiflux.weights.offload), a step cache through `cache`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from .config import FluxConfig
from .layers import (
    MLPEmbedder,
    Modulation,
    QKNorm,
    SelfAttention,
    attention,
    gelu,
    linear_of_concat,
    mlp,
    modulate,
    rope_rotations,
    rotate,
    rotate_joint,
    split_qkv,
    timestep_embedding,
)

Attention = Callable[[Tensor, Tensor, Tensor, "torch.dtype | None"], Tensor]


class DoubleBlock(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention_dtype: torch.dtype | None = None  # None: the activations' dtype (int8-dynamic sets bfloat16)
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(h, 6))
            self.add_module(f"{stream}_attn", SelfAttention(h, cfg.head_dim))
            self.add_module(f"{stream}_mlp", nn.Sequential(
                nn.Linear(h, cfg.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_hidden, h)))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rotations: Tensor,
                attend: Attention = attention) -> tuple[Tensor, Tensor]:
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        n_txt = txt.shape[1]
        streams = [(self.txt_attn, txt, txt_mod), (self.img_attn, img, img_mod)]  # joint sequence is [txt; img]
        qkv = [split_qkv(attn.qkv(modulate(x, *mod[:2])), self.num_heads) for attn, x, mod in streams]
        norms = [attn.norm for attn, _, _ in streams]
        q = rotate_joint([n.query_norm(q) for n, (q, _, _) in zip(norms, qkv, strict=True)], rotations)
        k = rotate_joint([n.key_norm(k) for n, (_, k, _) in zip(norms, qkv, strict=True)], rotations)
        out = attend(q, k, torch.cat([qkv[0][2], qkv[1][2]], dim=1), self.attention_dtype)
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

    def forward(self, x: Tensor, vec: Tensor, rotations: Tensor, attend: Attention = attention) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, hidden = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = rotate(self.norm.query_norm(q), rotations), rotate(self.norm.key_norm(k), rotations)
        y = linear_of_concat(self.linear2, [attend(q, k, v, self.attention_dtype), gelu(hidden)])
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




class BlockHooks(Protocol):
    """Where a model's blocks get their weights when they are not all held (rectiflux.weights.offload)."""

    dtype: torch.dtype | None  # what the blocks are cast to when they come in

    def before(self, name: str, block: nn.Module, device: torch.device) -> None: ...
    def after(self, name: str, block: nn.Module) -> None: ...
    def on_disk(self, name: str) -> bool: ...
    def read_all(self, model: nn.Module) -> None: ...


class StepCache(Protocol):
    """A first-block step cache (rectiflux.sampling.cache.FirstBlockCache)."""

    def lookup(self, first_residual: Tensor) -> Tensor | None: ...
    def store(self, rest_residual: Tensor) -> None: ...


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
        self.attention: Attention = attention  # every block attends through this one function
        self.block_weights: BlockHooks | None = None  # blocks read on demand (load_transformer(blocks=...))
        self.checkpoint = None  # the weights' source, for reading float weights again (rectiflux.weights)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

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

    def work(self, batch: int, tokens: int) -> int:
        """Multiply-adds of one hidden x hidden linear over every token (rectiflux.runtime.threads_for's measure)."""
        return batch * tokens * self.config.hidden_size ** 2

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None, pe: Tensor | None = None,
                cache: StepCache | None = None) -> Tensor:
        """Velocity for packed latents `img` (B, L_img, in_channels) given T5 tokens `txt` and pooled CLIP `y`.

        Image conditioning comes in `img` itself: Fill and Control models widen its channels, Kontext appends the
        reference's tokens to it (with their ids in `img_ids`); the caller keeps the rows it generates.
        With a `cache` (one per sequence of denoising steps), the blocks after the first are skipped on steps where
        the first block's output barely changed, and their effect at the last computed step is reused.
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C), got {tuple(img.shape)} and {tuple(txt.shape)}")
        img, txt = self.img_in(img.to(self.dtype)), self.txt_in(txt.to(self.dtype))
        vec = self.conditioning(timesteps, y, guidance)
        pe = self.position_embedding(txt_ids, img_ids) if pe is None else pe
        after_first = None
        for i, block in enumerate(self.double_blocks):
            before = img
            img, txt = self._run(f"double_blocks.{i}", block, img, txt, vec, pe, self.attention)
            if i == 0 and cache is not None:
                reused = cache.lookup(img - before)
                if reused is not None:
                    return self._run("final_layer", self.final_layer, img + reused, vec)
                after_first = img
        x = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            x = self._run(f"single_blocks.{i}", block, x, vec, pe, self.attention)
        img = x[:, txt.shape[1]:]
        if after_first is not None:
            cache.store(img - after_first)
        return self._run("final_layer", self.final_layer, img, vec)

    def _run(self, name: str, block: nn.Module, *args):
        if self.block_weights is not None:
            self.block_weights.before(name, block, self.device)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            out = grad_checkpoint(block, *args, use_reentrant=False)
        else:
            out = block(*args)
        if self.block_weights is not None:
            self.block_weights.after(name, block)
        return out

    def units(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every part read as one piece: each block, each embedder, the final layer."""
        out = []
        for name, module in self.named_children():
            if name in ("double_blocks", "single_blocks"):
                out += [(f"{name}.{i}", block) for i, block in enumerate(module)]
            else:
                out.append((name, module))
        return out

    def to(self, *args, **kwargs) -> Flux:
        if self.block_weights is None:
            return super().to(*args, **kwargs)
        # units on disk (on the meta device) or kept elsewhere stay there, in the new dtype: they come to img_in's
        # device when they run
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for unit, module in self.units():
            if not self.block_weights.on_disk(unit):
                module.to(*args, **kwargs)
            elif dtype is not None:
                module.to(dtype)
        if dtype is not None:
            self.block_weights.dtype = dtype
        return self

    def materialize(self) -> Flux:
        """Read every block that is still on disk (a lazily loaded model) and stop reading on demand."""
        if self.block_weights is not None:
            self.block_weights.read_all(self)
            self.block_weights = None
        return self
