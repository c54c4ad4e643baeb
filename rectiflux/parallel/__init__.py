"""Running one image's transformer steps over several processes (torch.distributed).

`sequence_parallel(model, group)` (what `FluxPipeline.enable_sequence_parallel` calls) splits the tokens of every
call over the group's ranks, Ulysses-style (`backend="ulysses"`, see `sequence.py` for the plan) or with ring
attention (`backend="ring"`, `ring.py`).
"""

from .ring import RingAttention, key_mask, merge_partials
from .sequence import (
    BACKENDS,
    Plan,
    SequenceParallelAttention,
    check_heads,
    exchanged_order,
    padded_length,
    remove_sequence_parallel,
    sequence_parallel,
    sequence_parallel_group,
    shard_bounds,
    shared_seed,
)

__all__ = ["BACKENDS", "Plan", "RingAttention", "SequenceParallelAttention", "check_heads", "exchanged_order",
           "key_mask", "merge_partials", "padded_length", "remove_sequence_parallel", "sequence_parallel",
           "sequence_parallel_group", "shard_bounds", "shared_seed"]
