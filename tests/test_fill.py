"""FLUX.1-Fill against diffusers' FluxFillPipeline on tiny random models: the masked image and the folded pixel mask
concatenated on channels at every step, strength, batches, and the BFL file of the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from test_pipeline import ATOL, assert_close, assert_differ, generators, grey_mask, picture
from tiny_models import make_tiny_flux_folder

from rectiflux.pipelines.fill import mask_channels
from rectiflux.pipelines.load import load
from rectiflux.weights.transformer import load_transformer, save_transformer

H, W = 32, 48
COMMON = {"num_inference_steps": 3, "guidance_scale": 30.0, "max_sequence_length": 32, "output_type": "np"}
PROMPT = "a large red circle on the left on a white background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("fill") / "fill", variant="fill")


@pytest.fixture(scope="module")
def ours(folder):
    return load(folder)


@pytest.fixture(scope="module")
def ref(folder):
    pipe = FluxFillPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_kind_and_defaults_are_fills(ours):
    assert ours.kind == "fill" and ours.transformer.config.in_channels == 144  # 64 + 64 + 4 * 2^2 for a 2x VAE
    assert (ours.defaults.steps, ours.defaults.guidance) == (50, 30.0)  # FluxFillPipeline's


@pytest.mark.parametrize(("height", "width"), [(H, W), (W, H)], ids=["wide", "tall"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_matches_diffusers(ours, ref, height, width, strength):
    image, mask = picture(width, height), grey_mask(width, height)
    kwargs = {**COMMON, "prompt": PROMPT, "image": image, "mask_image": mask, "height": height, "width": width,
              "strength": strength}
    got = ours(generator=generators(0), **kwargs).images
    want = ref(generator=generators(0), **kwargs).images
    assert got.shape == (1, height, width, 3)
    assert_close(got, want)


def test_batch_images_per_prompt_and_generator_list(ours, ref):
    kwargs = {**COMMON, "prompt": [PROMPT, "a small blue square at the top"], "image": picture(W, H),
              "mask_image": grey_mask(W, H), "height": H, "width": W, "num_images_per_prompt": 2, "strength": 0.8}
    got = ours(generator=generators([1, 2, 3, 4]), **kwargs).images
    want = ref(generator=generators([1, 2, 3, 4]), **kwargs).images
    assert got.shape == (4, H, W, 3)
    assert_close(got, want)
    assert_differ(got[0], got[1])


def test_the_mask_and_the_masked_image_are_read(ours, ref):
    image, mask = picture(W, H), grey_mask(W, H)
    base = {**COMMON, "prompt": PROMPT, "image": image, "height": H, "width": W}
    one = ours(generator=generators(0), mask_image=mask, **base).images
    inverted = ours(generator=generators(0), mask_image=mask.point(lambda v: 255 - v), **base).images
    assert_differ(one, inverted)
    # masked_image_latents: the conditioning diffusers builds inside its call (recorded there), given to ours
    recorded, build = [], ref.prepare_mask_latents

    def recording(*args, **kwargs):
        recorded.append(build(*args, **kwargs))
        return recorded[-1]

    ref.prepare_mask_latents = recording
    try:
        want = ref(generator=generators(0), mask_image=mask, **base).images
    finally:
        del ref.prepare_mask_latents
    mask_tokens, masked_tokens = recorded[0]
    got = ours(generator=generators(0), masked_image_latents=torch.cat([masked_tokens, mask_tokens], dim=-1),
               **base).images
    assert_close(got, want)
    assert_close(ours(generator=generators(0), mask_image=mask, **base).images, want)


def test_mask_channels_fold_each_block_of_pixels_in_order():
    mask = torch.arange(2 * 4 * 8, dtype=torch.float32).reshape(2, 1, 4, 8)
    packed = mask_channels(mask, 2)  # (2, 1 * 2 patches * 2 patches, 4 * 2 * 2)
    assert packed.shape == (2, 2, 16)
    # token 0 holds the top-left 4x4 pixels: channel c * 4 + dy * 2 + dx of the folded 2x2-block channels c
    top_left = mask[0, 0, :4, :4]
    expected = [top_left[2 * py + dy, 2 * px + dx] for c_dy in range(2) for c_dx in range(2)
                for dy, dx, py, px in [(c_dy, c_dx, 0, 0), (c_dy, c_dx, 0, 1), (c_dy, c_dx, 1, 0), (c_dy, c_dx, 1, 1)]]
    assert packed[0, 0].tolist() == [float(v) for v in expected]


def test_bfl_file_loads_and_agrees_with_the_folder(folder, ours, tmp_path):
    bfl = tmp_path / "flux1-fill-dev.safetensors"
    save_transformer(load_transformer(folder / "transformer"), bfl, layout="bfl")
    from_file = load(bfl, vae=folder / "vae", text_encoders=folder)
    assert from_file.kind == "fill"
    kwargs = {**COMMON, "prompt": PROMPT, "image": picture(W, H), "mask_image": grey_mask(W, H), "height": H,
              "width": W, "num_inference_steps": 2}
    np.testing.assert_allclose(from_file(seed=4, **kwargs).images, ours(seed=4, **kwargs).images, atol=ATOL)


@pytest.mark.parametrize(("bad", "word"), [({"mask_image": None}, "mask_image"),
                                           ({"image": None}, "image"),
                                           ({"control_image": picture(W, H)}, "control_image")])
def test_missing_or_foreign_inputs_are_one_line_errors(ours, bad, word):
    kwargs = {**COMMON, "prompt": PROMPT, "image": picture(W, H), "mask_image": grey_mask(W, H), **bad}
    with pytest.raises(ValueError, match=word) as e:
        ours(**kwargs)
    assert "\n" not in str(e.value)
