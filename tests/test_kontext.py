"""FLUX.1-Kontext against diffusers' FluxKontextPipeline on tiny random models: the reference image's tokens
appended with first RoPE coordinate 1, its resize, true CFG, batches, and how the kind is told apart from dev."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import FluxKontextPipeline
from PIL import Image
from test_pipeline import ATOL, assert_close, assert_differ, generators, picture
from tiny_models import make_tiny_flux_folder

from rectiflux.pipelines.kontext import PREFERRED_RESOLUTIONS, capped, reference_size
from rectiflux.pipelines.load import load
from rectiflux.weights.transformer import load_transformer, save_transformer

H, W = 32, 48
COMMON = {"num_inference_steps": 3, "guidance_scale": 2.5, "max_sequence_length": 32, "output_type": "np",
          "_auto_resize": False}
PROMPT = "make the circle blue"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("kontext") / "kontext", variant="kontext")


@pytest.fixture(scope="module")
def ours(folder):
    return load(folder)


@pytest.fixture(scope="module")
def ref(folder):
    pipe = FluxKontextPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def both(ours, ref, seeds=0, **kwargs):
    kwargs = {**COMMON, "prompt": PROMPT, **kwargs}
    height, width = kwargs.get("height", H), kwargs.get("width", W)
    got = ours(generator=generators(seeds), **kwargs).images
    # diffusers scales every output to max_area; at the size asked for it keeps it
    want = ref(generator=generators(seeds), max_area=height * width, **kwargs).images
    return got, want


def test_kind_from_the_pipeline_class_and_defaults(ours):
    assert ours.kind == "kontext" and ours.defaults.guidance == 2.5


@pytest.mark.parametrize("reference", [(40, 24), (20, 36)], ids=["wide-reference", "tall-reference"])
def test_reference_of_another_size_and_shape(ours, ref, reference):
    got, want = both(ours, ref, image=picture(*reference), height=H, width=W)
    assert got.shape == (1, H, W, 3)
    assert_close(got, want)
    other = ours(generator=generators(0), image=Image.new("RGB", reference, (255, 255, 255)), prompt=PROMPT,
                 height=H, width=W, **{**COMMON, "output_type": "latent"}).images
    plain = ours(generator=generators(0), image=picture(*reference), prompt=PROMPT, height=H, width=W,
                 **{**COMMON, "output_type": "latent"}).images
    assert_differ(plain, other)  # the reference is read


def test_true_cfg(ours, ref):
    got, want = both(ours, ref, image=picture(40, 24), negative_prompt="a black cross", true_cfg_scale=3.0,
                     height=H, width=W)
    assert_close(got, want)
    plain, _ = both(ours, ref, image=picture(40, 24), height=H, width=W)
    assert_differ(got, plain)


@pytest.mark.parametrize("seeds", [5, [1, 2, 3, 4]], ids=["one-generator", "generator-list"])
def test_batch_and_images_per_prompt(ours, ref, seeds):
    got, want = both(ours, ref, seeds, image=picture(40, 24), prompt=[PROMPT, "make it green"],
                     num_images_per_prompt=2, height=W, width=H)
    assert got.shape == (4, W, H, 3)
    assert_close(got, want)


def test_auto_resize_picks_the_preferred_resolution():
    assert reference_size(1000, 1000, 16, True) == (1024, 1024)
    assert reference_size(1920, 1080, 16, True) == (1392, 752)  # the nearest aspect ratio of the list
    assert reference_size(1919, 1081, 16, False) == (1904, 1072)  # else only floored to a multiple of 16
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in PREFERRED_RESOLUTIONS)
    assert capped(2048, 1024, 1024 ** 2, 16) == (1440, 720) and capped(512, 512, 1024 ** 2, 16) == (512, 512)


def test_output_takes_the_reference_size_unless_given(ours):
    out = ours(prompt=PROMPT, image=picture(40, 24), seed=0, **{**COMMON, "num_inference_steps": 1}).images
    assert out.shape == (1, 24, 40, 3)
    out = ours(prompt=PROMPT, image=picture(40, 24), seed=0, max_area=480,
               **{**COMMON, "num_inference_steps": 1}).images
    assert out.shape == (1, 16, 28, 3)  # 960 pixels scaled to 480 at 5:3, floored to multiples of 4


def test_kind_of_a_bfl_file_from_its_name_or_the_kind_argument(folder, ours, tmp_path):
    file = tmp_path / "flux1-kontext-dev.safetensors"
    save_transformer(load_transformer(folder / "transformer"), file, layout="bfl")
    from_file = load(file, vae=folder / "vae", text_encoders=folder)
    assert from_file.kind == "kontext"
    kwargs = {**COMMON, "prompt": PROMPT, "image": picture(40, 24), "height": H, "width": W}
    np.testing.assert_allclose(from_file(seed=2, **kwargs).images, ours(seed=2, **kwargs).images, atol=ATOL)
    plain = tmp_path / "weights.safetensors"
    file.rename(plain)
    assert load(plain, vae=folder / "vae", text_encoders=folder).kind == "flux"  # dev's keys: dev
    assert load(plain, vae=folder / "vae", text_encoders=folder, kind="kontext").kind == "kontext"
    with pytest.raises(ValueError, match="kind 'fill' needs in_channels 144"):
        load(plain, vae=folder / "vae", text_encoders=folder, kind="fill")


def test_missing_reference_is_one_line(ours):
    with pytest.raises(ValueError, match="image to edit") as e:
        ours(prompt=PROMPT, height=H, width=W, **COMMON)
    assert "\n" not in str(e.value)
