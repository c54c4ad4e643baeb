"""Ulysses sequence parallelism: the transformer's steps for one image spread over the processes of a group.

Each of the N processes (ranks) holds a shard of the text tokens and a shard of the image tokens, with the
matching rows of the RoPE rotations, and runs every block on its shard: everything a block does except attention
works token by token. In attention, one all-to-all turns the sequence shards into head shards (each rank then has
every token of the joint sequence for H/N heads), the attention function the model had runs on them, and a
second all-to-all brings each rank its own tokens back, for all heads. The last layer's output is gathered, so
the sampler sees the whole sequence: every rank draws the same noise and computes the same latents.

Token counts need not divide by N: shard r holds `shard_bounds(L, N)[r]` (sizes differ by at most one), padded
with zero rows to `padded_length(L, N)` so that every all-to-all moves equal chunks. After the first exchange the
padding rows are dropped and the real tokens put back in the unsharded [txt; img] order (`exchanged_order`), so
attention sees exactly the single-process sequence: padded keys never take part, and padded queries produce
zeros. The step cache's residuals are gathered before it decides, so every rank skips the same steps.

Ring attention (ring.py, `backend="ring"`) uses the same plan, sharded forward and gathers; only the attention
slot differs: queries stay, k/v shards travel round the ranks, and any head count works.

The small functions (bounds, padding, the exchanges' reshapes) are pure and take no group; `SequenceParallel-
Attention` and the forward wrapper are the only parts that talk to torch.distributed (NCCL on CUDA, gloo on the
CPU, which in torch 2.13 supports all_to_all_single and all_gather).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

Group = Any  # a torch.distributed ProcessGroup, a one-dimensional DeviceMesh, or None for the default group


# ----------------------------------------------------------------------------------------------------
# pure functions: where the rows go


def shard_bounds(length: int, world: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's rows when `length` rows are split over `world` ranks: the first
    `length % world` ranks take one row more than the others."""
    if world < 1 or length < 0:
        raise ValueError(f"cannot split {length} rows over {world} ranks")
    base, extra = divmod(length, world)
    bounds, start = [], 0
    for rank in range(world):
        end = start + base + (rank < extra)
        bounds.append((start, end))
        start = end
    return bounds


def padded_length(length: int, world: int) -> int:
    """The rows every rank holds once its shard is padded: the largest shard's."""
    return -(-length // world)


def check_heads(num_heads: int, world: int) -> None:
    """Refuse a head count the world size does not divide (each rank attends with num_heads / world heads)."""
    if num_heads % world:
        raise ValueError(f"sequence parallelism over {world} processes needs a head count divisible by {world}, "
                         f"but the model has {num_heads} attention heads")


def pad_rows(x: Tensor, length: int, dim: int, value: complex = 0) -> Tensor:
    """x with rows filled with `value` appended along `dim` up to `length` rows (x itself when it has them)."""
    missing = length - x.shape[dim]
    if missing < 0:
        raise ValueError(f"cannot pad {x.shape[dim]} rows to {length}")
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def shard_rows(x: Tensor, bounds: list[tuple[int, int]], rank: int, dim: int, value: complex = 0) -> Tensor:
    """Rank `rank`'s rows of x along `dim`, padded to the largest shard's length."""
    start, end = bounds[rank]
    return pad_rows(x.narrow(dim, start, end - start), bounds[0][1] - bounds[0][0], dim, value)


def unshard_rows(shards: Tensor, bounds: list[tuple[int, int]], dim: int) -> Tensor:
    """The inverse of `shard_rows` over every rank: `shards` stacks each rank's padded shard on a new first
    dimension, `dim` is the rows' dimension within a shard; returns the rows in order, padding dropped."""
    return torch.cat([shards[r].narrow(dim, 0, end - start) for r, (start, end) in enumerate(bounds)], dim=dim)


@dataclass(frozen=True)
class Plan:
    """Where one call's tokens are: rank r holds text rows `txt_bounds[r]` then image rows `img_bounds[r]`, padded
    to `txt_local` and `img_local` rows, so its local joint sequence is (txt_local + img_local) rows."""

    world: int
    rank: int
    n_txt: int
    n_img: int

    @cached_property
    def txt_bounds(self) -> list[tuple[int, int]]:
        return shard_bounds(self.n_txt, self.world)

    @cached_property
    def img_bounds(self) -> list[tuple[int, int]]:
        return shard_bounds(self.n_img, self.world)

    @property
    def txt_local(self) -> int:
        return padded_length(self.n_txt, self.world)

    @property
    def img_local(self) -> int:
        return padded_length(self.n_img, self.world)

    @property
    def local_len(self) -> int:
        return self.txt_local + self.img_local

    @property
    def padded(self) -> bool:
        return self.world * self.local_len != self.n_txt + self.n_img


def exchanged_order(n_txt: int, n_img: int, world: int) -> Tensor:
    """For each token of the unsharded [txt; img] sequence, its row in the sequence the first all-to-all gives
    every rank: rank 0's local [txt; img] rows (padding included), then rank 1's, and so on."""
    plan = Plan(world, 0, n_txt, n_img)
    txt = [r * plan.local_len + i for r, (start, end) in enumerate(plan.txt_bounds) for i in range(end - start)]
    img = [r * plan.local_len + plan.txt_local + i
           for r, (start, end) in enumerate(plan.img_bounds) for i in range(end - start)]
    return torch.tensor(txt + img, dtype=torch.long)


def qkv_to_heads(q: Tensor, k: Tensor, v: Tensor, world: int) -> Tensor:
    """One rank's (B, L, H, D) q, k and v -> the first all-to-all's send buffer (world, L, 3, B, H / world, D),
    whose chunk j (head group j, heads j * H / world onwards) goes to rank j."""
    b, n, h, d = q.shape
    buffer = q.new_empty(world, n, 3, b, h // world, d)
    for i, x in enumerate((q, k, v)):
        buffer[:, :, i] = x.view(b, n, world, h // world, d).permute(2, 1, 0, 3, 4)
    return buffer


def heads_to_joint(received: Tensor, order: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first all-to-all's result (world, L, 3, B, Hn, D), chunk i from rank i -> q, k, v each (B, L_total, Hn, D)
    over the unsharded sequence: its rows picked by `order` (`exchanged_order`), which drops the padding."""
    world, n, _, b, hn, d = received.shape
    rows = received.view(world * n, 3, b, hn, d).index_select(0, order)
    return tuple(rows[:, i].transpose(0, 1) for i in range(3))


def joint_to_tokens(out: Tensor, order: Tensor, world: int, local_len: int) -> Tensor:
    """Attention's output (B, L_total, Hn * D) over the unsharded sequence -> the second all-to-all's send buffer
    (world, local_len, B, Hn * D), whose chunk j (rank j's rows, padding rows zero) goes to rank j."""
    b, _, c = out.shape
    buffer = out.new_zeros(world * local_len, b, c)
    buffer.index_copy_(0, order, out.transpose(0, 1))
    return buffer.view(world, local_len, b, c)


def tokens_from_heads(received: Tensor) -> Tensor:
    """The second all-to-all's result (world, L, B, Hn * D), head group i from rank i -> this rank's attention
    output (B, L, H * D), heads in the model's order."""
    world, n, b, c = received.shape
    return received.permute(2, 1, 0, 3).reshape(b, n, world * c)


def bytes_per_attention(plan: Plan, batch: int, num_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes one rank sends to the others in one attention call: q, k and v out and the output back, each all but
    the chunk it keeps for itself."""
    local = plan.local_len * batch * num_heads * head_dim * element_size  # one (L, B, H, D) tensor
    return (3 + 1) * local * (plan.world - 1) // plan.world


# ----------------------------------------------------------------------------------------------------
# the collectives


def process_group(group: Group = None) -> dist.ProcessGroup:
    """The ProcessGroup of `group` (None: the default one, which torch.distributed must have initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sequence parallelism needs torch.distributed: launch with torchrun and call "
                           "torch.distributed.init_process_group (rectiflux.training.init_distributed does) first")
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"sequence parallelism takes a one-dimensional device mesh, got {group.ndim} dimensions")
        return group.get_group()
    raise TypeError(f"group must be a ProcessGroup, a DeviceMesh or None, got {type(group).__name__}")


# torch.distributed's in-place collectives, which dynamo also traces (into functional ones) in a compiled block.
# Called eagerly, the functional ones leave a process that ran them on gloo (torch 2.13) aborting at exit now and
# then ("terminate called without an active exception"; docs/scale-out.md).

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


def all_to_all(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Chunk j of x's first dimension to rank j; chunk i of the result came from rank i (equal chunks)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def gather_rows(x: Tensor, bounds: list[tuple[int, int]], group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    """Every rank's padded shard of rows (`shard_rows`) -> the unsharded rows, on every rank."""
    stacked = x.new_empty((len(bounds) * x.shape[0], *x.shape[1:]))  # gloo wants the ranks' shards end to end
    _ALL_GATHER(stacked, x.contiguous(), group=group)
    return unshard_rows(stacked.view(len(bounds), *x.shape), bounds, dim)


def shared_seed(group: Group = None) -> int:
    """A seed drawn from torch's global generator on the group's first rank and sent to every rank."""
    pg = process_group(group)
    box = [int(torch.randint(0, 2 ** 62, ()).item()) if dist.get_rank(pg) == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0), group=pg)
    return box[0]


class SequenceParallelAttention:
    """What a sequence-parallel model's `attention` slot holds: the exchange of sequence shards for head shards
    around the attention function the model had (`inner`). The model's wrapped forward sets `plan` for each call.

    `sent` counts the bytes this rank sent to the others (`bytes_per_attention` per call), for benchmarks.
    ring.RingAttention, the other backend, is a subclass."""

    backend = "ulysses"

    def __init__(self, group: dist.ProcessGroup, inner):
        self.group, self.inner = group, inner
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.plan: Plan | None = None
        self.sent = 0
        self._orders: dict[tuple[Plan, torch.device], Tensor] = {}

    @staticmethod
    def cached(cache: dict, plan: Plan, device: torch.device, make) -> Tensor:
        """What `make()` builds for this plan and device, kept: one or two sequence lengths per generation."""
        key = (plan, device)
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = make()
        return cache[key]

    def order(self, plan: Plan, device: torch.device) -> Tensor:
        return self.cached(self._orders, plan, device,
                           lambda: exchanged_order(plan.n_txt, plan.n_img, plan.world).to(device))

    def current_plan(self, q: Tensor, k: Tensor, v: Tensor) -> Plan:
        """The plan of the forward this call is inside; refused outside one, or when gradients are recorded."""
        if self.plan is None:
            raise RuntimeError("sequence-parallel attention runs only inside the model's sharded forward")
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise RuntimeError("sequence parallelism is for inference: its collectives carry no gradients")
        return self.plan

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        plan = self.current_plan(q, k, v)
        order = self.order(plan, q.device)
        send = qkv_to_heads(q, k, v, self.world)
        q, k, v = heads_to_joint(all_to_all(send, self.group), order)
        out = joint_to_tokens(self.inner(q, k, v, dtype), order, self.world, plan.local_len)
        kept = 1 / self.world  # each rank keeps its own chunk of both buffers
        self.sent += round((send.numel() * send.element_size() + out.numel() * out.element_size()) * (1 - kept))
        return tokens_from_heads(all_to_all(out, self.group))


class _ShardedCache:
    """A step cache seen through the shards: it decides on the gathered residuals, so every rank decides alike."""

    def __init__(self, cache, plan: Plan, group: dist.ProcessGroup):
        self.cache, self.plan, self.group = cache, plan, group

    def lookup(self, first_residual: Tensor) -> Tensor | None:
        reused = self.cache.lookup(gather_rows(first_residual, self.plan.img_bounds, self.group))
        return None if reused is None else shard_rows(reused, self.plan.img_bounds, self.plan.rank, dim=1)

    def store(self, rest_residual: Tensor) -> None:
        self.cache.store(gather_rows(rest_residual, self.plan.img_bounds, self.group))


class ShardedForward:
    """The forward of a sequence-parallel Flux model: the same arguments and result as `Flux.forward`; in between,
    the model runs on this rank's shard of the tokens (the attention slot exchanging them) and the velocity of the
    image tokens is gathered."""

    def __init__(self, model: nn.Module, attention: SequenceParallelAttention, previous):
        self.model, self.attention = model, attention
        self.previous = previous  # the instance's own forward before this one, if it had one
        self.inner = previous if previous is not None else type(model).forward.__get__(model)

    def __call__(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None = None, pe: Tensor | None = None, cache=None) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:  # the model's own message
            return self.inner(img, img_ids, txt, txt_ids, timesteps, y, guidance, pe, cache)
        attention = self.attention
        plan = Plan(attention.world, attention.rank, txt.shape[1], img.shape[1])
        if pe is None:
            pe = self.model.position_embedding(txt_ids, img_ids)
        rank, tb, ib = plan.rank, plan.txt_bounds, plan.img_bounds
        pe = torch.cat([shard_rows(pe.narrow(-3, 0, plan.n_txt), tb, rank, -3, 1),  # padding: no rotation
                        shard_rows(pe.narrow(-3, plan.n_txt, plan.n_img), ib, rank, -3, 1)], dim=-3)
        local = dict(img=shard_rows(img, ib, rank, 1), img_ids=shard_rows(img_ids, ib, rank, -2),
                     txt=shard_rows(txt, tb, rank, 1), txt_ids=shard_rows(txt_ids, tb, rank, -2))
        if cache is not None:
            cache = _ShardedCache(cache, plan, attention.group)
        attention.plan = plan
        try:
            out = self.inner(**local, timesteps=timesteps, y=y, guidance=guidance, pe=pe, cache=cache)
        finally:
            attention.plan = None
        return gather_rows(out, ib, attention.group)


# ----------------------------------------------------------------------------------------------------
# the switch


BACKENDS = ("ulysses", "ring")


def sequence_parallel(model: nn.Module, group: Group = None, backend: str = "ulysses") -> nn.Module:
    """Make a Flux model split each call's tokens over the ranks of `group` (None: the default process group);
    returns the model. Every rank must call the model with the same inputs, and gets the same output.

    `backend` is how attention sees the whole sequence: "ulysses" (all-to-alls to head shards; a head count the
    group's size does not divide is refused) or "ring" (k/v shards sent round the ranks, any head count:
    ring.py). Only the model's `attention` slot and its forward (an instance attribute wrapping the class's)
    change; `remove_sequence_parallel` restores both.
    """
    if backend not in BACKENDS:
        raise ValueError(f"sequence parallelism's backend is one of {', '.join(BACKENDS)}, not {backend!r}")
    pg = process_group(group)
    if backend == "ulysses":
        check_heads(model.config.num_heads, dist.get_world_size(pg))
        kind = SequenceParallelAttention
    else:
        from .ring import RingAttention as kind
    remove_sequence_parallel(model)
    attention = kind(pg, model.attention)
    model.attention = attention
    model.forward = ShardedForward(model, attention, model.__dict__.get("forward"))
    return model


def remove_sequence_parallel(model: nn.Module) -> nn.Module:
    """Undo `sequence_parallel` (nothing to do on a model it was not applied to); returns the model."""
    attention = model.attention
    if isinstance(attention, SequenceParallelAttention):
        model.attention = attention.inner
        forward = model.__dict__.get("forward")
        if isinstance(forward, ShardedForward) and forward.previous is not None:
            model.forward = forward.previous
        else:
            model.__dict__.pop("forward", None)
    return model


def sequence_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group a model splits its tokens over, or None when it runs whole."""
    attention = getattr(model, "attention", None)
    return attention.group if isinstance(attention, SequenceParallelAttention) else None
