"""The transformer's building blocks: embeddings, 3-axis RoPE, adaLN modulation, norms, and attention.

Each is a small pure function or module; the blocks in `transformer.py` are composed of them. `attention` is the one
function that computes attention: a model takes it as its `attention` attribute, so a parallel backend replaces
it there (and only there).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
    if torch.compiler.is_compiling():  # inductor cannot generate complex arithmetic; as reals it fuses into one pass
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rotations.real, rotations.imag
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return rotated.to(x.dtype) if out is None else out.copy_(rotated)
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
    if type(linear) is not nn.Linear or torch.is_grad_enabled() or linear._forward_hooks:  # hooks: a LoRA
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
    `dtype` computes it in another precision (bfloat16 in the int8-dynamic mode, where the CPU has fast bf16 kernels:
    `python -m benchmarks.kernels` measures both).
    """
    out_dtype = q.dtype
    if dtype is not None and dtype != q.dtype:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return x.transpose(1, 2).flatten(2).to(out_dtype)


# scores per product in attention_by_head, at most (4 MiB in bfloat16): past that a product's scores leave the caches
# and it runs no faster than SDPA (docs/architecture.md, "Figures behind the code's choices")
SCORES_PER_PRODUCT = 1 << 21


def attention_by_head(q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`attention` as two matrix products around a softmax, head by head, its scores in the inputs' dtype.

    The int8-dynamic mode's attention on CPUs where it beats SDPA (`rectiflux.runtime.kernels` times both): there
    SDPA's bfloat16 kernel runs little faster than in float32 while bfloat16 products run over twice as fast.
    Eagerly the query rows go in chunks whose scores stay in the caches; a compiled graph takes whole heads and the
    whole batch in each product, so that no sequence length or batch size recompiles it. The price is the scores'
    rounding to bfloat16 (SDPA keeps them in float32): a larger error than SDPA's (tests/test_transformer.py bounds
    it at three times), so no exact mode uses it.
    """
    if q.device.type != "cpu":  # a model moved to a GPU after loading: SDPA's fused kernels are the fast ones there
        return attention(q, k, v, dtype)
    out_dtype = q.dtype
    if dtype is not None and dtype != q.dtype:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batch, length, heads, head_dim = q.shape
    q = q * head_dim**-0.5
    out = torch.empty_like(q)
    if torch.compiler.is_compiling():
        for h in range(heads):
            out[:, :, h] = torch.softmax(q[:, :, h] @ k[:, :, h].transpose(1, 2), dim=-1) @ v[:, :, h]
    else:
        rows = max(256, SCORES_PER_PRODUCT // length)
        for b, h in itertools.product(range(batch), range(heads)):
            keys, values = k[b, :, h].t(), v[b, :, h]
            for start in range(0, length, rows):
                part = slice(start, start + rows)
                out[b, part, h] = torch.softmax(q[b, part, h] @ keys, dim=-1) @ values
    return out.flatten(2).to(out_dtype)


# the transformer's attention functions by the names a recipe records (`Flux.attention`, `load(kernels=...)`)
ATTENTIONS = {"sdpa": attention, "by-head": attention_by_head}


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*hidden) -> views q, k, v, each (B, L, H, D)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).unbind(dim=2)
