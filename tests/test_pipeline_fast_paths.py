"""Pipelines with the block modes, the step cache and quantisation at load (the embedded model and a tiny one)."""

import numpy as np
import pytest
import torch

import rectiflux.quantize.linear as quantize
from rectiflux.flux.layers import attention, attention_by_head
from rectiflux.images import psnr
from rectiflux.pipelines.load import load


def render(pipe, **kwargs):
    return pipe("a small blue square at the top on a black background", seed=3, output_type="np", **kwargs)


def test_block_modes_give_the_same_image():
    images = {blocks: render(load("shapes", blocks=blocks)).images for blocks in ("lazy", "memory", "stream")}
    assert np.array_equal(images["lazy"], images["memory"]) and np.array_equal(images["lazy"], images["stream"])


def test_step_cache_is_opt_in_and_skips_steps():
    pipe = load("shapes")
    plain = render(pipe, num_inference_steps=12)
    assert plain.cached_steps == 0
    assert np.array_equal(render(pipe, num_inference_steps=12, cache_threshold=0.0).images, plain.images)
    cached = render(pipe, num_inference_steps=12, cache_threshold=0.3)
    assert 0 < cached.cached_steps < 12
    mse = float(((cached.images - plain.images) ** 2).mean())
    assert 10 * np.log10(1 / mse) > 20  # close to the uncached image, not identical
    everything = render(pipe, num_inference_steps=12, cache_threshold=1e9)
    assert everything.cached_steps == 11  # only the first step runs every block
    with pytest.raises(ValueError, match="threshold"):
        render(pipe, cache_threshold=-1.0)


def test_int8_dynamic_blocks_use_bf16_attention_where_the_cpu_has_it():
    pipe = load("shapes", quantize="int8-dynamic", blocks="memory")
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    assert {b.attention_dtype for b in [*pipe.transformer.double_blocks, *pipe.transformer.single_blocks]} == {
        expected}
    assert load("shapes", quantize="int8", blocks="memory").transformer.double_blocks[0].attention_dtype is None


@pytest.mark.parametrize("faster", [True, False])
def test_int8_dynamic_attends_head_by_head_where_that_is_faster(monkeypatch, faster):
    # the probe's answer (timed once per process on the real kernels) decides; both stay close to float32's image
    monkeypatch.setattr(quantize, "attention_by_head_is_faster", lambda device: faster)
    pipe = load("shapes", quantize="int8-dynamic", blocks="memory")
    assert pipe.transformer.attention is (attention_by_head if faster else attention)
    assert load("shapes", quantize="int8", blocks="memory").transformer.attention is attention
    assert psnr(render(pipe).images, render(load("shapes")).images) >= 30


@pytest.mark.parametrize("fast", [True, False])
def test_given_kernels_are_used_whatever_this_machines_timings_say(monkeypatch, fast):
    # a replayed recipe's kernels: the probes here answer one way, the recipe was made where they answered the other
    def probes(answer: bool) -> None:
        monkeypatch.setattr(quantize, "attention_by_head_is_faster", lambda device: answer)
        monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", answer)
        monkeypatch.setattr(quantize, "FBGEMM_LINEAR_FAST", False)

    def choice(answer: bool) -> dict:
        return {"attention": "by-head" if answer else "sdpa", "int8_products": "int_mm" if answer else "dequant"}

    probes(fast)
    probed = load("shapes", quantize="int8-dynamic", blocks="memory")
    replayed = load("shapes", quantize="int8-dynamic", blocks="memory", kernels=choice(not fast))
    assert probed.kernels == choice(fast) and replayed.kernels == choice(not fast)
    here, replay = render(probed).images, render(replayed).images
    probes(not fast)
    there = render(load("shapes", quantize="int8-dynamic", blocks="memory")).images
    assert np.array_equal(replay, there) and not np.array_equal(replay, here)
    assert load("shapes").kernels == {"attention": "sdpa"}


@pytest.mark.skipif(not quantize._FBGEMM, reason="this torch has no FBGEMM (x86 builds have it)")
def test_fbgemm_products_make_an_image_close_to_float32s():
    pipe = load("shapes", quantize="int8-dynamic", blocks="memory", kernels={"int8_products": "fbgemm"})
    assert pipe.kernels["int8_products"] == "fbgemm"
    image = render(pipe).images
    dequantised = render(load("shapes", quantize="int8-dynamic", blocks="memory",
                              kernels={"int8_products": "dequant"})).images
    assert not np.array_equal(image, dequantised)  # the activations were quantised
    assert psnr(image, render(load("shapes")).images) >= 30


@pytest.mark.parametrize("kernels, message", [
    ({"attention": "flash"}, "attention must be one of sdpa, by-head"),
    ({"speed": "max"}, "unknown kernel choice 'speed'"),
    ({"int8_products": "int_mm"}, "int8_products is a choice of quantize='int8-dynamic' only"),
])
def test_bad_kernels_are_refused(kernels, message):
    with pytest.raises(ValueError, match=message):
        load("shapes", kernels=kernels)
