"""Quantised linears and transformers: kernels against the dequantised reference, accuracy against float32,
the safetensors format, block-by-block conversion of float checkpoints, and refusal of bad files."""

import json
import time
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import rectiflux.quantize.files as quantize_files
import rectiflux.quantize.linear as quantize
from rectiflux.flux.config import FluxConfig
from rectiflux.flux.transformer import Flux
from rectiflux.quantize.files import load_quantized, quantize_file, save_quantized
from rectiflux.quantize.linear import (
    DEFAULT_SKIP,
    QuantizedLinear,
    dequantize_weight,
    quantize_tokens,
    quantize_transformer,
    quantize_weight,
    set_activations,
)
from rectiflux.weights.checkpoint import CheckpointError
from rectiflux.weights.transformer import load_transformer, save_transformer

MODES = [("int8", None), ("int8", "int8"), ("float8", None)]
CFG = FluxConfig(in_channels=16, num_heads=4, head_dim=16, depth=2, depth_single=2, joint_attention_dim=32,
                 pooled_projection_dim=16, axes_dim=(4, 6, 6), guidance_embed=True)


@pytest.fixture(autouse=True)
def int8_products_on(monkeypatch):
    """The int8 x int8 kernel is exercised whatever this CPU's speed at it (tests are about results)."""
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_linear(k: int = 64, n: int = 48, seed: int = 0) -> nn.Linear:
    """Rows of different magnitudes (as in real layers), so a scale applied to the wrong row shows."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.empty(n, 1).uniform_(0.5, 2, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin


def random_flux(cfg: FluxConfig = CFG, seed: int = 0) -> Flux:
    """Weights large enough that the blocks dominate the output (with PyTorch's default init the residual
    stream carries ~90% of it and would hide a broken block)."""
    torch.manual_seed(seed)
    model = Flux(cfg).eval()
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[1] ** 0.5)
            elif name.endswith("scale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def flux_inputs(cfg: FluxConfig = CFG, txt_len: int = 16, seed: int = 1) -> dict:
    # 64 image + 16 text tokens: the single blocks see 80 rows (int_mm), the double blocks' text stream only 16
    # (at _int_mm's limit, so the weight-only kernel), which exercises both in one forward
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(8, 8, 3)
    ids[..., 1] = torch.arange(8)[:, None]
    ids[..., 2] = torch.arange(8)[None, :]
    return dict(img=torch.randn(1, 64, cfg.in_channels, generator=g), img_ids=ids.reshape(-1, 3),
                txt=torch.randn(1, txt_len, cfg.joint_attention_dim, generator=g), txt_ids=torch.zeros(txt_len, 3),
                timesteps=torch.rand(1, generator=g), y=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                guidance=torch.tensor([3.5]))


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


# ----------------------------------------------------------------------------------------------------
# one linear

@pytest.mark.parametrize("weights", ["int8", "float8"])
def test_quantize_weight_gives_each_row_the_full_range(weights):
    w = random_linear().weight.detach()
    w[3] = 0  # an all-zero row must not give NaN codes
    q, scale = quantize_weight(w, weights)
    qmax = {"int8": 127, "float8": 448}[weights]
    assert q.dtype == {"int8": torch.int8, "float8": torch.float8_e4m3fn}[weights] and scale.dtype == torch.float32
    amax = w.abs().amax(dim=1)
    nonzero = amax > 0
    assert torch.allclose(scale[nonzero], amax[nonzero] / qmax, rtol=1e-6)
    assert torch.equal(q.float().abs().amax(dim=1)[nonzero], torch.full((int(nonzero.sum()),), float(qmax)))
    assert torch.equal(q[3].float(), torch.zeros(w.shape[1])) and torch.isfinite(scale).all()
    err = (dequantize_weight(q, scale) - w).abs()
    if weights == "int8":  # round to nearest: half a step at most
        assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    else:  # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 for normal numbers
        normal = w.abs() / scale[:, None] >= 2**-6
        assert (err[normal] <= w.abs()[normal] * 2**-4 * (1 + 1e-5)).all()


@pytest.mark.parametrize("kernel", ["int8pack", "dequant"])
def test_int8_weight_only_matches_dequantized_matmul(monkeypatch, kernel):
    if kernel == "dequant":
        monkeypatch.setattr(quantize, "_INT8PACK_MM", None)
    lin = random_linear()
    q = QuantizedLinear.from_linear(lin, "int8")
    rows = quantize.INT8PACK_MAX_ROWS[torch.float32]  # the packed kernel's limit
    x = torch.randn(1, rows, 64, generator=torch.Generator().manual_seed(2))
    assert q.kernel_for(x) == kernel
    with torch.no_grad():
        out, expected, float_out = q(x), F.linear(x, q.dequantized_weight(), lin.bias), lin(x)
        assert out.shape == (1, rows, 48) and out.dtype == torch.float32
        assert rel(out, expected) < 1e-6
        assert rel(out, float_out) < 0.02  # measured 0.6%
        q.weight_scale = q.weight_scale.flip(0)  # the same bound catches a scale applied to the wrong rows
        assert rel(q(x), float_out) > 0.2


def test_int8_activations_match_dequantized_inputs_and_weights():
    lin = random_linear()
    q = QuantizedLinear.from_linear(lin, "int8", activations="int8")
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(3))
    assert q.kernel_for(x) == "int_mm"
    codes, x_scale = quantize_tokens(x.reshape(-1, 64))
    assert codes.dtype == torch.int8 and torch.equal(codes.abs().amax(dim=1), torch.full((40,), 127, dtype=torch.int8))
    with torch.no_grad():
        out = q(x)
        expected = F.linear(codes.float() * x_scale, q.dequantized_weight(), lin.bias).reshape(2, 20, 48)
        assert rel(out, expected) < 1e-6
        assert rel(out, lin(x)) < 0.03  # measured 0.9%
        assert rel(out, QuantizedLinear.from_linear(lin, "int8")(x)) < 0.03


def test_int8_activations_stay_float_where_int8_products_are_slow(monkeypatch):
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", False)
    monkeypatch.setattr(quantize, "FBGEMM_LINEAR_FAST", False)
    lin = random_linear()
    q = QuantizedLinear.from_linear(lin, "int8", activations="int8")
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    assert q.kernel_for(x) == "dequant" and q.kernel_for(x[:1]) == "int8pack"
    with torch.no_grad():
        assert rel(q(x), F.linear(x, q.dequantized_weight(), lin.bias)) < 1e-6
        assert rel(q(x), lin(x)) < 0.02


@pytest.mark.skipif(not quantize._FBGEMM, reason="this torch has no FBGEMM (x86 builds have it)")
def test_fbgemm_products_scale_each_token_and_follow_changed_weights(monkeypatch):
    # where _int_mm is slow (AVX2 only) and FBGEMM's dynamic linear is fast
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", False)
    monkeypatch.setattr(quantize, "FBGEMM_LINEAR_FAST", True)
    lin = random_linear()
    q = QuantizedLinear.from_linear(lin, "int8", activations="int8")
    g = torch.Generator().manual_seed(3)
    # half the tokens a thousand times smaller: one scale for all of them would leave those few codes
    x = torch.randn(40, 64, generator=g) * torch.tensor([1.0, 1e-3]).repeat(20)[:, None]
    x[7] = 0
    assert q.kernel_for(x) == "fbgemm" and q.kernel_for(x[:1]) == "int8pack"
    with torch.no_grad():
        out, exact = q(x), lin(x)
        without_bias = out - lin.bias
        for rows in (slice(0, None, 2), slice(1, None, 2)):  # large tokens, small tokens
            assert rel(without_bias[rows], exact[rows] - lin.bias) < 0.03  # measured 1.4% and 1.4%
        assert torch.allclose(out[7], lin.bias)
        assert rel(out, quantize.QuantizedLinear.from_linear(lin, "int8")(x)) < 0.03
        # the packed weight follows the module's weights: replaced (as a fused LoRA does), then written in place
        q.weight, q.weight_scale = q.weight.flip(0), q.weight_scale.flip(0)
        assert rel(q(x) - lin.bias, (exact - lin.bias).flip(1)) < 0.03
        q.weight.neg_()
        assert rel(q(x) - lin.bias, (lin.bias - exact).flip(1)) < 0.03
    with torch.enable_grad():  # FBGEMM's ops have no gradients: an input that needs them is multiplied in float
        assert q.kernel_for(x.requires_grad_()) == "dequant"


def test_fbgemm_probe_measures_once(monkeypatch):
    has_fbgemm = quantize._FBGEMM
    monkeypatch.setattr(quantize, "FBGEMM_LINEAR_FAST", None)
    monkeypatch.setattr(quantize, "_FBGEMM", False)
    assert quantize.fbgemm_linear_is_fast() is False
    monkeypatch.setattr(quantize, "_FBGEMM", True)
    assert quantize.fbgemm_linear_is_fast() is False  # answered once per process
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", False)
    assert quantize.cpu_int8_product() == "dequant"
    if has_fbgemm:
        monkeypatch.setattr(quantize, "FBGEMM_LINEAR_FAST", None)
        assert isinstance(quantize.fbgemm_linear_is_fast(), bool)  # the real kernels
        assert quantize.cpu_int8_product() == ("fbgemm" if quantize.FBGEMM_LINEAR_FAST else "dequant")
    with pytest.raises(ValueError, match="int8 products must be one of int_mm, fbgemm, dequant"):
        quantize.block_quantizer("int8", "int8", product="vnni")


def test_int8_speed_probe_measures_once_and_gives_up_on_a_slow_kernel(monkeypatch):
    calls = []
    product = torch.zeros(128, 512, dtype=torch.int32)
    for kernel, fast, timed in ((lambda a, b: product, True, 6), (lambda a, b: time.sleep(0.2) or product, False, 2)):
        monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", None)
        monkeypatch.setattr(quantize, "_INT_MM", lambda a, b, kernel=kernel: calls.append(1) or kernel(a, b))
        calls.clear()
        assert quantize.int8_matmul_is_fast() is fast and quantize.INT8_MATMUL_FAST is fast
        # a tiny set-up call, two warm-up calls and three timed ones; a kernel far slower than float32 (an AVX2-only
        # CPU's) once after its set-up call
        assert len(calls) == timed
        assert quantize.int8_matmul_is_fast() is fast and len(calls) == timed
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", None)
    monkeypatch.setattr(quantize, "_INT_MM", None)
    assert quantize.int8_matmul_is_fast() is False
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", None)
    monkeypatch.setattr(quantize, "_INT_MM", torch._int_mm)
    assert isinstance(quantize.int8_matmul_is_fast(), bool)  # the real kernels


def test_int8_speed_probe_does_not_count_the_kernels_set_up_as_its_speed(monkeypatch):
    # torch._int_mm's first call in a process sets up its library (several milliseconds on any shape, against a
    # fraction of one for the probe's product): a fast kernel judged by that call was taken for a slow one, and
    # int8-dynamic ran its dequantising path on CPUs with VNNI
    product = torch.zeros(128, 512, dtype=torch.int32)
    first = []

    def kernel(a, b):
        if not first:
            first.append(1)
            time.sleep(0.1)
        return product

    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", None)
    monkeypatch.setattr(quantize, "_INT_MM", kernel)
    assert quantize.int8_matmul_is_fast() is True


def test_dequant_kernel_reuses_one_weight_tensor_without_grad():
    lin = random_linear()
    for weights in ("int8", "float8"):
        q = QuantizedLinear.from_linear(lin, weights)
        x = torch.randn(40, 64, generator=torch.Generator().manual_seed(6))
        assert q.kernel_for(x) == "dequant"
        with torch.no_grad():
            first = q(x)
            scratch = quantize._SCRATCH.tensors[("weight", torch.float32, x.device)].data_ptr()
            again = QuantizedLinear.from_linear(random_linear(seed=1), weights)(x)  # overwrites the scratch weight
            assert torch.equal(q(x), first) and not torch.equal(again, first)
            assert quantize._SCRATCH.tensors[("weight", torch.float32, x.device)].data_ptr() == scratch
            assert rel(first, F.linear(x, q.dequantized_weight(), lin.bias)) < 1e-6


@pytest.mark.parametrize("rows, k, n", [(16, 64, 48), (4, 64, 48), (40, 60, 48), (40, 64, 44)])
def test_int_mm_shape_limits_fall_back_to_weight_only(rows, k, n):
    lin = random_linear(k, n)
    q = QuantizedLinear.from_linear(lin, "int8", activations="int8")
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(4))
    # the packed weight-only kernel's time grows with every row: past a few rows the weight is dequantised
    assert q.kernel_for(x) == ("int8pack" if rows <= quantize.INT8PACK_MAX_ROWS[torch.float32] else "dequant")
    with torch.no_grad():
        assert rel(q(x), F.linear(x, q.dequantized_weight(), lin.bias)) < 1e-6


def test_packed_kernel_serves_more_rows_in_bfloat16():
    q = QuantizedLinear.from_linear(random_linear(), "int8")
    for dtype, rows in quantize.INT8PACK_MAX_ROWS.items():
        assert q.kernel_for(torch.zeros(rows, 64, dtype=dtype)) == "int8pack"
        assert q.kernel_for(torch.zeros(rows + 1, 64, dtype=dtype)) == "dequant"
    assert quantize.INT8PACK_MAX_ROWS[torch.bfloat16] > quantize.INT8PACK_MAX_ROWS[torch.float32]


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2])
def test_dequantize_into_gives_torchs_values_for_every_code(dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
    scale = torch.empty(16).uniform_(1e-4, 10, generator=torch.Generator().manual_seed(0))
    expected = dequantize_weight(codes, scale)
    out = quantize.dequantize_into(torch.full((16, 16), float("nan")), codes, scale)
    if dtype == torch.float8_e4m3fn:  # its two NaN codes (0x7f, 0xff) read as +-480, documented
        nan = expected.isnan()
        assert torch.equal(out[nan], torch.tensor([480.0, -480.0]) * scale[[7, 15]])
        out, expected = out[~nan], expected[~nan]
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)  # e5m2 keeps its inf and NaN


@pytest.mark.parametrize("weights", ["int8", "float8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_kernel_equals_a_matmul_by_the_dequantized_weight(weights, dtype):
    lin = random_linear()
    q = QuantizedLinear.from_linear(lin, weights)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    assert q.kernel_for(x) == "dequant"
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, q.dequantized_weight(dtype), lin.bias.to(dtype)))


def test_float8_matches_dequantized_matmul():
    lin = random_linear()
    q = QuantizedLinear.from_linear(lin, "float8")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(5))
    assert q.kernel_for(x) == "dequant" and q.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        expected = x @ (q.weight.float() * q.weight_scale[:, None]).T + lin.bias
        assert rel(q(x), expected) < 1e-6
        assert rel(q(x), lin(x)) < 0.06  # measured 2.6%: e4m3 has 3 mantissa bits


def test_float8_activations_run_scaled_mm_with_row_wise_scales():
    lin = random_linear()
    q = QuantizedLinear.from_linear(lin, "float8", activations="float8")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(5))
    assert q.kernel_for(x) == "scaled_mm"
    x2d = x.reshape(-1, 64)
    x_scale = x2d.abs().amax(dim=1, keepdim=True) / 448
    codes = (x2d / x_scale).to(torch.float8_e4m3fn)
    with torch.no_grad():
        # what _scaled_mm computes: both float8 operands widened, each product scaled by its row's and column's scale
        expected = (codes.float() * x_scale) @ (q.weight.float() * q.weight_scale[:, None]).T + lin.bias
        assert rel(q(x), expected.reshape(3, 5, 48)) < 1e-5
        assert rel(q(x), lin(x)) < 0.1  # measured 3.8%: both operands have e4m3's 3 mantissa bits
        assert q(x.bfloat16()).dtype == torch.bfloat16
    odd = QuantizedLinear.from_linear(nn.Linear(60, 48), "float8", activations="float8")
    assert odd.kernel_for(torch.randn(4, 60)) == "dequant"  # cuBLASLt's multiples of 16
    with pytest.raises(ValueError, match="float8 activations need float8 weights"):
        QuantizedLinear.from_linear(random_linear(), "int8", "float8")


@pytest.mark.parametrize("weights, activations", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype_follows_the_input(weights, activations, dtype):
    lin = random_linear()
    q = QuantizedLinear.from_linear(lin, weights, activations)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = q(x.to(dtype))
        assert out.dtype == dtype
        assert rel(out, q(x)) < 0.01


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="int8 activations need int8 weights"):
        QuantizedLinear.from_linear(random_linear(), "float8", "int8")
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize_weight(torch.ones(2, 2), "int4")


# ----------------------------------------------------------------------------------------------------
# whole transformers

def test_quantize_transformer_swaps_the_block_linears():
    model = quantize_transformer(random_flux())
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear | nn.Linear):
            in_blocks = name.startswith(("double_blocks.", "single_blocks."))
            assert isinstance(module, QuantizedLinear) == in_blocks, name
    # 2 double blocks x (2 mod + 2 qkv + 2 proj + 4 mlp) + 2 single blocks x (mod + linear1 + linear2)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 26
    assert model.dtype == torch.float32

    everything = quantize_transformer(random_flux(), skip=("img_in",))
    assert isinstance(everything.final_layer.linear, QuantizedLinear)
    assert isinstance(everything.txt_in, QuantizedLinear)
    assert isinstance(everything.img_in, nn.Linear)
    with pytest.raises(ValueError, match="img_in must stay in float"):
        quantize_transformer(random_flux(), skip=())


# Measured on this model and input (seed 0): int8 1.5%, int8 + int8 activations 1.8%, float8 6.1%; with the
# blocks' linears zeroed instead the output moves by more than 100%, so these bounds see any broken block.
BOUNDS = {("int8", None): 0.03, ("int8", "int8"): 0.04, ("float8", None): 0.12}


@pytest.mark.parametrize("weights, activations", MODES)
def test_quantized_transformer_stays_close_to_float32(weights, activations):
    inputs = flux_inputs()
    expected = run(random_flux(), inputs)
    out = run(quantize_transformer(random_flux(), weights, activations), inputs)
    assert out.dtype == torch.float32
    assert rel(out, expected) < BOUNDS[weights, activations]


@pytest.mark.parametrize("weights, activations", MODES)
def test_save_load_round_trip_is_bit_identical(tmp_path, weights, activations):
    inputs = flux_inputs()
    model = quantize_transformer(random_flux(), weights, activations)
    file = tmp_path / "q.safetensors"
    save_quantized(model, file)
    loaded = load_quantized(file, activations=activations)
    assert torch.equal(run(loaded, inputs), run(model, inputs))
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a.float(), b.float()), k
    stored = load_file(file)
    assert stored["single_blocks.0.linear1.weight"].dtype == quantize.WEIGHT_DTYPES[weights]
    assert stored["single_blocks.0.linear1.weight_scale"].dtype == torch.float32
    assert stored["txt_in.weight"].dtype == torch.float32 and "txt_in.weight_scale" not in stored
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    assert meta["rectiflux_quantization"] == weights and json.loads(meta["rectiflux_config"])["depth_single"] == 2


def test_activation_mode_is_chosen_at_load_time(tmp_path):
    inputs = flux_inputs()
    file = tmp_path / "q.safetensors"
    save_quantized(quantize_transformer(random_flux()), file)
    with_int8_activations = run(quantize_transformer(random_flux(), activations="int8"), inputs)
    assert torch.equal(run(load_quantized(file, activations="int8"), inputs), with_int8_activations)
    assert torch.equal(run(set_activations(load_quantized(file), "int8"), inputs), with_int8_activations)
    assert not torch.equal(run(load_quantized(file), inputs), with_int8_activations)
    save_quantized(quantize_transformer(random_flux(), "float8"), tmp_path / "f8.safetensors")
    with pytest.raises(ValueError, match="int8 activations need int8 weights"):
        load_quantized(tmp_path / "f8.safetensors", activations="int8")


def test_load_quantized_casts_only_the_float_parts(tmp_path):
    file = tmp_path / "q.safetensors"
    save_quantized(quantize_transformer(random_flux(), "float8"), file)
    model = load_quantized(file, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.final_layer.linear.weight.dtype == torch.bfloat16
    lin = model.single_blocks[0].linear1
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale.dtype == torch.float32
    assert lin.bias.dtype == torch.bfloat16
    assert run(model, flux_inputs()).dtype == torch.bfloat16


def test_file_is_about_four_times_smaller(tmp_path):
    # hidden 256: the per-row scales (4 bytes per row of 256+ int8) and biases stay small, as in FLUX.1
    cfg = FluxConfig(in_channels=16, num_heads=4, head_dim=64, depth=1, depth_single=2, joint_attention_dim=32,
                     pooled_projection_dim=16, axes_dim=(16, 24, 24), guidance_embed=False)
    model = Flux(cfg)
    save_transformer(model, tmp_path / "float.safetensors", layout="bfl")
    save_quantized(quantize_transformer(model, skip=("img_in",)), tmp_path / "int8.safetensors")
    ratio = (tmp_path / "float.safetensors").stat().st_size / (tmp_path / "int8.safetensors").stat().st_size
    assert 3.8 < ratio < 4.0  # measured 3.93


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_quantize_file_from_diffusers_folder_equals_quantizing_in_memory(tmp_path, stored):
    torch.manual_seed(0)
    FluxTransformer2DModel(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
                           guidance_embeds=True, axes_dims_rope=(4, 6, 6)).to(stored).save_pretrained(tmp_path / "src")
    inputs = flux_inputs()

    def in_memory(weights: str = "int8") -> Flux:
        model = quantize_transformer(load_transformer(tmp_path / "src"), weights)
        # load_transformer leaves the float parameters memory-mapped at the file's offsets, where the CPU BLAS
        # sums in another order than for aligned memory; load_quantized copies them, so copy them here too
        for p in model.parameters():
            p.data = p.data.clone()
        return model

    for weights in ("int8", "float8"):
        reference = in_memory(weights)
        quantize_file(tmp_path / "src", tmp_path / f"{weights}.safetensors", weights)
        converted = load_quantized(tmp_path / f"{weights}.safetensors")
        assert reference.state_dict().keys() == converted.state_dict().keys()
        for k, a in reference.state_dict().items():
            assert torch.equal(a.float(), converted.state_dict()[k].float()), k
        assert torch.equal(run(converted, inputs), run(reference, inputs))
        assert converted.dtype == torch.float32  # the float parts, like load_transformer's default

    # and a BFL single file gives the same
    save_transformer(load_transformer(tmp_path / "src", dtype=None), tmp_path / "bfl.safetensors", layout="bfl")
    quantize_file(tmp_path / "bfl.safetensors", tmp_path / "from_bfl.safetensors")
    from_bfl = run(load_quantized(tmp_path / "from_bfl.safetensors"), inputs)
    assert torch.equal(from_bfl, run(in_memory(), inputs))


def test_quantize_file_holds_one_float_block_at_a_time(tmp_path, monkeypatch):
    model = random_flux()
    save_transformer(model, tmp_path / "src", layout="diffusers")
    linears = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = [f"double_blocks.{i}." for i in range(2)] + [f"single_blocks.{i}." for i in range(2)]
    largest_block = max(sum(v for n, v in linears.items() if n.startswith(b)) for b in blocks)
    embedders = sum(v for n, v in linears.items() if n.startswith(DEFAULT_SKIP))

    held, original = [], quantize_files.load_into

    def watching_load_into(module, state, dtype, what):
        out = original(module, state, dtype, what)
        root = watching_load_into.root
        held.append(sum(m.weight.numel() for m in root.modules() if isinstance(m, nn.Linear) and not m.weight.is_meta))
        return out

    real_flux = quantize_files.Flux

    def recording_flux(cfg):
        watching_load_into.root = real_flux(cfg)
        return watching_load_into.root

    monkeypatch.setattr(quantize_files, "load_into", watching_load_into)
    monkeypatch.setattr(quantize_files, "Flux", recording_flux)
    quantize_file(tmp_path / "src", tmp_path / "q.safetensors")
    assert len(held) == 4 + 6  # each block, and img_in, txt_in, time_in, vector_in, guidance_in, final_layer
    assert max(held) <= largest_block + embedders < sum(linears.values()) / 2
    root = watching_load_into.root
    # at the end only the float embedders remain
    assert sum(m.weight.numel() for m in root.modules() if isinstance(m, nn.Linear)) == embedders


# ----------------------------------------------------------------------------------------------------
# bad files

def rewrite(src, dst, drop=(), replace=None, metadata=None):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = {k: v for k, v in load_file(src).items() if k not in drop}
    tensors.update(replace or {})
    save_file(tensors, dst, metadata={**meta, **(metadata or {})})


def refusal(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_quantized(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_quantized_files_are_refused_in_one_line(tmp_path):
    good = tmp_path / "q.safetensors"
    save_quantized(quantize_transformer(random_flux()), good)

    save_transformer(random_flux(), tmp_path / "float.safetensors", layout="bfl")
    assert "not a quantized transformer" in refusal(tmp_path / "float.safetensors")

    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:5000])
    assert "cannot read" in refusal(tmp_path / "truncated.safetensors")

    cfg = json.dumps({**asdict(CFG), "depth_single": 1})
    rewrite(good, tmp_path / "depth.safetensors", metadata={"rectiflux_config": cfg})
    assert "unexpected single_blocks.1." in refusal(tmp_path / "depth.safetensors")

    name = "double_blocks.1.img_attn.qkv"
    rewrite(good, tmp_path / "noscale.safetensors", drop=[f"{name}.weight_scale"])
    assert f"{name}.weight is int8 (expected float)" in refusal(tmp_path / "noscale.safetensors")

    rewrite(good, tmp_path / "floatweight.safetensors", replace={f"{name}.weight": torch.zeros(192, 64)})
    assert f"{name}.weight is float32 (expected int8)" in refusal(tmp_path / "floatweight.safetensors")

    rewrite(good, tmp_path / "shape.safetensors", replace={f"{name}.weight_scale": torch.ones(3)})
    assert f"{name}.weight_scale (3,)" in refusal(tmp_path / "shape.safetensors")

    stray = "double_blocks.0.img_attn.norm.weight_scale"
    rewrite(good, tmp_path / "stray.safetensors", replace={stray: torch.ones(2)})
    assert f"{stray} (no quantizable linear" in refusal(tmp_path / "stray.safetensors")

    rewrite(good, tmp_path / "f8.safetensors", metadata={"rectiflux_quantization": "float8"})
    message = refusal(tmp_path / "f8.safetensors")  # every quantised weight is wrong: the first four are named
    assert "double_blocks.0.img_attn.qkv.weight is int8 (expected float8_e4m3fn)" in message and "(+22 more)" in message


def test_bad_float_sources_are_refused_in_one_line(tmp_path):
    model = random_flux()
    save_transformer(model, tmp_path / "src", layout="diffusers")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "num_single_layers": 3}))
    with pytest.raises(CheckpointError, match="missing single_blocks.2.") as e:
        quantize_file(tmp_path / "src", tmp_path / "q.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "q.safetensors").exists()

    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "num_single_layers": 1}))
    with pytest.raises(CheckpointError, match="unexpected single_transformer_blocks.1.") as e:  # named as stored
        quantize_file(tmp_path / "src", tmp_path / "q.safetensors")
    assert "\n" not in str(e.value)


def test_scratch_quantisation_equals_the_plain_one():
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(9)) * 5
    codes, scale = quantize_tokens(x)
    scratch_codes, scratch_scale = quantize_tokens(x, scratch=True)
    assert torch.equal(codes, scratch_codes) and torch.equal(scale, scratch_scale)
    assert codes.abs().max() == 127 and torch.equal(quantize_tokens(torch.zeros(3, 8))[0], torch.zeros(3, 8,
                                                                                                      dtype=torch.int8))


@pytest.mark.parametrize("blocks", ["lazy", "stream"])
def test_quantized_file_streams_block_by_block(tmp_path, blocks):
    from diffusers import FluxTransformer2DModel

    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
                           guidance_embeds=True, axes_dims_rope=(4, 6, 6)).save_pretrained(tmp_path / "src")
    quantize_file(tmp_path / "src", tmp_path / "q.safetensors")
    inputs = dict(img=torch.randn(1, 24, 16), img_ids=torch.rand(24, 3) * 5, txt=torch.randn(1, 5, 24),
                  txt_ids=torch.zeros(5, 3), timesteps=torch.tensor([0.4]), y=torch.randn(1, 20),
                  guidance=torch.tensor([3.0]))
    with torch.no_grad():
        expected = load_quantized(tmp_path / "q.safetensors", activations="int8")(**inputs)
        model = load_quantized(tmp_path / "q.safetensors", activations="int8", blocks=blocks)
        for _ in range(2):
            assert torch.equal(model(**inputs), expected)
    resident = {p.device.type for b in model.single_blocks for p in b.parameters()}
    assert resident == ({"meta"} if blocks == "stream" else {"cpu"})
