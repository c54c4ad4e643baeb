"""A diffusers script runs unchanged on rectiflux except for its import, and makes the same images."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from PIL import Image
from tiny_models import make_tiny_flux_folder

SCRIPT = textwrap.dedent('''
    import torch
    {import_line}

    pipe = FluxPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe = pipe.to("cpu")
    pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()  # the tiny VAE's tiles are 32 pixels: this decodes 32x48 in blended tiles
    pipe.enable_attention_slicing()
    parts = sorted(pipe.components)

    prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(
        prompt="a large red circle on the left on a white background", prompt_2=None, num_images_per_prompt=2,
        max_sequence_length=32)

    def stop_after_two_steps(pipeline, step, timestep, callback_kwargs):
        if step == 1:
            pipeline._interrupt = True
        return callback_kwargs

    images = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, height=32, width=48,
                  num_inference_steps=4, guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(0),
                  callback_on_step_end=stop_after_two_steps, callback_on_step_end_tensor_inputs=["latents"],
                  return_dict=False)[0]
    full = pipe("a small blue square at the top", height=48, width=32, num_inference_steps=3, guidance_scale=3.5,
                max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(1)).images[0]
    for i, image in enumerate([*images, full]):
        image.save(f"{{OUT}}/out-{{i}}.png")
''')


def run(import_line: str, model, out) -> dict:
    scope = {"MODEL": str(model), "OUT": str(out)}
    exec(compile(SCRIPT.format(import_line=import_line), "script.py", "exec"), scope)  # noqa: S102
    return scope


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("script") / "dev")


def test_the_same_script_makes_the_same_images(model, tmp_path):
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "rectiflux").mkdir()
    theirs = run("from diffusers import FluxPipeline", model, tmp_path / "diffusers")
    ours = run("from rectiflux import FluxPipeline", model, tmp_path / "rectiflux")
    assert ours["parts"] == theirs["parts"]
    assert ours["text_ids"].shape == theirs["text_ids"].shape
    assert (ours["prompt_embeds"] - theirs["prompt_embeds"]).abs().max() < 1e-5
    names = sorted(p.name for p in (tmp_path / "diffusers").iterdir())
    assert names == ["out-0.png", "out-1.png", "out-2.png"]
    for name in names:
        a = np.asarray(Image.open(tmp_path / "rectiflux" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "diffusers" / name), dtype=np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
