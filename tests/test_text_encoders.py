"""TextEncoders against diffusers' FluxPipeline.encode_prompt, on a tiny random FLUX folder."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from tiny_models import make_tiny_flux_folder

from rectiflux.weights.checkpoint import CheckpointError
from rectiflux.weights.text_encoders import load_text_encoders

CAPTION = "a large red circle on the left on a white background"
OTHER = "a small blue square at the top on a black background"
# ~110 CLIP tokens but well under the T5 length used below.
LONG = " ".join([CAPTION, OTHER] * 5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="module")
def ours(folder):
    return load_text_encoders(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    return FluxPipeline.from_pretrained(folder, local_files_only=True)


def reference(pipe, prompt, prompt_2=None, n=1, length=64):
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device="cpu", num_images_per_prompt=n, max_sequence_length=length
        )
    return embeds, pooled


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_tiny_folder_is_a_working_flux_pipeline(folder, pipe):
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
        "transformer", "vae",
    ]
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.transformer.config.guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 3.0
    image = pipe(
        CAPTION, height=32, width=48, num_inference_steps=2, max_sequence_length=32,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert image.shape == (1, 32, 48, 3) and np.isfinite(image).all() and image.std() > 0


def test_shapes_world_words_are_whole_tokens(pipe):
    words = CAPTION.split() + "small blue square at top bottom right center in black gray".split()
    text = " ".join(words)
    assert pipe.tokenizer.tokenize(text) == [w + "</w>" for w in words]
    assert pipe.tokenizer_2.tokenize(text) == ["▁" + w for w in words]
    # Anything else is spelled out from characters rather than lost to <unk>.
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer("Zebra 42, xyzzy!", add_special_tokens=False).input_ids
    assert pipe.tokenizer_2.unk_token_id not in pipe.tokenizer_2("Zebra 42, xyzzy!").input_ids


def test_single_prompt(ours, pipe):
    got = ours.encode(CAPTION, max_sequence_length=64)
    assert got[0].shape == (1, 64, 32) and got[1].shape == (1, 32)
    assert_same(got, reference(pipe, CAPTION))


def test_batch_of_two(ours, pipe):
    got = ours.encode([CAPTION, OTHER], max_sequence_length=64)
    assert_same(got, reference(pipe, [CAPTION, OTHER]))
    # The two prompts really are encoded differently, so the comparison above means something.
    assert not torch.allclose(got[0][0], got[0][1]) and not torch.allclose(got[1][0], got[1][1])


def test_prompt_2_goes_to_t5_only(ours, pipe):
    got = ours.encode(CAPTION, prompt_2=OTHER, max_sequence_length=64)
    assert_same(got, reference(pipe, CAPTION, prompt_2=OTHER))
    clip_only, t5_only = ours.encode(CAPTION, max_sequence_length=64), ours.encode(OTHER, max_sequence_length=64)
    assert torch.equal(got[1], clip_only[1]) and torch.equal(got[0], t5_only[0])


def test_num_images_per_prompt_repeats_each_prompt_in_turn(ours, pipe):
    got = ours.encode([CAPTION, OTHER], num_images_per_prompt=2, max_sequence_length=64)
    assert got[0].shape[0] == got[1].shape[0] == 4
    assert_same(got, reference(pipe, [CAPTION, OTHER], n=2))
    assert torch.equal(got[0][0], got[0][1]) and not torch.equal(got[0][1], got[0][2])


def test_long_prompt_is_truncated_silently_for_clip(ours, pipe):
    assert len(pipe.tokenizer(LONG).input_ids) > 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ours.encode(LONG, max_sequence_length=128)
    assert_same(got, reference(pipe, LONG, length=128))


def test_prompt_of_exactly_max_length_fits(ours, pipe):
    length = len(pipe.tokenizer_2(CAPTION).input_ids)  # counts the closing </s>
    assert_same(ours.encode(CAPTION, max_sequence_length=length), reference(pipe, CAPTION, length=length))


def test_too_long_for_t5_is_an_error(ours, pipe):
    n = len(pipe.tokenizer_2(LONG).input_ids)
    message = f"prompt is {n} T5 tokens, longer than max_sequence_length 64; shorten it or raise --max-sequence-length"
    with pytest.raises(ValueError, match=message):
        ours.encode(LONG, max_sequence_length=64)
    with pytest.raises(ValueError, match="prompt_2 1 is"):
        ours.encode([CAPTION, CAPTION], prompt_2=[OTHER, LONG], max_sequence_length=64)
    with pytest.raises(ValueError, match="max_sequence_length must be between 1 and 512"):
        ours.encode(CAPTION, max_sequence_length=513)


def test_dtype_argument(folder):
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.bfloat16)
    got = load_text_encoders(folder, dtype="bfloat16").encode([CAPTION, OTHER], max_sequence_length=64)
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert_same(got, reference(pipe, [CAPTION, OTHER]))


@pytest.mark.parametrize("name", ["text_encoder", "tokenizer_2"])
def test_missing_subfolder_is_named(folder, tmp_path, name):
    broken = tmp_path / "flux"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / name)
    with pytest.raises(CheckpointError, match=f"has no {name} subfolder"):
        load_text_encoders(broken)


# ---------------------------------------------------------------------------------------------------------------
# our CLIP and T5 against transformers' models directly, in the variants real checkpoints come in

def _save_clip(tmp_path, eos_token_id: int, legacy_prefix: bool, dtype: torch.dtype):
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    ref = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=20, hidden_act="quick_gelu",
                                       eos_token_id=eos_token_id, bos_token_id=48, pad_token_id=49)).eval()
    ref.config.save_pretrained(tmp_path)
    prefix = "text_model." if legacy_prefix else ""
    state = {prefix + k: v.to(dtype).contiguous() for k, v in ref.state_dict().items()}
    if legacy_prefix:  # transformers 4.x saved the constant position ids too
        state["text_model.embeddings.position_ids"] = torch.arange(20)[None]
    save_file(state, tmp_path / "model.safetensors")
    return ref.to(dtype)


@pytest.mark.parametrize(("eos_token_id", "legacy_prefix", "dtype"),
                         [(47, False, torch.float32), (2, True, torch.float32), (47, True, torch.bfloat16)])
def test_clip_matches_transformers(tmp_path, eos_token_id, legacy_prefix, dtype):
    from rectiflux.weights.text_encoders import load_clip

    ref = _save_clip(tmp_path, eos_token_id, legacy_prefix, dtype)
    ids = torch.tensor([[48, 5, 9, 47, 49, 49, 49], [48, 30, 3, 7, 12, 47, 49]])
    ours = load_clip(tmp_path)
    assert ours.dtype == dtype
    with torch.no_grad():
        hidden, pooled = ours(ids)
        want = ref(ids)
    torch.testing.assert_close(hidden, want.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=0, atol=1e-6)
    # the pooled row is the end-of-text token's (eos id 47), or the largest id's in the legacy config (pad 49)
    end = [3, 5] if eos_token_id == 47 else [4, 6]
    assert torch.equal(pooled, hidden[[0, 1], end])


@pytest.mark.parametrize(("proj", "dtype"), [("gated-gelu", torch.float16), ("gated-gelu", torch.bfloat16),
                                             ("relu", torch.float32)])
def test_t5_matches_transformers(tmp_path, proj, dtype):
    from transformers import T5Config, T5EncoderModel

    from rectiflux.weights.text_encoders import load_t5

    torch.manual_seed(0)
    ref = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                  feed_forward_proj=proj)).eval()
    ref.save_pretrained(tmp_path)  # float32 on disk; both sides cast at load
    ref = T5EncoderModel.from_pretrained(tmp_path, dtype=dtype, local_files_only=True).eval()
    ours = load_t5(tmp_path, dtype)
    # transformers keeps T5's output projections in float32 for float16 (only): so do we
    assert ours.blocks[0].wo.weight.dtype == ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert ours.blocks[0].wo.weight.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    ids = torch.randint(0, 40, (2, 30))  # longer than max_distance: the log-spaced and the last bucket are used
    with torch.no_grad():
        got, want = ours(ids), ref(ids).last_hidden_state
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_unknown_text_encoder_activation_is_refused(tmp_path):
    from rectiflux.weights.text_encoders import load_clip

    _save_clip(tmp_path, 47, False, torch.float32)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"quick_gelu"', '"swish-ish"'))
    with pytest.raises(CheckpointError, match="activation 'swish-ish' is not supported"):
        load_clip(tmp_path)
