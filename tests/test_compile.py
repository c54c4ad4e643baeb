"""Regional torch.compile: the blocks compiled once per class, the same images, no recompilation across steps,
sizes or lazily read weights."""

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_flux_folder
from torch._dynamo.utils import counters

import rectiflux.quantize.linear as quantize
from rectiflux.pipelines.load import load

CALL = {"prompt": "a red circle", "num_inference_steps": 3, "guidance_scale": 3.5, "max_sequence_length": 16,
        "seed": 0, "output_type": "np"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny") / "flux")


def test_compiled_blocks_give_the_eager_images_and_compile_once(folder):
    eager = load(folder)
    want = {size: eager(height=size, width=size, **CALL).images for size in (32, 64, 48)}
    torch._dynamo.reset()
    counters.clear()
    pipe = load(folder, compile=True)  # blocks read at first use, after compilation was set up
    for size, image in want.items():
        assert np.abs(pipe(height=size, width=size, **CALL).images - image).max() < 1e-5
    # one graph per block class (double, single), reused by every block, every step and every size
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["frames"]["ok"] == 2


def test_compiled_int8_dynamic_blocks_in_bfloat16(folder):
    # int8 activations (torch._int_mm) with bfloat16 around them: the combination dtype="auto" makes on a CPU
    # with fast bfloat16; its modulation rows, a single-row kernel eager, are dequantised in the graph
    products = {"int8_products": "int_mm"}  # whatever this CPU's speed at it (AVX2 only: FBGEMM's, tested below)
    eager = load(folder, quantize="int8-dynamic", dtype="bfloat16", kernels=products)
    pipe = load(folder, quantize="int8-dynamic", dtype="bfloat16", compile=True, kernels=products)
    want = eager(height=32, width=32, **CALL).images
    got = pipe(height=32, width=32, **CALL).images
    assert np.abs(got - want).max() < 0.02  # bfloat16 rounding in fused kernels differs from eager's


@pytest.mark.skipif(not quantize._FBGEMM, reason="this torch has no FBGEMM (x86 builds have it)")
def test_compiled_blocks_run_fbgemm_products_between_their_graphs(folder, monkeypatch):
    # int8-dynamic where _int_mm is slow (AVX2 only): dynamo cannot trace FBGEMM's packed weights, so each product
    # runs eagerly between the compiled graphs, as many times as in the eager model
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", False)
    monkeypatch.setattr(quantize, "FBGEMM_LINEAR_FAST", True)
    calls = []
    product = quantize.QuantizedLinear.fbgemm_product

    def counted(self, x2d, scratch=False):
        calls.append(torch.compiler.is_compiling())
        return product(self, x2d, scratch)

    monkeypatch.setattr(quantize.QuantizedLinear, "fbgemm_product", counted)
    eager = load(folder, quantize="int8-dynamic")
    want = eager(height=32, width=32, **CALL).images
    eager_calls, calls[:] = len(calls), []
    pipe = load(folder, quantize="int8-dynamic", compile=True)
    got = pipe(height=32, width=32, **CALL).images
    assert eager_calls > 0 and len(calls) == eager_calls and not any(calls)
    assert eager.kernels["int8_products"] == pipe.kernels["int8_products"] == "fbgemm"  # blocks read by now
    # not equal: inductor's fused norms differ from eager's in the last bit of float32, and rounding to 7-bit codes
    # turns a few such ties into one code step
    assert np.abs(got - want).max() < 2e-3
