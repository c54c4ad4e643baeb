"""Running one image's transformer steps over several processes (torch.distributed).

`sequence_parallel(model, group)` (what `FluxPipeline.enable_sequence_parallel` calls) splits the tokens of every
call over the group's ranks, Ulysses-style: see `sequence.py` for the plan.
"""

from .sequence import (
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

__all__ = ["Plan", "SequenceParallelAttention", "check_heads", "exchanged_order", "padded_length",
           "remove_sequence_parallel", "sequence_parallel", "sequence_parallel_group", "shard_bounds", "shared_seed"]
