"""`dtype="auto"`: the fastest arithmetic this machine offers for each model, measured once per process.

CPUs differ wildly: an AVX2-only EPYC multiplies bfloat16 about 6x slower than float32, an EPYC with AVX-512-BF16
about 3x faster and a Xeon with AMX about 6x (`python -m benchmarks.kernels`). Reading instruction-set flags would
guess what torch's kernels use, so the candidates are timed on shapes like the models' own.
Only candidates whose images stay within
35 dB PSNR of float32 compete (docs/benchmarks.md measures them): float32 and bfloat16. float16 is left out on the
CPU, where it is rarely fast and FLUX's activations overflow it. int8 activations (`quantize="int8-dynamic"`) stay an
explicit choice: their error depends on a checkpoint's activation outliers, which a timing cannot see (on the random
and the shapes models it stays above 35 dB: docs/benchmarks.md, `python -m benchmarks.quant_quality`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

COMPONENTS = ("transformer", "vae", "text_encoders")
# bfloat16 must win by this much: a near tie is not worth its rounding
MARGIN = 1.2
# Below this hidden size (the embedded shapes model, test models) the products take microseconds, a timing would be
# noise, and the calls are bound by overheads that bfloat16 does not shrink: such models stay exact
SMALL_WIDTH = 1024

_lock = threading.Lock()
_chosen: dict[tuple[str, int], dict[str, torch.dtype]] = {}
_by_head: bool | None = None  # attention_by_head_is_faster's answer, once measured


def best_seconds(fn: Callable[[], object], repeats: int = 3, give_up: float = float("inf"),
                 setup: Callable[[], object] | None = None) -> float:
    """The best of `repeats` timed calls after two warm-up calls (the probes' one timer), or, once a call shows the
    candidate cannot win, that call's time at once: a call after the first that takes longer than `give_up`, or a
    first call that takes longer than twice `give_up` (the first call at a shape also builds oneDNN's primitive for
    it). On an AVX2-only CPU a bfloat16 product of FLUX's width takes about six float32 calls, and its convolution
    about two hundred (`python -m benchmarks.kernels`): each is called once.

    `setup`, a tiny call of the same kernel, runs first and is not timed: the first call of a kernel in a process
    sets up its library, which can take longer than the product being timed (`torch._int_mm`'s does: figures in
    docs/architecture.md), and judged by that call a fast kernel would be given up as slow.
    """
    if setup is not None:
        setup()
    best = float("inf")
    for call in range(2 + repeats):
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        if seconds > (2 * give_up if call == 0 else give_up):
            return seconds
        if call > 1:
            best = min(best, seconds)
    return best


def _operand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    # a dense product takes as long whatever the values: evenly spaced ones are made about four times faster than
    # random ones, which at FLUX's width take longer to draw than a product takes
    return torch.linspace(-1.0, 1.0, math.prod(shape)).reshape(shape).to(dtype)


def _linear_time(dtype: torch.dtype, width: int, give_up: float = float("inf")) -> float:
    # 256 tokens through a width -> width linear: where bfloat16 wins on FLUX's widths it may lose on a tiny
    # model's, whose products are too small for the faster kernel to pay for its casts
    x, w = _operand(256, width, dtype=dtype), _operand(width, width, dtype=dtype)
    tiny = _operand(16, 64, dtype=dtype)
    with torch.no_grad():
        return best_seconds(lambda: F.linear(x, w), give_up=give_up, setup=lambda: F.linear(tiny, tiny))


def _conv_time(dtype: torch.dtype, give_up: float = float("inf")) -> float:
    # a VAE-decoder-like 3x3 convolution: 64 channels on 64 x 64 pixels
    x, w = _operand(1, 64, 64, 64, dtype=dtype), _operand(64, 64, 3, 3, dtype=dtype)
    tiny_x, tiny_w = _operand(1, 8, 8, 8, dtype=dtype), _operand(8, 8, 3, 3, dtype=dtype)
    with torch.no_grad():
        return best_seconds(lambda: F.conv2d(x, w, padding=1), give_up=give_up,
                            setup=lambda: F.conv2d(tiny_x, tiny_w, padding=1))


def fastest_dtypes(device: torch.device | str = "cpu", width: int = 3072) -> dict[str, torch.dtype]:
    """The dtype `dtype="auto"` gives each of COMPONENTS on `device`, for a transformer of hidden size `width`.

    On a CUDA device with bfloat16 support that is bfloat16 (what every FLUX engine runs there); elsewhere on a
    GPU float32, and float32 for models narrower than SMALL_WIDTH. On the CPU each is timed once per process and
    width (well under a second: a bfloat16 kernel stops being timed once a call is twice as slow as float32's):
    bfloat16 for the transformer and text encoders when a bfloat16 linear of that width beats float32 by MARGIN, for
    the VAE when a bfloat16 convolution does (timed only where bfloat16's linear beat float32's). Thread-safe.
    """
    device = torch.device(device)
    key = (device.type, width)
    with _lock:
        if key not in _chosen:
            if device.type == "cuda":
                fast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
                _chosen[key] = dict.fromkeys(COMPONENTS, fast)
            elif device.type != "cpu" or width < SMALL_WIDTH:
                _chosen[key] = dict.fromkeys(COMPONENTS, torch.float32)
            else:
                # a call twice as slow as float32's best gives up on bfloat16 at once
                fp32 = _linear_time(torch.float32, width)
                bf16 = _linear_time(torch.bfloat16, width, give_up=2 * fp32)
                linear = torch.bfloat16 if fp32 > MARGIN * bf16 else torch.float32
                conv = torch.float32
                # where bfloat16's linear loses (no bfloat16 instructions: AVX2 only) its convolution has no fast kernel
                # either, and timing one would take seconds
                if bf16 < fp32:
                    conv_fp32 = _conv_time(torch.float32)
                    if conv_fp32 > MARGIN * _conv_time(torch.bfloat16, give_up=2 * conv_fp32):
                        conv = torch.bfloat16
                _chosen[key] = {"transformer": linear, "vae": conv, "text_encoders": linear}
        return dict(_chosen[key])


def blocks_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v laid out as the blocks hand them to attention, from a (B, L, 3 * hidden) qkv product: q and k fresh
    (contiguous) from RoPE, v a view into qkv. Attention kernels' times depend on those strides."""
    from ..flux.layers import split_qkv

    q, k, v = split_qkv(qkv, heads)
    return q.contiguous(), k.contiguous(), v


def attention_by_head_is_faster(device: torch.device | str = "cpu") -> bool:
    """Whether `rectiflux.flux.layers.attention_by_head` beats SDPA in bfloat16 on `device` (the int8-dynamic mode's
    attention), timed once per process on four heads of FLUX's head size over 1024 tokens, laid out as the blocks
    hand them over: q and k fresh from RoPE, v a view into the qkv product (SDPA's time depends on those strides).
    Only CPUs with bfloat16 kernels are timed: on a GPU SDPA's fused kernels win, and without bfloat16 instructions
    neither is fast. Thread-safe.
    """
    global _by_head
    if torch.device(device).type != "cpu" or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    from ..flux.layers import attention, attention_by_head

    with _lock:
        if _by_head is None:
            qkv = blocks_qkv(_operand(1, 1024, 3 * 4 * 128, dtype=torch.bfloat16), 4)
            tiny = blocks_qkv(_operand(1, 16, 3 * 128, dtype=torch.bfloat16), 1)
            with torch.no_grad():
                fused = best_seconds(lambda: attention(*qkv), setup=lambda: attention(*tiny))
                by_head = best_seconds(lambda: attention_by_head(*qkv), give_up=2 * fused,
                                       setup=lambda: attention_by_head(*tiny))
            _by_head = fused > MARGIN * by_head
        return _by_head
