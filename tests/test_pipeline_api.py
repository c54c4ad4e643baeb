"""The diffusers habits FluxPipeline keeps (names, `to`, progress bars, memory helpers, interruption) and the bad
input it refuses in one line, on a tiny random model."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline as DiffusersFluxPipeline
from PIL import Image
from test_pipeline import COMMON, PROMPT, assert_close, generators, grey_mask, picture, watch_models
from tiny_models import make_tiny_flux_folder

import rectiflux
from rectiflux.pipelines.flux import FluxPipeline, ModelRangeWarning
from rectiflux.sampling.denoise import NonFiniteLatents

H, W = COMMON["height"], COMMON["width"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("api") / "dev")


@pytest.fixture(scope="module")
def pipe(folder):
    return FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def ref(folder):
    pipe = DiffusersFluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    return pipe(prompt=PROMPT, generator=generators(0), **{**COMMON, **kwargs})


def test_from_pretrained_is_load(folder, pipe):
    assert isinstance(pipe, FluxPipeline) and pipe.dtype == torch.float32
    np.testing.assert_array_equal(run(pipe).images, run(rectiflux.load(folder)).images)


def test_to_takes_a_device_a_dtype_or_both(folder):
    pipe = rectiflux.load(folder)
    assert pipe.to(torch.bfloat16) is pipe
    models = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    assert {p.dtype for m in models for p in m.parameters()} == {torch.bfloat16}
    pipe.to("cpu", torch.float32)
    assert {p.dtype for m in models for p in m.parameters()} == {torch.float32}
    pipe.to(torch_device="cpu", torch_dtype="float16")
    wo = {p.dtype for n, p in pipe.text_encoder_2.named_parameters() if ".wo." in n}
    assert wo == {torch.float32} and pipe.transformer.dtype == torch.float16  # T5's wo stays float32, as transformers
    with pytest.raises(ValueError, match="torch sees no CUDA device") as e:
        pipe.to("cuda")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot run a pipeline"):
        pipe.to("meta")


def test_lazy_blocks_cast_later_take_the_new_dtype(folder):
    pipe = rectiflux.load(folder, blocks="lazy").to(torch.bfloat16)
    run(pipe, output_type="latent")
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}


def test_encode_prompt_returns_what_diffusers_returns(pipe, ref):
    kwargs = {"prompt": [PROMPT, "a small blue square"], "prompt_2": None, "num_images_per_prompt": 2,
              "max_sequence_length": 32}
    ours, theirs = pipe.encode_prompt(**kwargs), ref.encode_prompt(**kwargs)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and (a - b).abs().max() < 1e-5


def test_progress_bar_is_tqdm_drawn_only_where_asked(pipe, capsys):
    run(pipe)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar by default
    stream = io.StringIO()
    pipe.set_progress_bar_config(disable=False, file=stream, desc="denoising", mininterval=0)
    try:
        run(pipe)
        bar = pipe.progress_bar(total=5)
        assert bar.total == 5
        bar.close()
    finally:
        pipe.set_progress_bar_config()
    text = stream.getvalue()
    assert "denoising" in text and f"{COMMON['num_inference_steps']}/{COMMON['num_inference_steps']}" in text


def test_return_dict_false_is_a_tuple(pipe):
    out = run(pipe, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, H, W, 3)


def test_interrupt_skips_the_remaining_steps_as_diffusers_does(pipe, ref):
    def stop(pipeline, step, timestep, tensors):
        if step == 0:
            pipeline._interrupt = True
        return tensors

    out = run(pipe, callback_on_step_end=stop)
    assert out.steps == 1
    assert_close(out.images, ref(prompt=PROMPT, generator=generators(0), callback_on_step_end=stop,
                                 **COMMON).images)
    assert run(pipe).steps == COMMON["num_inference_steps"]  # reset at the next call
    pipe.interrupt = True  # the property too, before a call: cleared when the call starts
    assert run(pipe).steps == COMMON["num_inference_steps"]


def test_model_and_sequential_offload(folder):
    pipe = rectiflux.load(folder)
    plain = run(pipe).images
    with pytest.warns(UserWarning, match="no CUDA device"):
        pipe.enable_model_cpu_offload()  # on a machine without CUDA: a no-op
    assert pipe._offload is None
    np.testing.assert_array_equal(run(pipe).images, plain)
    pipe.enable_model_cpu_offload(device="cpu")  # the mechanism, on the device there is
    np.testing.assert_array_equal(run(pipe).images, plain)
    sequential = rectiflux.load(folder)
    sequential.enable_sequential_cpu_offload(device="cpu")
    moved = []
    hooks = sequential.transformer.block_weights
    before = hooks.before
    hooks.before = lambda name, block, device: moved.append(name) or before(name, block, device)
    np.testing.assert_array_equal(run(sequential).images, plain)
    assert {"double_blocks.0", "single_blocks.1"} <= set(moved)


def test_vae_tiling_matches_diffusers_and_bounds_the_tiles(folder, pipe, ref):
    ours = rectiflux.load(folder)
    ours.enable_vae_tiling()
    ref.vae.enable_tiling()
    try:
        kwargs = {**COMMON, "height": 64, "width": 80}  # the tiny VAE's tiles are 32 pixels: 3 x 4 of them
        seen = []
        handle = ours.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2:]))
        got = ours(prompt=PROMPT, generator=generators(0), **kwargs).images
        handle.remove()
        assert_close(got, ref(prompt=PROMPT, generator=generators(0), **kwargs).images)
        assert len(seen) == 12 and max(max(s) for s in seen) <= ours.vae.tile_latent_min_size
        whole = run(pipe, height=64, width=80).images
        assert np.abs(got - whole).mean() < 0.05  # blended tiles stay close to the whole image
        ours.enable_vae_slicing()
        batch = ours(prompt=[PROMPT, PROMPT], generator=generators([0, 1]), **kwargs).images
        assert_close(batch[0], got[0])
    finally:
        ref.vae.disable_tiling()


def test_attention_slicing_is_accepted(pipe):
    plain = run(pipe).images
    pipe.enable_attention_slicing()
    pipe.disable_attention_slicing()
    np.testing.assert_array_equal(run(pipe).images, plain)


BAD = [
    pytest.param({"prompt": []}, "empty list", id="no-prompts"),
    pytest.param({"width": 0}, "width", id="width-0"),
    pytest.param({"height": 32.0}, "height", id="height-float"),
    pytest.param({"guidance_scale": float("nan")}, "guidance_scale must be a finite", id="nan-guidance"),
    pytest.param({"guidance_scale": float("inf")}, "guidance_scale must be a finite", id="inf-guidance"),
    pytest.param({"true_cfg_scale": float("nan"), "negative_prompt": "x"}, "true_cfg_scale", id="nan-cfg"),
    pytest.param({"image": picture(W, H), "strength": float("nan")}, "strength", id="nan-strength"),
    pytest.param({"sigmas": [1.0, float("nan"), 0.5]}, "sigmas", id="nan-sigmas"),
    pytest.param({"cache_threshold": float("nan")}, "cache_threshold", id="nan-cache"),
    pytest.param({"prompt": "a red \udcff circle"}, "not valid text", id="lone-surrogate"),
    pytest.param({"callback_on_step_end_tensor_inputs": ["latents", "noise_pred"]}, "has to be in",
                 id="callback-inputs"),
    pytest.param({"joint_attention_kwargs": {"ip_adapter": 1}}, "joint_attention_kwargs", id="attention-kwargs"),
    pytest.param({"control_image": picture(W, H)}, "Control model", id="control-image-on-dev"),
]


@pytest.mark.parametrize(("bad", "word"), BAD)
def test_bad_input_is_one_line_before_any_model_runs(pipe, bad, word):
    kwargs = {**COMMON, "prompt": PROMPT, "generator": generators(0), **bad}
    with watch_models(pipe) as calls, pytest.raises(ValueError) as e:
        pipe(**kwargs)
    assert word in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert calls == []


def test_nan_during_sampling_names_the_step(pipe):
    def poison(pipeline, step, timestep, tensors):
        return {"latents": tensors["latents"] * math.nan} if step == 0 else {}

    with pytest.raises(NonFiniteLatents, match="at step 2 of 3") as e:
        run(pipe, callback_on_step_end=poison)
    assert "\n" not in str(e.value)


def test_an_empty_mask_returns_the_source_untouched(pipe):
    source = picture(W, H)
    for empty in (Image.new("L", (W, H)), Image.new("RGBA", (W, H), (255, 255, 255, 0))):  # black, transparent
        with watch_models(pipe) as calls, pytest.warns(UserWarning, match="nothing will be repainted"):
            out = pipe(prompt=PROMPT, image=source, mask_image=empty, **COMMON)
        assert calls == []
        np.testing.assert_array_equal(np.round(out.images[0] * 255), np.asarray(source))


def test_transparent_parts_of_a_mask_are_kept(pipe):
    source, mask = picture(W, H), grey_mask(W, H)
    rgba = Image.merge("RGBA", [mask.point(lambda v: 255)] * 3 + [mask])  # white, painted by its alpha
    np.testing.assert_array_equal(run(pipe, image=source, mask_image=rgba).images,
                                  run(pipe, image=source, mask_image=mask).images)


def test_sixteen_bit_sources_and_masks_are_scaled_not_clipped(pipe):
    source, mask = picture(W, H), grey_mask(W, H)
    deep_mask = Image.fromarray(np.asarray(mask, dtype=np.uint16) * 257).convert("I;16")
    deep_source = (np.asarray(source, dtype=np.uint16) * 257).astype(np.uint16)
    np.testing.assert_array_equal(run(pipe, image=deep_source, mask_image=deep_mask).images,
                                  run(pipe, image=source, mask_image=mask).images)


def test_shapes_model_warns_once_outside_what_it_knows():
    pipe = rectiflux.load("shapes")
    with pytest.warns(ModelRangeWarning) as caught:
        pipe("a large red cat on the left", width=128, height=64, num_inference_steps=1, output_type="latent")
    messages = [str(w.message) for w in caught]
    assert any("trained on 64x64 images only" in m and "128x64" in m for m in messages)
    assert any("'cat'" in m for m in messages) and not any("'red'" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        pipe("a large red cat on the left", width=128, height=64, num_inference_steps=1, output_type="latent")
        pipe("a large red circle on the left", num_inference_steps=1, output_type="latent")
