"""The kernels a FLUX step is made of, timed alone on this machine: the figures docs/benchmarks.md and the code's
comments quote for kernel choices.

    python -m benchmarks.kernels

Prints GFLOP/s of float32, bfloat16 and int8 x int8 (`torch._int_mm`, and FBGEMM's dynamic linear) matrix
products at FLUX shapes, the weight-only int8 kernel (`aten._weight_int8pack_mm`) against dequantising the weight
for float32, float16 and bfloat16 activations, float8 weights dequantised,
a 3x3 convolution, attention (SDPA in float32 and bfloat16, and int8-dynamic's head-by-head bfloat16 products),
what the probes (`dtype="auto"`'s, the int8 and the attention one) choose and how long they take,
and what writing into a fresh large tensor costs against writing into an existing one (page faults).
"""

import subprocess
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

from benchmarks.bench import cpu_features
from rectiflux.flux import layers
from rectiflux.flux.layers import attention, attention_by_head
from rectiflux.quantize import linear as quantize
from rectiflux.runtime import kernels


def ms(fn, repeats: int = 7) -> float:
    """Median milliseconds of `repeats` calls after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def first_int_mm_calls() -> str:
    """The first call of `torch._int_mm` in a process also sets up its library: timed in a fresh interpreter (this one
    has run the probes)."""
    script = ("import time, torch\n"
              "a, w = torch.ones(128, 1024, dtype=torch.int8), torch.ones(512, 1024, dtype=torch.int8)\n"
              "for _ in range(2):\n"
              "    start = time.perf_counter(); torch._int_mm(a, w.t())\n"
              "    print(f'{(time.perf_counter() - start) * 1e3:.2f}', end=' ')\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout.strip()


def gemm_rates(m: int, k: int, n: int) -> list[tuple[str, float]]:
    a, w = torch.randn(m, k), torch.randn(n, k)
    ab, wb = a.bfloat16(), w.bfloat16()
    ai, wi = torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    flop = 2 * m * k * n / 1e6  # per ms: GFLOP/s
    return [("float32", flop / ms(lambda: F.linear(a, w))), ("bfloat16", flop / ms(lambda: F.linear(ab, wb))),
            ("int8 _int_mm", flop / ms(lambda: torch._int_mm(ai, wi.t())))] + fbgemm_rate(a, w, flop)


def fbgemm_rate(a: torch.Tensor, w: torch.Tensor, flop: float) -> list[tuple[str, float]]:
    """int8-dynamic's ``fbgemm`` kernel (FBGEMM's dynamic int8 linear with per-token scales,
    `QuantizedLinear.fbgemm_product`, its weight packed once), the int8 product of CPUs whose `_int_mm` is slow.
    Empty where torch was built without FBGEMM."""
    if not quantize._FBGEMM:
        return []
    linear = quantize.QuantizedLinear(w.shape[1], w.shape[0], bias=False, activations="int8")
    linear.weight, linear.weight_scale = quantize.quantize_weight(w)
    with torch.no_grad():
        return [("int8 fbgemm per-token", flop / ms(lambda: linear.fbgemm_product(a, scratch=True)))]


def int8_linear_rates(m: int, k: int, n: int, products: list[str]) -> list[tuple[str, float]]:
    """int8-dynamic's whole linear layer (per-token quantisation, product, rescale, bias) with each int8 product,
    against float32's, in GFLOP/s."""
    linear = torch.nn.Linear(k, n)
    x, flop = torch.randn(m, k), 2 * m * k * n / 1e6
    rates = []
    with torch.no_grad():
        for product in products:
            layer = quantize.QuantizedLinear.from_linear(linear, "int8", activations="int8")
            layer.product = product
            rates.append((product, flop / ms(lambda layer=layer: layer(x), 3)))
        return rates + [("float32", flop / ms(lambda: linear(x), 3))]


def weight_only_ms(x: torch.Tensor, wi: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    # dequantised as QuantizedLinear does: into reused tensors, in float32, then rounded to the input's dtype
    weight, low = torch.empty(wi.shape), torch.empty(wi.shape, dtype=x.dtype)

    def dequantised() -> torch.Tensor:
        w = quantize.dequantize_into(weight, wi, scale)
        return F.linear(x, w if x.dtype == torch.float32 else low.copy_(w))

    return ms(lambda: torch.ops.aten._weight_int8pack_mm(x, wi, scale.to(x.dtype)), 3), ms(dequantised, 3)


def gguf_rates(shape: tuple[int, int]) -> list[tuple[str, float]]:
    """Dequantisation rates of random GGUF blocks (finite float16 scales) for the common types."""
    from rectiflux.quantize.gguf import BLOCKS, F16_FIELDS, GGMLType, byte_shape, dequantize

    out = []
    for qtype in (GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K):
        block_size, type_size = BLOCKS[qtype]
        blocks = torch.randint(0, 256, (shape[0] * shape[1] // block_size, type_size), dtype=torch.uint8)
        for offset in F16_FIELDS[qtype]:
            blocks[:, offset:offset + 2] = torch.full((blocks.shape[0],), 1e-3).half().view(torch.uint8).reshape(-1, 2)
        raw = blocks.reshape(byte_shape(shape, qtype))
        out.append((qtype.name, shape[0] * shape[1] / ms(lambda r=raw, q=qtype: dequantize(r, q, shape)) / 1e6))
    from rectiflux.quantize import nf4  # bitsandbytes' NF4, as Forge's v2 files store it (float32 scales)

    n = shape[0] * shape[1]
    codes, scales = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8), torch.rand(n // 64) * 0.02
    table = torch.linspace(-1, 1, 16)
    out.append(("bitsandbytes NF4", n / ms(lambda: nf4.dequantize(codes, scales, table, 64, shape)) / 1e6))
    return out


def main() -> None:
    print("CPU: " + ", ".join(cpu_features()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # the probes first, in a process where no kernel has run yet: what a pipeline's load gets
    start = time.perf_counter()
    fast = quantize.int8_matmul_is_fast()
    print(f"int8 speed probe (rectiflux.quantize.int8_matmul_is_fast): {fast}, "
          f"{(time.perf_counter() - start) * 1e3:.0f} ms")
    start = time.perf_counter()
    fbgemm = quantize.fbgemm_linear_is_fast()
    print(f"FBGEMM int8 probe (rectiflux.quantize.linear.fbgemm_linear_is_fast; int8-dynamic's product where the first "
          f"is False): {fbgemm}, {(time.perf_counter() - start) * 1e3:.0f} ms")
    start = time.perf_counter()
    chosen = {name: str(dtype).removeprefix("torch.") for name, dtype in kernels.fastest_dtypes("cpu", 3072).items()}
    print(f'dtype="auto" probe at FLUX.1\'s width (rectiflux.runtime.kernels.fastest_dtypes): {chosen}, '
          f"{(time.perf_counter() - start) * 1e3:.0f} ms")
    start = time.perf_counter()
    by_head = kernels.attention_by_head_is_faster("cpu")
    print(f"attention probe (rectiflux.runtime.kernels.attention_by_head_is_faster): {by_head}, "
          f"{(time.perf_counter() - start) * 1e3:.0f} ms")
    print("first and second torch._int_mm call of a fresh process (128 x 1024 @ 1024 x 512), ms: "
          + first_int_mm_calls())
    print("matrix products (M x K @ K x N), GFLOP/s:")
    for m, k, n in [(2048, 2048, 2048), (1280, 1536, 4608), (1280, 1536, 10752), (1280, 7680, 1536)]:
        print(f"  {m}x{k} @ {k}x{n}: " + ", ".join(f"{name} {rate:.0f}" for name, rate in gemm_rates(m, k, n)))
    # _int_mm is left out where its probe found it slow (AVX2 only: minutes here); FBGEMM wherever torch has it
    products = [p for p, fast in (("int_mm", fast), ("fbgemm", quantize._FBGEMM)) if fast]
    print("int8-dynamic's whole linear (quantised per token, multiplied, rescaled) at FLUX.1-dev's shapes, 1536 tokens "
          "(a 512 x 512 image and 512 text tokens), GFLOP/s:")
    for k, n in [(3072, 9216), (3072, 12288), (15360, 3072)]:
        rates = int8_linear_rates(1536, k, n, products)
        print(f"  {k} -> {n}: " + ", ".join(f"{name} {rate:.0f}" for name, rate in rates))
    x, w = torch.randn(1, 64, 64, 64), torch.randn(64, 64, 3, 3)
    xb, wb = x.bfloat16(), w.bfloat16()
    print(f"3x3 convolution, 64 channels on 64 x 64 pixels, ms: float32 {ms(lambda: F.conv2d(x, w, padding=1)):.1f}, "
          f"bfloat16 {ms(lambda: F.conv2d(xb, wb, padding=1), 3):.1f}")
    print("weight-only int8, 9216 x 3072 weight, ms by rows of input: packed kernel / dequantise + matmul "
          "(quantize.INT8PACK_MAX_ROWS)")
    wi, scale = torch.randint(-127, 128, (9216, 3072), dtype=torch.int8), torch.rand(9216)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        print(f"  {str(dtype).removeprefix('torch.')} activations: " + ", ".join(
            "{}: {:.1f} / {:.1f}".format(rows, *weight_only_ms(torch.randn(rows, 3072).to(dtype), wi, scale))
            for rows in (1, 2, 8, 24, 64)))
    q, k, v = kernels.blocks_qkv(torch.randn(1, 1280, 3 * 24 * 128), 24)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = attention(q, k, v)

    def error(out: torch.Tensor) -> str:
        return f"{((out.float() - exact).norm() / exact.norm()).item():.2g}"

    print(f"attention, 24 heads x 1280 tokens, ms (relative error): SDPA float32 {ms(lambda: attention(q, k, v)):.1f}, "
          f"SDPA bfloat16 {ms(lambda: attention(qb, kb, vb)):.1f} ({error(attention(qb, kb, vb))}), head by head "
          f"in bfloat16 (int8-dynamic) {ms(lambda: attention_by_head(qb, kb, vb)):.1f} "
          f"({error(attention_by_head(qb, kb, vb))})")
    q, k, v = kernels.blocks_qkv(torch.randn(1, 4608, 3 * 2 * 128).bfloat16(), 2)  # a 1024 x 1024 image's tokens
    chunked = ms(lambda: attention_by_head(q, k, v), 3)
    with mock.patch.object(layers, "SCORES_PER_PRODUCT", 4608 * 4608):
        whole = ms(lambda: attention_by_head(q, k, v), 3)
    print(f"head by head in bfloat16, 2 heads x 4608 tokens, ms: {layers.SCORES_PER_PRODUCT // 4608} query rows per "
          f"product {chunked:.1f}, whole heads {whole:.1f}")
    print("GGUF (and NF4) dequantisation of one GGUFLinear chunk (1365 x 3072 weights), G weights/s: " + ", ".join(
        f"{name} {rate:.2f}" for name, rate in gguf_rates((1365, 3072))))
    acc, token_scale = torch.randint(-2**20, 2**20, (1280, 10752), dtype=torch.int32), torch.rand(1280, 1)
    y = torch.empty(1280, 10752)
    print(f"int32 products of a 1280 x 10752 linear to float32, scaled per token, ms: int32 x float32 "
          f"{ms(lambda: acc * token_scale):.1f}, converted into a reused tensor then scaled in place "
          f"{ms(lambda: y.copy_(acc).mul_(token_scale)):.1f}")
    weight = torch.empty(9216, 3072)  # wi and scale: the weight-only figures' 9216 x 3072 weight
    print(f"dequantise a 9216 x 3072 int8 weight into a float32 tensor, ms: int8 x float32 "
          f"{ms(lambda: torch.mul(wi, scale[:, None], out=weight)):.1f}, widened then scaled in place "
          f"{ms(lambda: weight.copy_(wi).mul_(scale[:, None])):.1f}")
    codes = torch.randn(9216, 3072).to(torch.float8_e4m3fn)
    print(f"the same weight in float8 e4m3fn, ms: torch's conversion {ms(lambda: weight.copy_(codes)):.1f}, "
          f"quantize.dequantize_into (through float16 bits, scaled) "
          f"{ms(lambda: quantize.dequantize_into(weight, codes, scale)):.1f}")
    rows = torch.randn(1280, 1536).bfloat16()
    print(f"max |x| of each row of a 1280 x 1536 bfloat16 tensor (per-token int8 scales), ms: aminmax "
          f"{ms(lambda: rows.aminmax(dim=1)):.2f}, amax and amin (quantize.row_absmax) "
          f"{ms(lambda: quantize.row_absmax(rows)):.2f}")
    x, scale, out = torch.randn(1280, 7680), torch.rand(1280, 1), torch.empty(1280, 7680)
    print(f"multiply a 1280 x 7680 float32 tensor, ms: into a new tensor {ms(lambda: x * scale):.1f}, "
          f"into an existing one {ms(lambda: torch.mul(x, scale, out=out)):.1f}")


if __name__ == "__main__":
    main()
