"""`dtype="auto"`: the fastest arithmetic this machine offers for each model, measured once per process.

CPUs differ wildly: an AVX2-only EPYC multiplies bfloat16 about 6x slower than float32, one with AVX-512-BF16 or
AMX about 4-6x faster (`python -m benchmarks.kernels`). Reading instruction-set flags would guess what torch's
kernels use, so the candidates are timed on shapes like the models' own. Only candidates whose images stay within
35 dB PSNR of float32 compete (docs/benchmarks.md measures them): float32 and bfloat16. float16 is left out on the
CPU, where it is rarely fast and FLUX's activations overflow it; int8 activations (`quantize="int8-dynamic"`) are
lossier than 35 dB allows and stay an explicit choice.
"""

from __future__ import annotations

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


def _seconds(fn: Callable[[], object], repeats: int = 4) -> float:
    fn()  # the first calls of a kernel in a process set it up (oneDNN builds its primitives)
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _linear_time(dtype: torch.dtype, width: int) -> float:
    # 256 tokens through a width -> width linear: where bfloat16 wins on FLUX's widths it may lose on a tiny
    # model's, whose products are too small for the faster kernel to pay for its casts
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, width, generator=g).to(dtype), torch.randn(width, width, generator=g).to(dtype)
    with torch.no_grad():
        return _seconds(lambda: F.linear(x, w))


def _conv_time(dtype: torch.dtype) -> float:
    # a VAE-decoder-like 3x3 convolution: 64 channels on 64 x 64 pixels
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 64, 64, 64, generator=g).to(dtype), torch.randn(64, 64, 3, 3, generator=g).to(dtype)
    with torch.no_grad():
        return _seconds(lambda: F.conv2d(x, w, padding=1))


def fastest_dtypes(device: torch.device | str = "cpu", width: int = 3072) -> dict[str, torch.dtype]:
    """The dtype `dtype="auto"` gives each of COMPONENTS on `device`, for a transformer of hidden size `width`.

    On a CUDA device with bfloat16 support that is bfloat16 (what every FLUX engine runs there); elsewhere on a
    GPU float32, and float32 for models narrower than SMALL_WIDTH. On the CPU each is timed once per process and
    width (well under a second): bfloat16 for the
    transformer and text encoders when a bfloat16 linear of that width beats float32 by MARGIN, for the VAE when a
    bfloat16 convolution does. Thread-safe.
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
                fp32, bf16 = _linear_time(torch.float32, width), _linear_time(torch.bfloat16, width)
                linear = torch.bfloat16 if fp32 > MARGIN * bf16 else torch.float32
                conv = torch.bfloat16 if _conv_time(torch.float32) > MARGIN * _conv_time(torch.bfloat16) \
                    else torch.float32
                _chosen[key] = {"transformer": linear, "vae": conv, "text_encoders": linear}
        return dict(_chosen[key])
