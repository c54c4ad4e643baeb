"""Ring attention: the second backend of sequence parallelism (`sequence_parallel(model, group, backend="ring")`).

The plan is Ulysses' (sequence.py): rank r holds its padded shard of the text tokens then of the image tokens,
and every block except attention runs on that shard alone. In attention, instead of exchanging sequence shards for
head shards, each rank keeps its queries (all heads) and the keys and values travel: in step s rank r attends
with its queries to the k/v shard that started on rank (r - s) mod N, while it sends the shard it holds to rank
r + 1 and receives the next one from rank r - 1 (point-to-point, `dist.batch_isend_irecv`, which gloo supports on
the CPU and NCCL on CUDA). After N steps every query has seen every key once.

Each step gives a partial result over one block of keys: the softmax-normalised output over that block and the
log-sum-exp of its scores. Two partial results merge exactly (`merge_partials`, the online-softmax rule), in
float32, so the result equals attention over the whole sequence up to float32 rounding. Padded key rows (the
zero rows that make the shards equal, whose keys are not zero once the block's projections have run) are masked
out with `key_mask`: every rank knows every shard's real lengths from the plan. Padded query rows get zeros, as
with Ulysses, and are dropped when the output is gathered.

No head count is refused: each rank keeps all heads. Each step's traffic is this rank's k and v shards, so over a
call a rank sends 2 (N - 1) times the bytes of one local (B, L_local, H, D) tensor (`bytes_per_ring_attention`),
against Ulysses' 4 (N - 1) / N: the same at N = 2, more beyond, but only to one neighbour, and (on hardware that
overlaps them) while the previous block is computed.

Each block is computed with plain matmuls and a logsumexp in float32 (correctness first; it holds the
(B, H, L_local, L_local) scores of one block). On CUDA a fused kernel that returns the log-sum-exp (flash
attention's forward, as xDiT's ring attention uses) could replace `block_attention` later.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from .sequence import Plan, SequenceParallelAttention

# ----------------------------------------------------------------------------------------------------
# pure functions


def key_mask(plan: Plan, source: int, device: torch.device | None = None) -> Tensor:
    """The real rows (True) of rank `source`'s local [txt; img] sequence of `plan.local_len` rows: its text shard's
    rows from 0, its image shard's from `plan.txt_local`; the padding after each is False."""
    (t0, t1), (i0, i1) = plan.txt_bounds[source], plan.img_bounds[source]
    mask = torch.zeros(plan.local_len, dtype=torch.bool, device=device)
    mask[: t1 - t0] = True
    mask[plan.txt_local: plan.txt_local + i1 - i0] = True
    return mask


def block_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of head-major q (B, H, Lq, D) over one block of keys k, v (B, H, Lk, D), in float32: the output
    normalised over this block (B, H, Lq, D) and the log-sum-exp of the scaled scores (B, H, Lq). `mask` (Lk,)
    True for keys that take part; over a block with none the output is 0 and the log-sum-exp -inf."""
    q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - _finite(lse).unsqueeze(-1))  # rows of -inf scores: exp(-inf) = 0
    return torch.matmul(weights, v), lse


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial results over disjoint blocks of keys (`block_attention`'s) -> the result over both blocks:
    each output weighted by its share of the softmax's denominator, exp(lse_x - lse). An empty block (lse -inf)
    weighs 0; two empty blocks give 0 and -inf."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = _finite(lse)
    out = torch.exp(lse_a - safe).unsqueeze(-1) * out_a + torch.exp(lse_b - safe).unsqueeze(-1) * out_b
    return out, lse


def _finite(lse: Tensor) -> Tensor:
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def bytes_per_ring_attention(plan: Plan, batch: int, num_heads: int, head_dim: int, element_size: int) -> int:
    """Bytes one rank sends in one ring attention call: its k/v pair, world - 1 times."""
    local = plan.local_len * batch * num_heads * head_dim * element_size  # one (B, L, H, D) tensor
    return 2 * local * (plan.world - 1)


# ----------------------------------------------------------------------------------------------------
# the ring


class RingAttention(SequenceParallelAttention):
    """What a ring-parallel model's `attention` slot holds (`inner` is kept only to be restored): each rank's
    queries against every rank's keys and values, sent round the ring of ranks. `sent` counts bytes as
    `SequenceParallelAttention`'s does, `waited` the seconds spent waiting for transfers (for benchmarks)."""

    backend = "ring"

    def __init__(self, group: dist.ProcessGroup, inner):
        super().__init__(group, inner)
        self._masks: dict[tuple[Plan, torch.device], Tensor] = {}
        self.waited = 0.0
        # neighbours as global ranks: P2POp takes those
        self.next_rank = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.previous_rank = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def masks(self, plan: Plan, device: torch.device) -> Tensor:
        """(world, local_len): `key_mask` of every rank's shard."""
        return self.cached(self._masks, plan, device,
                           lambda: torch.stack([key_mask(plan, r, device) for r in range(plan.world)]))

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        # `dtype` (a lower precision for the inner kernel) is not used: the blocks are computed in float32
        plan = self.current_plan(q, k, v)
        b, n, h, d = q.shape
        masks = self.masks(plan, q.device)
        qh = q.transpose(1, 2)  # (B, H, L, D)
        held = torch.stack([k, v]).transpose(2, 3).contiguous()  # (2, B, H, L, D), in the model's dtype
        spare = torch.empty_like(held) if self.world > 1 else None
        out = lse = None
        for step in range(self.world):
            requests = []
            if step < self.world - 1:  # the next shard travels while this one is computed
                requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, held, self.next_rank, self.group),
                                                   dist.P2POp(dist.irecv, spare, self.previous_rank, self.group)])
                self.sent += held.numel() * held.element_size()
            source = (self.rank - step) % self.world
            (t0, t1), (i0, i1) = plan.txt_bounds[source], plan.img_bounds[source]
            if t1 - t0 + i1 - i0:  # a shard with no real rows (fewer tokens than ranks) adds nothing
                part = block_attention(qh, held[0], held[1], masks[source])
                out, lse = part if out is None else merge_partials(out, lse, *part)
            if requests:
                start = time.perf_counter()
                for request in requests:
                    request.wait()
                self.waited += time.perf_counter() - start
                held, spare = spare, held
        if out is None:  # no tokens at all
            out = qh.new_zeros(b, h, n, d, dtype=torch.float32)
        out = out * masks[self.rank].view(1, 1, n, 1)  # padded queries: zeros
        return out.transpose(1, 2).reshape(b, n, h * d).to(q.dtype)
