"""FLUX.1-Canny/Depth (Control) against diffusers' FluxControlPipeline on tiny random models: the control image
encoded and concatenated on channels, batches, and the BFL file of the same weights."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import FluxControlPipeline
from PIL import Image
from test_pipeline import ATOL, assert_close, assert_differ, generators, picture
from tiny_models import make_tiny_flux_folder

from rectiflux import images
from rectiflux.pipelines.load import load
from rectiflux.weights.transformer import load_transformer, save_transformer

H, W = 32, 48
COMMON = {"num_inference_steps": 3, "guidance_scale": 10.0, "max_sequence_length": 32, "output_type": "np"}
PROMPT = "a large red circle on the left on a white background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("control") / "depth", variant="control")


@pytest.fixture(scope="module")
def ours(folder):
    return load(folder)


@pytest.fixture(scope="module")
def ref(folder):
    pipe = FluxControlPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edges(width: int, height: int) -> Image.Image:
    m = np.zeros((height, width, 3), dtype=np.uint8)
    m[height // 4, :] = m[:, width // 3] = 255
    return Image.fromarray(m)


def test_kind_and_defaults(ours):
    assert ours.kind == "control" and ours.transformer.config.in_channels == 128
    assert (ours.defaults.steps, ours.defaults.guidance) == (30, 10.0)  # "depth" in its name: BFL's Depth advice


@pytest.mark.parametrize(("height", "width"), [(H, W), (W, H)], ids=["wide", "tall"])
def test_matches_diffusers(ours, ref, height, width):
    kwargs = {**COMMON, "prompt": PROMPT, "control_image": edges(width, height), "height": height, "width": width}
    got = ours(generator=generators(0), **kwargs).images
    assert_close(got, ref(generator=generators(0), **kwargs).images)
    other = ours(generator=generators(0), **{**kwargs, "control_image": picture(width, height)}).images
    assert_differ(got, other)  # the control image is read


@pytest.mark.parametrize("seeds", [7, [1, 2, 3, 4]], ids=["one-generator", "generator-list"])
def test_batch_and_images_per_prompt(ours, ref, seeds):
    kwargs = {**COMMON, "prompt": [PROMPT, "a small blue square at the top"], "control_image": edges(W, H),
              "height": H, "width": W, "num_images_per_prompt": 2}
    got = ours(generator=generators(seeds), **kwargs).images
    assert got.shape == (4, H, W, 3)
    assert_close(got, ref(generator=generators(seeds), **kwargs).images)


def test_size_defaults_to_the_control_image(ours):
    out = ours(prompt=PROMPT, control_image=edges(40, 24), seed=1, **{**COMMON, "num_inference_steps": 1}).images
    assert out.shape == (1, 24, 40, 3)


def test_bfl_file_loads_and_agrees_with_the_folder(folder, ours, tmp_path):
    bfl = tmp_path / "flux1-canny-dev.safetensors"
    save_transformer(load_transformer(folder / "transformer"), bfl, layout="bfl")
    from_file = load(bfl, vae=folder / "vae", text_encoders=folder)
    assert from_file.kind == "control" and from_file.defaults.guidance == 30.0  # Canny's advice
    kwargs = {**COMMON, "prompt": PROMPT, "control_image": edges(W, H), "height": H, "width": W}
    np.testing.assert_allclose(from_file(seed=2, **kwargs).images, ours(seed=2, **kwargs).images, atol=ATOL)


def test_missing_control_image_and_foreign_inputs(ours):
    with pytest.raises(ValueError, match="control_image") as e:
        ours(prompt=PROMPT, **COMMON)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="image does not apply to a Control model"):
        ours(prompt=PROMPT, control_image=edges(W, H), image=picture(W, H), mask_image=edges(W, H), **COMMON)


def test_canny_makes_an_edge_map():
    pytest.importorskip("cv2", reason="the optional OpenCV extra (rectiflux[control]) is not installed")
    square = np.zeros((32, 32, 3), dtype=np.uint8)
    square[8:24, 8:24] = 255
    edge_map = np.asarray(images.canny(Image.fromarray(square)))
    assert edge_map.shape == (32, 32, 3) and set(np.unique(edge_map)) == {0, 255}
    assert edge_map[16, 16].max() == 0 and edge_map[2, 2].max() == 0  # inside and outside the square: no edge
    assert edge_map[8:24, 7:9].max() == 255  # its left side is one
