"""FLUX.1-Redux against diffusers' FluxPriorReduxPipeline on tiny random models, and a FLUX pipeline fed with its
embeddings against diffusers' FluxPipeline fed with diffusers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxPriorReduxPipeline
from test_pipeline import assert_close, picture
from tiny_models import make_tiny_flux_folder, make_tiny_redux_folder

from rectiflux.pipelines.load import load
from rectiflux.pipelines.redux import load_projector, load_redux
from rectiflux.weights.checkpoint import CheckpointError, save_state_dict

H, W = 32, 48
COMMON = {"height": H, "width": W, "num_inference_steps": 3, "guidance_scale": 3.5, "output_type": "np"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("redux")
    return make_tiny_flux_folder(root / "dev"), make_tiny_redux_folder(root / "redux")


@pytest.fixture(scope="module")
def pipes(folders):
    flux, redux = folders
    ours = load(flux)
    ref = FluxPipeline.from_pretrained(flux, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    prior = load_redux(redux, text_encoders=ours.text_encoders)
    ref_prior = FluxPriorReduxPipeline.from_pretrained(
        redux, local_files_only=True, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
        text_encoder_2=ref.text_encoder_2, tokenizer_2=ref.tokenizer_2)
    return ours, ref, prior, ref_prior


def test_prior_without_a_prompt_matches_diffusers(folders):
    _, redux = folders
    prior, ref_prior = load_redux(redux), FluxPriorReduxPipeline.from_pretrained(redux, local_files_only=True)
    got = prior(picture(40, 24))
    # without text encoders diffusers pads with FLUX.1's own widths; the tiny models' are narrower, so compare the
    # image part and the zero text part separately
    features = ref_prior.image_encoder(**ref_prior.feature_extractor(images=picture(40, 24), return_tensors="pt"))
    want = ref_prior.image_embedder(features.last_hidden_state).image_embeds
    assert got.prompt_embeds.shape == (1, 512 + want.shape[1], 32) and got.pooled_prompt_embeds.shape == (1, 768)
    assert torch.equal(got.prompt_embeds[:, :512], torch.zeros(1, 512, 32))
    assert (got.prompt_embeds[:, 512:] - want).abs().max() < 1e-5


@pytest.mark.parametrize("scales", [(1.0, 1.0), ([0.7, 0.3], [0.2, 1.0])], ids=["plain", "weighted"])
def test_prior_with_prompts_and_images_matches_diffusers(pipes, scales):
    _, _, prior, ref_prior = pipes
    images, prompts = [picture(40, 24), picture(24, 40, seed=2)], ["a red circle", "a blue square"]
    kwargs = {"prompt_embeds_scale": scales[0], "pooled_prompt_embeds_scale": scales[1]}
    got = prior(images, prompt=prompts, **kwargs)
    want = ref_prior(images, prompt=prompts, **kwargs)
    assert got.prompt_embeds.shape == want.prompt_embeds.shape
    assert (got.prompt_embeds - want.prompt_embeds).abs().max() < 1e-5
    assert (got.pooled_prompt_embeds - want.pooled_prompt_embeds).abs().max() < 1e-5


def test_flux_pipeline_fed_with_the_embeddings(pipes):
    ours, ref, prior, ref_prior = pipes
    got = prior(picture(40, 24), prompt="a red circle")
    want = ref_prior(picture(40, 24), prompt="a red circle")
    images = ours(prompt_embeds=got.prompt_embeds, pooled_prompt_embeds=got.pooled_prompt_embeds, seed=3,
                  **COMMON).images
    ref_images = ref(prompt_embeds=want.prompt_embeds, pooled_prompt_embeds=want.pooled_prompt_embeds,
                     generator=torch.Generator().manual_seed(3), **COMMON).images
    assert_close(images, ref_images)


def test_bfl_projector_file(folders, tmp_path):
    _, redux = folders
    from safetensors.torch import load_file

    state = load_file(redux / "image_embedder" / "diffusion_pytorch_model.safetensors")
    save_state_dict(state, tmp_path / "flux1-redux-dev.safetensors")
    prior = load_redux(tmp_path / "flux1-redux-dev.safetensors", siglip=redux / "image_encoder")
    folder_prior = load_redux(redux)
    np.testing.assert_array_equal(prior(picture(32, 32)).prompt_embeds, folder_prior(picture(32, 32)).prompt_embeds)
    with pytest.raises(CheckpointError, match="siglip="):
        load_redux(tmp_path / "flux1-redux-dev.safetensors")
    save_state_dict({"x.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a FLUX.1-Redux projector"):
        load_projector(tmp_path / "other.safetensors", None)


def test_scales_must_match_the_images(folders):
    _, redux = folders
    with pytest.raises(ValueError, match="2 weights for 1 images"):
        load_redux(redux)(picture(32, 32), prompt_embeds_scale=[1.0, 0.5])
