"""Regional `torch.compile`: each transformer block compiled, the model's loop left eager.

FLUX repeats two block classes 19 and 38 times. Compiling the block's forward (not the whole model) makes one graph
per class that every block of it reuses, since torch.compile treats a module's parameters as graph inputs: the
first call compiles in seconds rather than minutes, and lazily read or streamed blocks (whose weights come and go)
and LoRA hooks keep working. Sequence lengths are compiled as symbols (`dynamic=True`), so neither a new step
nor a new image size recompiles.
"""

from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, mode: str | None = None, dynamic: bool = True) -> nn.Module:
    """Compile every double and single block of a Flux model in place (`nn.Module.compile`); returns the model.

    `mode` is torch.compile's: on a GPU "reduce-overhead" also captures CUDA graphs (one per image size), which
    removes the launch gaps between a block's small kernels, and "max-autotune" tunes the matrix products too
    (minutes of compilation).
    """
    for blocks in (model.double_blocks, model.single_blocks):
        for block in blocks:
            block.compile(mode=mode, dynamic=dynamic, fullgraph=False)
    return model
