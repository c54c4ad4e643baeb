"""Weight quantisation of the FLUX transformer: int8 or float8 weights with one float32 scale per output channel.

`QuantizedLinear` replaces an `nn.Linear` for inference. Its weight is stored symmetric per output channel:
int8 with scale = max|w_row| / 127, or float8 e4m3 with scale = max|w_row| / 448 (e4m3's largest finite value),
so each row uses the whole code range and one outlier row cannot crush the resolution of the others.

Forward kernels, chosen per call (`QuantizedLinear.kernel_for` says which one a given input gets):

* ``int8pack``: int8 weights on CPU run `aten._weight_int8pack_mm`, which multiplies by the int8 matrix and
  applies the per-channel scale inside the kernel, so no float copy of the weight is ever made;
* ``int_mm``: with ``activations="int8"`` each token (row of the input) is quantised symmetric to int8 on the
  fly and `torch._int_mm` computes an exact int32 product, rescaled by the token and channel scales. Only where
  that product is fast: CPUs without int8 dot-product instructions (AVX2 only, no VNNI/AMX) run `_int_mm` far
  slower than a float32 matmul (`int8_matmul_is_fast` times it), and there these calls go to ``fbgemm``;
* ``fbgemm``: int8 activations on a CPU whose `_int_mm` is slow: FBGEMM's dynamic int8 linear, which has AVX2
  kernels (u8 x s8). It quantises its input with one scale per call, so each token is first divided by its own
  max |x| and the output multiplied back: per-token scales again, at 7 bits (FBGEMM reduces the activations' range
  so that its AVX2 pairwise sums cannot saturate). Its packed copy of the weight is made at the first call and kept
  beside the int8 one. Where it is no faster than float32 either (`fbgemm_linear_is_fast`), or torch has no FBGEMM,
  these calls go to ``dequant`` and the activations stay float;
* ``scaled_mm``: with ``activations="float8"`` (float8 e4m3 weights) each token is scaled into e4m3 on the fly
  and `torch._scaled_mm` multiplies the two float8 matrices with the row-wise token and channel scales applied
  inside the kernel: the fp8 tensor cores of an H100/H200 (and a CPU kernel, slower than float32, for tests);
* ``dequant``: everything else (float8 weights, int8 elsewhere than on CPU, shapes `_int_mm` refuses)
  dequantises the weight to float for this call and runs an ordinary matmul.

Every kernel returns the input's dtype. The module is for inference: nothing here defines gradients.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flux.layers import attention_by_head
from ..flux.transformer import Flux
from ..runtime.kernels import attention_by_head_is_faster, best_seconds

WEIGHT_DTYPES = {"int8": torch.int8, "float8": torch.float8_e4m3fn}
# The largest code of each format: 127 rather than 128 keeps int8 symmetric (-127..127), and 448 is e4m3fn's
# largest finite value (it has no infinity, so anything larger would become NaN).
QMAX = {"int8": 127.0, "float8": 448.0}
ACTIVATIONS = (None, "int8", "float8")
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Left in float by default. Together they hold about 0.5% of FLUX.1's weights, so quantising them saves
# almost nothing, and they are the layers with no residual stream to average their error away: img_in/txt_in
# read raw latents and T5 features (whose few huge channels set a per-row scale that flattens the rest),
# time/vector/guidance_in produce the conditioning vector that modulates every block, and final_layer writes
# the velocity itself.
DEFAULT_SKIP = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")

try:  # a CPU (and MPS) kernel added in torch 2.3; looked up once so the tests can switch it off
    _INT8PACK_MM = torch.ops.aten._weight_int8pack_mm
except (AttributeError, RuntimeError):
    _INT8PACK_MM = None
# The most rows `_weight_int8pack_mm` serves, by activation dtype. Its time grows with every row, while dequantising
# costs the same for any count; with float32 or float16 activations it is a row-by-row loop that only wins for one
# row, in bfloat16 it stays ahead for a few dozen (python -m benchmarks.kernels; docs/architecture.md).
INT8PACK_MAX_ROWS = {torch.float32: 1, torch.float16: 1, torch.bfloat16: 24}
_INT_MM = getattr(torch, "_int_mm", None)
_SCALED_MM = getattr(torch, "_scaled_mm", None)
# FBGEMM's quantized linear ops (torch's x86 CPU builds have them; torch 2.13 marks its quantized tensors deprecated)
_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")
# None: measured on first use (int8_matmul_is_fast, fbgemm_linear_is_fast); True / False: decided (tests set them)
INT8_MATMUL_FAST: bool | None = None
FBGEMM_LINEAR_FAST: bool | None = None
# How int8 activations multiply: int8 x int8 on `_int_mm`, FBGEMM's dynamic linear, or the weight dequantised
INT8_PRODUCTS = ("int_mm", "fbgemm", "dequant")


def int8_matmul_is_fast() -> bool:
    """Whether `torch._int_mm` on this CPU beats a float32 matmul of the same shape (measured once per process).

    The int8 x int8 product is only fast with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX). On an
    AVX2-only CPU torch 2.13 runs a generic kernel many times slower than float32 (`python -m benchmarks.kernels`
    measures both; docs/benchmarks.md). Timing the two kernels answers for the CPU at hand, where reading
    instruction-set flags would have to guess what torch's kernel uses. The probe is a 128 x 1024 @ 1024 x 512
    product timed against its float32 twin, with the `dtype="auto"` probe's timer (`python -m benchmarks.kernels`
    prints its answer and time).
    """
    global INT8_MATMUL_FAST
    if INT8_MATMUL_FAST is None:
        if _INT_MM is None:
            INT8_MATMUL_FAST = False
        else:
            g = torch.Generator().manual_seed(0)
            a, w = torch.randn(128, 1024, generator=g), torch.randn(512, 1024, generator=g)
            ai, wi = a.to(torch.int8), w.to(torch.int8)
            tiny = torch.ones(32, 32, dtype=torch.int8)
            with torch.no_grad():
                float32 = best_seconds(lambda: F.linear(a, w), setup=lambda: F.linear(a[:32, :32], w[:32, :32]))
                INT8_MATMUL_FAST = best_seconds(lambda: _INT_MM(ai, wi.t()), give_up=2 * float32,
                                                setup=lambda: _INT_MM(tiny, tiny)) < float32
    return INT8_MATMUL_FAST


def fbgemm_linear_is_fast() -> bool:
    """Whether the ``fbgemm`` kernel (per-token scaling included) beats a float32 matmul on this CPU, timed once per
    process on a 1024 x 1536 @ 1536 x 1536 product with the probes' timer (`python -m benchmarks.kernels` prints its
    answer, and both kernels' rates at FLUX's shapes). Its per-token passes weigh more on smaller products, where its
    lead over float32 becomes noise."""
    global FBGEMM_LINEAR_FAST
    if FBGEMM_LINEAR_FAST is None:
        if not _FBGEMM:
            FBGEMM_LINEAR_FAST = False
        else:
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(1024, 1536, generator=g), torch.randn(1536, 1536, generator=g)
            linear = QuantizedLinear(1536, 1536, bias=False, activations="int8")
            linear.weight, linear.weight_scale = quantize_weight(w)
            tiny = torch.ones(32, 32)
            with torch.no_grad():
                float32 = best_seconds(lambda: F.linear(x, w), setup=lambda: F.linear(tiny, tiny))
                FBGEMM_LINEAR_FAST = best_seconds(lambda: linear.fbgemm_product(x), give_up=2 * float32,
                                                  setup=lambda: linear.fbgemm_product(x[:32])) < float32
    return FBGEMM_LINEAR_FAST


def cpu_int8_product() -> str:
    """The fastest of INT8_PRODUCTS on this CPU (each candidate timed once per process, only where needed)."""
    if int8_matmul_is_fast():
        return "int_mm"
    return "fbgemm" if fbgemm_linear_is_fast() else "dequant"


def int8_product_on(device: torch.device, product: str | None = None) -> str:
    """The one of INT8_PRODUCTS that int8 activations on `device` multiply with, given the one asked for (a replayed
    recipe's; None: this CPU's fastest). CUDA always uses `_int_mm`; a kernel this torch lacks gives way to dequant."""
    if device.type == "cuda":
        product = "int_mm"
    product = product or cpu_int8_product()
    if (product == "int_mm" and _INT_MM is None) or (product == "fbgemm" and (not _FBGEMM or device.type != "cpu")):
        return "dequant"
    return product


def check_format(weights: str, activations: str | None) -> None:
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight format {weights!r}; use 'int8' or 'float8'")
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activation format {activations!r}; use None, 'int8' or 'float8'")
    if activations == "int8" and weights != "int8":
        raise ValueError("int8 activations need int8 weights (torch._int_mm multiplies int8 by int8)")
    if activations == "float8" and weights != "float8":
        raise ValueError("float8 activations need float8 weights (torch._scaled_mm multiplies float8 by float8)")


def quantize_weight(weight: Tensor, weights: str = "int8") -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> (quantised weight, float32 scale per output row), symmetric."""
    check_format(weights, None)
    w = weight.detach().float()  # bf16/fp16 widen exactly, so the result does not depend on the stored dtype
    amax = row_absmax(w).squeeze(1)
    # an all-zero row would give scale 0 and 0/0 = NaN codes: any positive scale encodes it as zeros
    scale = torch.where(amax > 0, amax / QMAX[weights], torch.ones_like(amax))
    # dividing (rather than multiplying by 1/scale) puts each row's largest weight exactly on the top code
    codes = (w / scale[:, None]).clamp_(-QMAX[weights], QMAX[weights])  # in place: one float temporary, not three
    if weights == "int8":
        codes.round_()
    return codes.to(WEIGHT_DTYPES[weights]), scale


# weights dequantised at a time when a compact linear is quantised again (QuantizedLinear.from_linear)
REQUANTIZED_ELEMENTS = 1 << 20


def dequantize_weight(weight: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight a quantised one stands for (computed in float32, then cast)."""
    return (weight.float() * scale.float()[:, None]).to(dtype)


class _Scratch(threading.local):
    """Per-thread scratch tensors reused from one call to the next.

    A fresh tensor above glibc's mmap threshold (32 MiB at most) is a new mapping whose pages fault on first
    touch; in a VM that costs several times the arithmetic of a pass over it (`python -m benchmarks.kernels`
    times a multiplication into a new tensor and into an existing one). The int8
    path makes three temporaries per linear, so they live here. A scratch tensor never leaves the function that
    asked for it.
    """

    def __init__(self) -> None:
        self.tensors: dict[tuple, Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (slot, dtype, device)
        numel = 1
        for n in shape:
            numel *= n
        t = self.tensors.get(key)
        if t is None or t.numel() < numel:
            t = self.tensors[key] = torch.empty(numel, dtype=dtype, device=device)
        return t[:numel].view(shape)


_SCRATCH = _Scratch()


def row_absmax(x: Tensor) -> Tensor:
    """max |x| of each row of an (M, K) tensor, as float32 (M, 1).

    Two reductions without a temporary: x.abs() would write a whole tensor first, and `aminmax` along a row runs
    several times slower than `amax` and `amin` together on the CPU (torch 2.13; `python -m benchmarks.kernels`).
    """
    return torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_()).float()


def quantize_tokens(x: Tensor, scratch: bool = False) -> tuple[Tensor, Tensor]:
    """(M, K) -> int8 codes and a float32 (M, 1) scale per row: dynamic, symmetric, per token.

    With `scratch` the codes are written to a per-thread scratch tensor that the next call overwrites.
    """
    amax = row_absmax(x)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    if not scratch:
        return (x.float() / scale).round_().to(torch.int8), scale
    # |x / scale| <= 127 by construction, so no clamp is needed before the cast. A bfloat16 x divided by float32
    # scales would run torch's mixed-dtype loop: it is widened (exactly) into the scratch tensor first.
    xf = _SCRATCH.get("xf", x.shape, torch.float32, x.device)
    codes = (torch.div(x, scale, out=xf) if x.dtype == torch.float32 else xf.copy_(x).div_(scale)).round_()
    return _SCRATCH.get("codes", x.shape, torch.int8, x.device).copy_(codes), scale


def dequantize_into(out: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """`out` (float32, the weight's shape) set to weight * scale per row: the values of `dequantize_weight`.

    torch converts int8 times float32 in its slow mixed-dtype loop and float8 to float32 one value at a time
    (`python -m benchmarks.kernels` times both against this), so the codes are widened into `out` first and scaled in
    place, and float8 codes are widened through float16, whose bits they fit: e5m2 is float16's top byte, and e4m3fn's
    exponent and mantissa shifted into float16's read 2^8 times too small, for subnormals too (the factor goes into
    the scale; multiplying by a power of two is exact). e4m3fn's two NaN codes read as +-480; quantised weights never
    hold them.
    """
    if weight.dtype in FLOAT8_DTYPES:
        bits = _SCRATCH.get("float16_bits", tuple(weight.shape), torch.int16, weight.device)
        bits.copy_(weight.view(torch.int8))  # sign-extended: the sign lands in bits 8..15
        if weight.dtype == torch.float8_e5m2:
            bits.bitwise_left_shift_(8)
        else:  # sign to bit 15 (bit 14, the sign's second copy, cleared), exponent and mantissa to bits 7..13
            bits.bitwise_left_shift_(7).bitwise_and_(~(1 << 14))
            scale = scale * 256.0
        weight = bits.view(torch.float16)
    return out.copy_(weight).mul_(scale.float()[:, None])


class QuantizedLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight is int8 or float8 e4m3 with a float32 scale per output channel.

    `weight` and `weight_scale` are buffers (they are not trainable); `bias` stays a float parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weights: str = "int8",
                 activations: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        check_format(weights, activations)
        self.in_features, self.out_features = in_features, out_features
        self.weights, self.activations = weights, activations
        # with int8 activations on the CPU: which of INT8_PRODUCTS multiplies (None: `cpu_int8_product` says; a
        # replayed recipe fixes it, through block_quantizer)
        self.product: str | None = None
        self._packed: tuple | None = None  # the ``fbgemm`` kernel's packed weight, with what it was packed from
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=WEIGHT_DTYPES[weights],
                                                   device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, weights: str = "int8", activations: str | None = None) -> QuantizedLinear:
        """Quantise `linear`'s weight: an nn.Linear's, or the dequantised weight of a compact one (a GGUFLinear, a
        QuantizedLinear of another format); the bias parameter itself is shared, not copied."""
        module = cls(linear.in_features, linear.out_features, bias=False, weights=weights, activations=activations,
                     device="meta")
        if isinstance(linear, nn.Linear):
            module.weight, module.weight_scale = quantize_weight(linear.weight, weights)
        else:  # rows are quantised independently: a few at a time, while they are in the caches
            module.weight = torch.empty(linear.out_features, linear.in_features, dtype=WEIGHT_DTYPES[weights],
                                        device=linear.weight.device)
            module.weight_scale = torch.empty(linear.out_features, dtype=torch.float32, device=linear.weight.device)
            rows = max(1, REQUANTIZED_ELEMENTS // linear.in_features)
            for start in range(0, linear.out_features, rows):
                part = slice(start, start + rows)
                module.weight[part], module.weight_scale[part] = quantize_weight(
                    linear.dequantized_weight(rows=part), weights)
        module.bias = linear.bias
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> Tensor:
        return dequantize_weight(self.weight[rows], self.weight_scale[rows], dtype)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) casts every floating-point tensor, float8 codes and float32 scales among them: a model
        # cast to bfloat16 must still move these to its device, but keep their dtypes
        weight, scale = self.weight, self.weight_scale
        self._packed = None  # FBGEMM's packed weight stays on the CPU it was made on; packed again at its next use
        super()._apply(fn, recurse)
        if (self.weight.dtype, self.weight_scale.dtype) != (weight.dtype, scale.dtype):
            self.weight, self.weight_scale = weight.to(self.weight.device), scale.to(self.weight.device)
        return self

    def kernel_for(self, x: Tensor) -> str:
        """Which kernel `forward(x)` uses: 'int_mm', 'fbgemm', 'int8pack', 'scaled_mm' or 'dequant'."""
        if self.activations == "float8" and self.weight.dtype == torch.float8_e4m3fn and _SCALED_MM is not None:
            # cuBLASLt wants both inner and outer dimensions multiples of 16
            if self.in_features % 16 == 0 and self.out_features % 16 == 0 and x.device.type in ("cpu", "cuda"):
                return "scaled_mm"
        if self.weight.dtype == torch.int8:
            m = x.numel() // max(self.in_features, 1)
            # _int_mm's limits on CUDA (cuBLASLt): more than 16 rows, K and N multiples of 8. The CPU kernel of
            # torch 2.13 takes any shape, but the same rule keeps the choice identical on every device, and
            # for a handful of rows the weight-only kernel is the better one anyway.
            if (self.activations == "int8" and x.device.type in ("cpu", "cuda") and m > 16
                    and self.in_features % 8 == 0 and self.out_features % 8 == 0):
                product = int8_product_on(x.device, self.product)
                # FBGEMM's ops have no gradients (in a compiled graph they run eagerly: see forward)
                if product == "int_mm" or (product == "fbgemm" and not (x.requires_grad and torch.is_grad_enabled())):
                    return product
            # only for a few rows (the modulations' one row per image): see INT8PACK_MAX_ROWS. Not in a compiled
            # graph: inductor (torch 2.13) fails to lower it there.
            if (_INT8PACK_MM is not None and x.device.type == "cpu" and m <= INT8PACK_MAX_ROWS.get(x.dtype, 0)
                    and not torch.compiler.is_compiling()):
                return "int8pack"
        return "dequant"

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel_for(x)
        x2d = x.reshape(-1, self.in_features)
        # scratch tensors save eager page faults; a compiled graph plans its own buffers (and cannot trace them)
        scratch = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if kernel == "scaled_mm":
            x_scale = row_absmax(x2d).clamp_(min=1e-12) / QMAX["float8"]
            codes = (x2d.float() / x_scale).to(torch.float8_e4m3fn)
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
            y = _SCALED_MM(codes, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None, :].float(),
                           out_dtype=out_dtype)
            if self.bias is not None:
                y = y + self.bias.to(out_dtype)
            y = y.to(x.dtype)
        elif kernel == "int_mm":
            codes, x_scale = quantize_tokens(x2d, scratch=scratch)
            # the int32 sum is exact (|acc| <= K * 127^2 stays far below 2^31 for any FLUX width); converted to
            # float32, it is rescaled per token and per channel and biased in place
            if not scratch:
                y = _INT_MM(codes, self.weight.t()).float()
            else:
                acc = _SCRATCH.get("acc", (codes.shape[0], self.out_features), torch.int32, x.device)
                _INT_MM(codes, self.weight.t(), out=acc)
                # converted first, into a reused tensor: an int32 x float32 product runs torch's mixed-dtype loop,
                # several times slower than converting and multiplying (python -m benchmarks.kernels)
                y = _SCRATCH.get("y", acc.shape, torch.float32, x.device).copy_(acc)
            y.mul_(x_scale)
            if self.bias is not None:
                torch.addcmul(self.bias.float(), y, self.weight_scale, out=y)
            else:
                y.mul_(self.weight_scale)
            y = y.to(x.dtype, copy=scratch)  # a scratch tensor never leaves: copied even where x is float32
        elif kernel == "fbgemm":
            product = self.fbgemm_product
            # dynamo cannot trace FBGEMM's packed weights: a compiled block runs this product eagerly between its
            # graphs. Wrapped here, not decorated: the decorator would import dynamo with this module, seconds of
            # every load
            if torch.compiler.is_compiling():
                product = torch.compiler.disable(product)
            y = product(x2d, scratch)
            if self.bias is not None:
                y.add_(self.bias.float())
            y = y.to(x.dtype)
        elif kernel == "int8pack":
            # the kernel wants the scales in the input's dtype (bf16 scales cost < 0.4% per channel, below the
            # rounding of a bf16 output anyway)
            y = _INT8PACK_MM(x2d.contiguous(), self.weight, self.weight_scale.to(x.dtype))
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            if not scratch:
                weight = self.dequantized_weight(x.dtype)
            else:  # into reused tensors: under a streamed model's pinned heap (rectiflux.heap) a fresh one per call
                # would fault in every page of it. Computed in float32 and rounded once, as dequantized_weight does
                shape = tuple(self.weight.shape)
                weight = dequantize_into(_SCRATCH.get("weight", shape, torch.float32, x.device), self.weight,
                                         self.weight_scale)
                if x.dtype != torch.float32:
                    weight = _SCRATCH.get("weight", shape, x.dtype, x.device).copy_(weight)
            y = F.linear(x2d, weight, bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def fbgemm_product(self, x2d: Tensor, scratch: bool = False) -> Tensor:
        """x2d @ weight.T in float32 through FBGEMM's dynamic int8 linear, per-token scaled (no bias)."""
        weight, scale = self.weight, self.weight_scale
        packed = self._packed
        # packed again when the weights change (a fused LoRA replaces them, or writes into them)
        if (packed is None or packed[0] is not weight or packed[1] is not scale
                or packed[2] != (weight._version, scale._version)):
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch 2.13 warns that quantized tensors are deprecated
                warnings.simplefilter("ignore")
                codes = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero_points, 0)
                packed = (weight, scale, (weight._version, scale._version),
                          torch.ops.quantized.linear_prepack(codes, None))
            self._packed = packed
        amax = row_absmax(x2d)
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))  # an all-zero token stays zero
        if scratch:
            xf = _SCRATCH.get("xf", tuple(x2d.shape), torch.float32, x2d.device)
            xf = torch.div(x2d, amax, out=xf) if x2d.dtype == torch.float32 else xf.copy_(x2d).div_(amax)
        else:
            xf = x2d.float() / amax
        # reduce_range: 7-bit activations, which FBGEMM's AVX2 kernels need to add pairs of products in int16
        return torch.ops.quantized.linear_dynamic(xf, packed[3], True).mul_(amax)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights={self.weights}, activations={self.activations}")


# ----------------------------------------------------------------------------------------------------
# whole transformers

def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def quantize_linears(root: nn.Module, prefix: str, weights: str, activations: str | None,
                      skip: Iterable[str]) -> None:
    """Swap every linear under `root` (whose name in the whole model is `prefix`) not covered by `skip` for a
    QuantizedLinear of `weights`: nn.Linears, and the compact ones a checkpoint's format gave (GGUFLinear,
    BnbLinear, or a QuantizedLinear of another format: quantised again from their dequantised weights). A
    QuantizedLinear of `weights` already keeps its weight and only takes `activations`."""
    from .gguf import GGUFLinear
    from .nf4 import BnbLinear

    for name, module in list(root.named_modules()):
        full = f"{prefix}.{name}" if prefix and name else prefix or name
        if _skipped(full, skip):
            continue
        if isinstance(module, QuantizedLinear) and module.weights == weights:
            module.activations = activations
        elif isinstance(module, (nn.Linear, QuantizedLinear, GGUFLinear, BnbLinear)):
            # one at a time: once swapped, the old weight has no reference left in the model and is freed
            replace_module(root, name, QuantizedLinear.from_linear(module, weights, activations))


def check_skip(skip: Iterable[str]) -> tuple[str, ...]:
    skip = tuple(skip)
    if "img_in" not in skip:
        # Flux.dtype is read off img_in.weight: an int8 weight there would make the model cast its inputs to int8
        raise ValueError("img_in must stay in float (Flux takes its dtype from it); keep 'img_in' in skip")
    return skip


def quantize_transformer(model: Flux, weights: str = "int8", activations: str | None = None,
                         skip: Iterable[str] = DEFAULT_SKIP) -> Flux:
    """Quantise `model` in place and return it.

    Every nn.Linear whose qualified name is not in `skip` (or under a name in it) becomes a QuantizedLinear;
    by default that is every linear of the double and single blocks (see DEFAULT_SKIP for why the rest stays
    float). Pass e.g. ``skip=("img_in",)`` to quantise the embedders and the final layer too.
    """
    check_format(weights, activations)
    quantize_linears(model, "", weights, activations, check_skip(skip))
    return model


def set_activations(model: nn.Module, activations: str | None) -> nn.Module:
    """Switch the activation mode of every QuantizedLinear in `model` (the stored weights do not change)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            check_format(module.weights, activations)
            module.activations = activations
    return model


def block_quantizer(weights: str = "int8", activations: str | None = None,
                    product: str | None = None) -> Callable[[nn.Module], None]:
    """A `prepare` for load_transformer: quantises each block's linears as soon as the block is read, so a
    float checkpoint is quantised while it loads (peak: the quantised model plus one float block). `product`, one of
    INT8_PRODUCTS, fixes how int8 activations multiply on the CPU (`QuantizedLinear.product`; None: this CPU's speed
    decides).

    With int8 activations the blocks' attention runs in bfloat16 where the CPU has bf16 kernels (AVX512-BF16 or
    AMX, where it is faster than float32: python -m benchmarks.kernels) and on GPUs: the int8 path is lossy
    already, and attention was the largest float32 cost left in it.
    """
    check_format(weights, activations)
    if product not in (None, *INT8_PRODUCTS):
        raise ValueError(f"int8 products must be one of {', '.join(INT8_PRODUCTS)}, not {product!r}")

    def prepare(block: nn.Module) -> None:
        quantize_linears(block, "", weights, activations, ())
        for linear in _int8_activation_linears(block):
            linear.product = product
        if activations == "int8":
            if product is None:
                cpu_int8_product()  # measured now, not inside a compiled block's first call
            device = next(block.parameters()).device
            if device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
                block.attention_dtype = torch.bfloat16

    return prepare


def _int8_activation_linears(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.activations == "int8"]


def int8_products(model: nn.Module) -> str | None:
    """How `model`'s int8-activation linears multiply, one of INT8_PRODUCTS: "int_mm" (int8 x int8; always on CUDA),
    "fbgemm" (where the CPU's `_int_mm` is slow) or "dequant" (the weights dequantised, the activations left float,
    where neither beats float32); None without such linears (blocks="lazy" reads and quantises its blocks at their
    first use)."""
    linears = _int8_activation_linears(model)
    if not linears:
        return None
    return int8_product_on(linears[0].weight.device, linears[0].product)


def use_int8_dynamic_attention(model: Flux) -> Flux:
    """The int8-dynamic mode's attention for a model whose blocks `block_quantizer` prepares (or has prepared): in
    bfloat16 where the CPU has bfloat16 kernels (each block's `attention_dtype`), and computed head by head with its
    scores in bfloat16 where that beats SDPA on this CPU (`attention_by_head_is_faster`, timed once per process).
    """
    if attention_by_head_is_faster(model.device):
        model.attention = attention_by_head
    return model
