"""Files as ComfyUI users have them: single-file CLIP and T5 (prefixed or not, fp16, fp8, scaled fp8), an autoencoder
inside a bigger file, all-in-one checkpoints and a ComfyUI models/ tree, through the loaders, `rectiflux.load` and
the command line."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_flux_folder
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from rectiflux.flux.autoencoder import AutoEncoder
from rectiflux.pipelines.load import load
from rectiflux.quantize.gguf import GGMLType, quantize_to_raw, write_gguf
from rectiflux.weights.autoencoder import load_autoencoder
from rectiflux.weights.bundles import find_models
from rectiflux.weights.checkpoint import CheckpointError
from rectiflux.weights.text_encoders import load_clip, load_t5
from rectiflux.weights.transformer import load_transformer, save_transformer

E4M3 = torch.float8_e4m3fn
COMFY_CLIP = "text_encoders.clip_l.transformer."
COMFY_T5 = "text_encoders.t5xxl.transformer."


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# single-file text encoders against transformers, from the same (dequantised) weights

def tiny_clip() -> CLIPTextModel:
    torch.manual_seed(0)  # 2 heads of 64: the head count of a single file is its width / 64
    return CLIPTextModel(CLIPTextConfig(vocab_size=60, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=20, hidden_act="quick_gelu",
                                        bos_token_id=58, eos_token_id=2, pad_token_id=59)).eval()


def tiny_t5(proj: str = "gated-gelu") -> T5EncoderModel:
    torch.manual_seed(1)
    return T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=3,
                                   relative_attention_num_buckets=8, feed_forward_proj=proj)).eval()


def transformers_names(model) -> dict[str, torch.Tensor]:
    """The state dict as transformers 4.x (and so every ComfyUI file) names it: CLIP under `text_model.`."""
    prefix = "text_model." if isinstance(model, CLIPTextModel) else ""
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def scaled_fp8(state: dict[str, torch.Tensor], suffix: str = ".scale_weight") -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8: each linear weight / its scale in float8_e4m3fn, the scale beside it, norms and
    embeddings as they were, and the marker tensor."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2 and "embed" not in key and "shared" not in key \
                and "relative_attention_bias" not in key:
            scale = value.abs().amax().float() / 448
            out[key] = (value / scale).to(E4M3)
            out[key[: -len(".weight")] + suffix] = scale.reshape(())
            if suffix == ".scale_weight":
                out[key[: -len(".weight")] + ".scale_input"] = torch.ones(())
            else:  # the newer format records each layer's format
                out[key[: -len(".weight")] + ".comfy_quant"] = torch.tensor(
                    list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
        else:
            out[key] = value.half()
    if suffix == ".scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return out


def dequantised(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the file means, in float32: fp8 weights times their scales, markers dropped."""
    out = {}
    for key, value in stored.items():
        if key.endswith((".scale_weight", ".scale_input", ".weight_scale", ".comfy_quant", "scaled_fp8")):
            continue
        value = value.float()
        for suffix in (".scale_weight", ".weight_scale"):
            scale = key[: -len(".weight")] + suffix
            if scale in stored:
                value = value * stored[scale].float()
        out[key] = value
    return out


def reference(model, stored: dict[str, torch.Tensor], prefix: str = ""):
    """A transformers model (float32) holding the file's dequantised weights."""
    state = {k[len(prefix):]: v for k, v in dequantised(stored).items() if k.startswith(prefix)}
    if isinstance(model, CLIPTextModel):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    else:
        state = {k if k.startswith(("encoder.", "shared.")) else "encoder." + k: v for k, v in state.items()}
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    ref = type(model)(model.config).eval()
    ref.load_state_dict(state, strict=True)
    return ref


CLIP_IDS = torch.tensor([[58, 5, 9, 59, 1, 1, 1], [58, 30, 3, 7, 12, 59, 1]])  # end-of-text: the largest id


def clip_error(ours, ref) -> float:
    with torch.no_grad():
        hidden, pooled = ours(CLIP_IDS)
        want = ref(CLIP_IDS)
    return max(float((hidden - want.last_hidden_state).abs().max()), float((pooled - want.pooler_output).abs().max()))


def t5_error(ours, ref) -> float:
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((ours(ids) - ref(ids).last_hidden_state).abs().max())


@pytest.mark.parametrize("variant", ["fp16", "bare-fp32", "comfy-bf16-with-projection", "fp8", "scaled-fp8"])
def test_single_file_clip_matches_transformers(tmp_path, variant):
    model = tiny_clip()
    state = transformers_names(model)
    prefix = ""
    if variant == "fp16":  # clip_l.safetensors
        stored = {k: v.half() for k, v in state.items()}
    elif variant == "bare-fp32":  # transformers 5's names: no text_model.
        stored = {k.removeprefix("text_model."): v for k, v in state.items()}
    elif variant == "comfy-bf16-with-projection":  # as a ComfyUI checkpoint nests it, with CLIPModel's extras
        prefix = COMFY_CLIP
        stored = {prefix + k: v.bfloat16() for k, v in state.items()}
        stored[prefix + "text_projection.weight"] = torch.randn(128, 128).bfloat16()
        stored["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6)
    elif variant == "fp8":
        prefix = "transformer."
        stored = {prefix + k: v.to(E4M3) if v.ndim == 2 else v.half() for k, v in state.items()}
    else:
        stored = scaled_fp8(state)
    file = tmp_path / "clip_l.safetensors"
    save_file(stored, file)
    ours = load_clip(file, dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.config.num_heads == 2 and ours.config.num_layers == 2
    ref = reference(model, {k: v for k, v in stored.items() if "projection" not in k and "logit" not in k}, prefix)
    assert clip_error(ours, ref) <= 2e-4
    if variant in ("fp8", "scaled-fp8"):  # no dtype: float8 is computed in bfloat16
        assert load_clip(file).dtype == torch.bfloat16
    elif variant == "fp16":
        assert load_clip(file).dtype == torch.float16


@pytest.mark.parametrize("variant", ["fp16", "fp8", "scaled-fp8", "comfy-bare-scaled", "weight-scale", "relu"])
def test_single_file_t5_matches_transformers(tmp_path, variant):
    model = tiny_t5("relu" if variant == "relu" else "gated-gelu")
    state = transformers_names(model)
    state.pop("encoder.embed_tokens.weight")  # ComfyUI's files keep the tied embedding once, as shared.weight
    prefix = ""
    if variant in ("fp16", "relu"):  # t5xxl_fp16.safetensors
        stored = {k: v.half() for k, v in state.items()}
    elif variant == "fp8":  # t5xxl_fp8_e4m3fn.safetensors: plain casts
        stored = {k: v.to(E4M3) if v.ndim == 2 and "relative" not in k else v.half() for k, v in state.items()}
    elif variant == "scaled-fp8":  # t5xxl_fp8_e4m3fn_scaled.safetensors
        stored = scaled_fp8(state)
    elif variant == "weight-scale":  # ComfyUI's newer per-tensor float8 layout
        stored = scaled_fp8(state, ".weight_scale")
    else:  # inside a checkpoint, and without `encoder.`
        prefix = COMFY_T5
        stored = {prefix + k.removeprefix("encoder."): v for k, v in scaled_fp8(state).items()}
    file = tmp_path / "t5xxl.safetensors"
    save_file(stored, file)
    ours = load_t5(file, dtype=torch.float32)
    cfg = ours.config
    assert (cfg.num_heads, cfg.d_kv, cfg.num_buckets, cfg.num_layers, cfg.gated) == (3, 16, 8, 2, variant != "relu")
    assert t5_error(ours, reference(model, stored, prefix)) <= 2e-4
    if variant == "fp16":  # float16 as stored, the output projections float32 (as transformers keeps them)
        half = load_t5(file)
        assert half.dtype == torch.float16 and half.blocks[0].wo.weight.dtype == torch.float32
    elif variant == "scaled-fp8":
        assert load_t5(file).dtype == torch.bfloat16


def gguf_t5(model, path, types=("Q8_0", "Q4_0", "Q5_1"), architecture="t5encoder", extra=None):
    """A T5 GGUF file as city96's are made: llama.cpp's names (gguf-py's own map from transformers'), the blocks'
    linears and the embedding quantised (by gguf-py, cycling through `types`), the rest in F32. Returns what the file
    means in float32, by transformers' names (gguf-py's dequantiser)."""
    import gguf

    state = {**transformers_names(model), **(extra or {})}
    state.pop("encoder.embed_tokens.weight")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, model.config.num_layers)
    writer = gguf.GGUFWriter(str(path), architecture)
    meant = {}
    for i, (key, value) in enumerate(sorted(state.items())):
        array = value.float().numpy()
        quantised = value.ndim == 2 and "relative_attention_bias" not in key and value.shape[1] % 32 == 0
        qtype = gguf.GGMLQuantizationType[types[i % len(types)]] if quantised else gguf.GGMLQuantizationType.F32
        raw = gguf.quants.quantize(array, qtype) if quantised else array
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight",)), raw, raw_dtype=qtype)
        meant[key] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy()).reshape(value.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return meant


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_gguf_t5_matches_transformers(tmp_path, proj):
    from rectiflux.quantize.gguf import GGUFLinear

    torch.manual_seed(1)  # d_kv x heads a whole number of 32-weight blocks
    model = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                    relative_attention_num_buckets=8, feed_forward_proj=proj)).eval()
    file = tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    meant = gguf_t5(model, file)
    ours = load_t5(file)
    assert ours.dtype == torch.float32 and (ours.config.num_heads, ours.config.d_kv) == (2, 16)
    linears = [m for m in ours.modules() if isinstance(m, GGUFLinear)]
    per_layer = 7 if proj == "gated-gelu" else 6  # q k v o, wi_0 wi_1 (or wi), wo
    assert len(linears) == 2 * per_layer and all(m.weight.dtype == torch.uint8 for m in linears)
    assert t5_error(ours, reference(model, meant)) <= 2e-4
    half = load_t5(file, dtype=torch.float16)  # GGUF's wo computes in float32 there too
    assert t5_error(half, reference(model, meant)) <= 2e-2
    # UMT5 (Wan's) carries a relative attention bias in every layer, and files of other architectures are refused
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().clone()
    gguf_t5(model, tmp_path / "umt5.gguf",
            extra={"encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": bias})
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path / "umt5.gguf")
    assert "is a UMT5 encoder" in one_line(e)
    gguf_t5(model, tmp_path / "llama.gguf", architecture="llama")
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path / "llama.gguf")
    assert "architecture 'llama', not a T5 encoder" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_clip(file)
    assert "is a GGUF file: those are read as FLUX transformers and T5 encoders only" in one_line(e)


def test_single_file_errors_are_one_line(tmp_path):
    clip = tmp_path / "clip.safetensors"
    wide = CLIPTextModel(CLIPTextConfig(vocab_size=30, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=3, max_position_embeddings=8))
    save_file(transformers_names(wide), clip)
    with pytest.raises(CheckpointError) as e:
        load_clip(clip)
    assert "cannot tell the head count" in one_line(e) and "config=" in str(e.value) and str(clip) in str(e.value)
    t5 = tmp_path / "t5.safetensors"
    save_file({k: v for k, v in transformers_names(tiny_t5()).items() if k != "encoder.embed_tokens.weight"}, t5)
    with pytest.raises(CheckpointError) as e:
        load_clip(t5)
    assert f"{t5} holds no CLIP text encoder (it holds: T5 encoder)" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(t5)
    assert "holds no autoencoder" in one_line(e)
    state = load_file(t5)
    state.pop("encoder.block.1.layer.0.SelfAttention.q.weight")
    save_file(state, t5)
    with pytest.raises(CheckpointError) as e:
        load_t5(t5)
    assert "missing blocks.1.q.weight" in one_line(e)


def test_find_models_in_a_comfyui_checkpoint():
    keys = ["model.diffusion_model.img_in.weight", "model.diffusion_model.txt_in.weight",
            "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
            "vae.encoder.conv_in.weight", "vae.decoder.conv_in.weight",
            COMFY_CLIP + "text_model.embeddings.token_embedding.weight", "text_encoders.clip_l.logit_scale",
            COMFY_T5 + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            COMFY_T5 + "shared.weight"]
    assert find_models(keys) == {"transformer": "model.diffusion_model.", "vae": "vae.", "clip": COMFY_CLIP,
                                 "t5": COMFY_T5}
    old = ["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight",
           "cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight",
           "cond_stage_model.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert find_models(old) == {"vae": "first_stage_model.", "clip": "cond_stage_model.clip_l.transformer.",
                                "t5": "cond_stage_model.t5xxl.transformer."}
    assert find_models(["text_model.embeddings.token_embedding.weight"]) == {"clip": ""}
    assert find_models(["encoder.conv_in.weight"]) == {}  # one stray name makes no autoencoder
    sd3 = [f"text_encoders.{c}.transformer.text_model.embeddings.token_embedding.weight" for c in ("clip_g", "clip_l")]
    assert find_models(sd3) == {"clip": COMFY_CLIP}  # FLUX's CLIP of several


# ---------------------------------------------------------------------------------------------------------------
# whole pipelines: separate files, an all-in-one file, a ComfyUI tree, the command line

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny FLUX folder (CLIP 128 wide: 2 heads of 64; T5's max distance set to single files' 128) and the same
    models as ComfyUI's files: BFL transformer, ae.safetensors, clip_l.safetensors, t5xxl_fp16 (float32 here, so
    the images can be compared with the folder's exactly), and an all-in-one checkpoint."""
    root = tmp_path_factory.mktemp("comfy")
    folder = make_tiny_flux_folder(root / "flux", pooled_projection_dim=128, vae_block_out_channels=(32, 64),
                                   vae_norm_num_groups=32)
    config = folder / "text_encoder_2" / "config.json"
    config.write_text(config.read_text().replace('"relative_attention_max_distance": 32',
                                                 '"relative_attention_max_distance": 128'))
    out = root / "files"
    out.mkdir()
    save_transformer(load_transformer(folder), out / "flux1-tiny.safetensors", layout="bfl")
    ae = {k: v.contiguous() for k, v in load_autoencoder(folder / "vae").state_dict().items()}
    save_file(ae, out / "ae.safetensors")
    clip = {"text_model." + k.removeprefix("text_model."): v
            for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()}
    save_file(clip, out / "clip_l.safetensors")
    t5 = load_file(folder / "text_encoder_2" / "model.safetensors")
    t5.pop("encoder.embed_tokens.weight", None)
    save_file(t5, out / "t5xxl_fp16.safetensors")
    transformer = load_file(out / "flux1-tiny.safetensors")
    with safe_open(str(out / "flux1-tiny.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    everything = {"model.diffusion_model." + k: v for k, v in transformer.items()}
    everything |= {"vae." + k: v for k, v in ae.items()}
    everything |= {COMFY_CLIP + k: v for k, v in clip.items()}
    everything |= {COMFY_T5 + k: v for k, v in t5.items()}
    everything["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6)
    save_file(everything, out / "flux1-tiny-checkpoint.safetensors", metadata=metadata)
    return folder, out


def image(pipe):
    return pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, seed=0, output_type="np").images


@pytest.fixture(scope="module")
def folder_image(files):
    return image(load(files[0]))


def test_separate_files_make_the_folders_image(files, folder_image):
    folder, out = files
    pipe = load(out / "flux1-tiny.safetensors", vae=out / "ae.safetensors", clip=out / "clip_l.safetensors",
                t5=out / "t5xxl_fp16.safetensors", tokenizers=folder)
    assert np.abs(image(pipe) - folder_image).max() < 1e-6
    # one part from a single file, the rest from a diffusers folder
    pipe = load(out / "flux1-tiny.safetensors", vae=out / "ae.safetensors", text_encoders=folder,
                clip=out / "clip_l.safetensors")
    assert np.abs(image(pipe) - folder_image).max() < 1e-6


def test_an_autoencoder_inside_a_bigger_file(files):
    folder, out = files
    want = load_autoencoder(out / "ae.safetensors").state_dict()
    for prefix in ("first_stage_model.", "vae."):
        state = {prefix + k: v for k, v in want.items()}
        state["model.diffusion_model.img_in.weight"] = torch.zeros(4, 4)
        save_file(state, out / "bundle.safetensors")
        got = load_autoencoder(out / "bundle.safetensors").state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, want[k])
               for k, v in load_autoencoder(out / "flux1-tiny-checkpoint.safetensors").state_dict().items())


def test_all_in_one_file(files, folder_image, tmp_path, monkeypatch):
    folder, out = files
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache: no default tokenizers
    checkpoint = out / "flux1-tiny-checkpoint.safetensors"
    with pytest.raises(CheckpointError) as e:
        load(checkpoint)
    assert "tokenizers= (--tokenizers)" in one_line(e)
    pipe = load(checkpoint, tokenizers=folder)
    assert np.abs(image(pipe) - folder_image).max() < 1e-6
    assert pipe.source == checkpoint
    # FLUX.1-dev's tokenizers in the local cache are taken by default (a download of those folders is enough)
    save_file(transformers_names(other_clip()), tmp_path / "clip_g.safetensors")
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "abc"
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(folder / sub, snapshot / sub)
    assert np.abs(image(load(checkpoint)) - folder_image).max() < 1e-6
    with pytest.raises(CheckpointError) as e:  # a CLIP of another width than the transformer takes
        load(checkpoint, clip=tmp_path / "clip_g.safetensors")
    assert "is 64 wide, but the transformer" in one_line(e) and "clip= (--clip)" in str(e.value)
    with pytest.raises(CheckpointError) as e:  # a file holding no transformer, given as the model
        load(out / "clip_l.safetensors")
    assert "holds no FLUX transformer (it holds: CLIP text encoder)" in one_line(e)


def other_clip() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=30, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, max_position_embeddings=8))


def comfyui_tree(out, root):
    """models/ as ComfyUI lays it out; the names say nothing of what the files are, on purpose."""
    for sub, name, target in (("diffusion_models", "my-flux.safetensors", "flux1-tiny.safetensors"),
                              ("vae", "decoder.safetensors", "ae.safetensors"),
                              ("clip", "text-a.safetensors", "t5xxl_fp16.safetensors"),
                              ("text_encoders", "text-b.safetensors", "clip_l.safetensors")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / target, root / sub / name)
    (root / "unet").mkdir()
    (root / "checkpoints").mkdir()
    # a CLIP of another width (SDXL's clip_g, say) is not FLUX's: it is passed over
    save_file(transformers_names(other_clip()), root / "clip" / "clip_g.safetensors")
    (root / "clip" / "notes.txt").write_text("not a model")
    return root


def test_comfyui_tree(files, folder_image, tmp_path):
    folder, out = files
    tree = comfyui_tree(out, tmp_path / "models")
    pipe = load(comfyui_models=tree, tokenizers=folder)
    assert np.abs(image(pipe) - folder_image).max() < 1e-6
    assert pipe.source == tree / "diffusion_models" / "my-flux.safetensors"
    # the tree as the source, and a file name in diffusion_models/ as the source, mean the same
    assert load(tree, tokenizers=folder).source == pipe.source
    shutil.copy(out / "flux1-tiny.safetensors", tree / "unet" / "other.safetensors")
    with pytest.raises(CheckpointError) as e:
        load(comfyui_models=tree, tokenizers=folder)
    message = one_line(e)
    assert "several FLUX transformers" in message and "diffusion_models/my-flux.safetensors" in message
    assert "unet/other.safetensors" in message and "source= (--model)" in message
    chosen = load("other.safetensors", comfyui_models=tree, tokenizers=folder)
    assert chosen.source == tree / "unet" / "other.safetensors"
    # several T5s: the t5 argument chooses, by path or by name
    shutil.copy(out / "t5xxl_fp16.safetensors", tree / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    with pytest.raises(CheckpointError) as e:
        load("my-flux.safetensors", comfyui_models=tree, tokenizers=folder)
    assert "several T5 encoders" in one_line(e) and "t5= (--t5)" in str(e.value)
    pipe = load("my-flux.safetensors", comfyui_models=tree, tokenizers=folder, t5="t5xxl_fp8_e4m3fn.safetensors")
    assert np.abs(image(pipe) - folder_image).max() < 1e-6
    with pytest.raises(CheckpointError) as e:
        load("my-flux.safetensors", comfyui_models=tree, tokenizers=folder, t5="t5-missing.safetensors")
    assert "no T5 encoder t5-missing.safetensors" in one_line(e)
    # a missing part
    (tree / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors").unlink()
    shutil.rmtree(tree / "vae")
    with pytest.raises(CheckpointError) as e:
        load("my-flux.safetensors", comfyui_models=tree, tokenizers=folder)
    assert "no autoencoder for" in one_line(e) and "vae= (--vae)" in str(e.value)
    (tree / "text_encoders" / "text-b.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load("my-flux.safetensors", comfyui_models=tree, tokenizers=folder, vae=out / "ae.safetensors")
    assert "no CLIP text encoder for" in one_line(e) and "none 128 wide" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load(comfyui_models=tmp_path / "nowhere")
    assert "no ComfyUI models folder" in one_line(e)


def test_cli_with_comfyui_models(files, tmp_path, monkeypatch, capsys):
    from rectiflux import cli
    from rectiflux.cli.recipe import read_recipe

    folder, out = files
    tree = comfyui_tree(out, tmp_path / "models")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the weight-hash cache
    monkeypatch.chdir(tmp_path)
    args = ["generate", "a red circle", "--comfyui-models", tree, "--tokenizers", folder, "--steps", "1",
            "--width", "32", "--height", "32", "--max-sequence-length", "16", "--seed", "3"]
    assert cli.main([*map(str, args), "-o", "a.png"]) == 0
    recipe = read_recipe(tmp_path / "a.png")
    assert recipe["model"] == str(tree / "diffusion_models" / "my-flux.safetensors")
    assert recipe["comfyui_models"] == str(tree) and recipe["tokenizers"] == str(folder)
    assert cli.main(["generate", "--from-png", "a.png", "-o", "b.png"]) == 0
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # several T5s: one line naming them and the flag that chooses
    shutil.copy(out / "t5xxl_fp16.safetensors", tree / "clip" / "t5xxl_fp8_e4m3fn.safetensors")
    capsys.readouterr()
    assert cli.main([*map(str, args), "-o", "c.png"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("rectiflux: error: ") and "several T5 encoders" in err[0]
    assert "--t5" in err[0] and "clip/t5xxl_fp8_e4m3fn.safetensors" in err[0]
    assert cli.main([*map(str, args), "--t5", "text-a.safetensors", "-o", "c.png"]) == 0
    assert read_recipe(tmp_path / "c.png")["t5"] == "text-a.safetensors"


def other_families(tree, out):
    """What a ComfyUI tree holds beside FLUX's files: Wan's GGUF transformer and its UMT5 encoder (as wide as
    T5-XXL), SDXL's autoencoder (4 latent channels), LoRAs."""
    weight = quantize_to_raw(torch.ones(8, 4), GGMLType.F32)
    write_gguf(tree / "unet" / "wan2.1-t2v-14b-Q4_K_M.gguf",
               {"patch_embedding.weight": (int(GGMLType.F32), (8, 4), weight)}, architecture="wan")
    flux_ae = load_autoencoder(out / "ae.safetensors")
    sdxl = AutoEncoder(dataclasses.replace(flux_ae.config, latent_channels=4))
    save_file({k: v.contiguous() for k, v in sdxl.state_dict().items()}, tree / "vae" / "sdxl_vae.safetensors")
    t5 = load_file(out / "t5xxl_fp16.safetensors")
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    save_file({**t5, bias.replace("block.0", "block.1"): t5[bias].clone()},
              tree / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    qkv = load_file(out / "flux1-tiny.safetensors")["double_blocks.0.img_attn.qkv.weight"]
    g = torch.Generator().manual_seed(0)
    (tree / "loras").mkdir()
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, qkv.shape[1], generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(qkv.shape[0], 4, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}, tree / "loras" / "style.safetensors")


def test_comfyui_tree_passes_over_other_families(files, folder_image, tmp_path, monkeypatch):
    folder, out = files
    tree = comfyui_tree(out, tmp_path / "models")
    other_families(tree, out)
    (tree / "vae" / "decoder.safetensors").rename(tree / "vae" / "ae.sft")  # BFL's first files were named .sft
    pipe = load(comfyui_models=tree, tokenizers=folder)
    assert np.abs(image(pipe) - folder_image).max() < 1e-6
    assert pipe.source == tree / "diffusion_models" / "my-flux.safetensors"
    with pytest.raises(CheckpointError) as e:
        load(comfyui_models=tree, tokenizers=folder, vae="sdxl_vae.safetensors")
    assert "sdxl_vae.safetensors has 4 latent channels, but the transformer" in one_line(e)
    assert "takes 16: pass vae= (--vae)" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load(comfyui_models=tree, tokenizers=folder, t5="umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    assert "is a UMT5 encoder" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        load("wan2.1-t2v-14b-Q4_K_M.gguf", comfyui_models=tree, tokenizers=folder)
    assert "architecture 'wan', not a FLUX.1 transformer" in one_line(e)
    (tree / "vae" / "ae.sft").unlink()  # only SDXL's is left
    with pytest.raises(CheckpointError) as e:
        load(comfyui_models=tree, tokenizers=folder)
    assert "no autoencoder for" in one_line(e) and "none with 16 latent channels (the transformer's)" in str(e.value)
    # without the gguf package a GGUF's architecture cannot be told: it stays a candidate, and loading names the package
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(CheckpointError) as e:
        load(comfyui_models=tree, tokenizers=folder)
    assert "several FLUX transformers" in one_line(e) and "unet/wan2.1-t2v-14b-Q4_K_M.gguf" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        load("wan2.1-t2v-14b-Q4_K_M.gguf", comfyui_models=tree, tokenizers=folder)
    assert "needs the gguf package: pip install 'rectiflux[gguf]'" in one_line(e)


def test_comfyui_tree_with_a_gguf_t5(files, folder_image, tmp_path):
    folder, out = files
    tree = comfyui_tree(out, tmp_path / "models")
    model = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
    gguf_t5(model, tree / "clip" / "t5-v1_1-xxl-encoder-f32.gguf", types=("F32",))  # lossless: the same image
    with pytest.raises(CheckpointError) as e:
        load(comfyui_models=tree, tokenizers=folder)
    assert "several T5 encoders" in one_line(e) and "clip/t5-v1_1-xxl-encoder-f32.gguf" in str(e.value)
    (tree / "clip" / "text-a.safetensors").unlink()  # the safetensors T5
    pipe = load(comfyui_models=tree, tokenizers=folder)
    assert np.abs(image(pipe) - folder_image).max() < 1e-6


def test_sft_files_beside_each_other(files, folder_image, tmp_path):
    folder, out = files
    shutil.copy(out / "flux1-tiny.safetensors", tmp_path / "flux1-tiny.sft")
    shutil.copy(out / "ae.safetensors", tmp_path / "ae.sft")  # found beside the transformer, as ae.safetensors is
    pipe = load(tmp_path / "flux1-tiny.sft", clip=out / "clip_l.safetensors", t5=out / "t5xxl_fp16.safetensors",
                tokenizers=folder)
    assert np.abs(image(pipe) - folder_image).max() < 1e-6
    (tmp_path / "flux1-tiny.ckpt").write_bytes(b"pickle")
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "flux1-tiny.ckpt")
    assert "not a safetensors file (.safetensors or .sft; pickled checkpoints are never read)" in one_line(e)


def test_cli_finds_loras_in_the_comfyui_tree(files, tmp_path, monkeypatch):
    import argparse

    from rectiflux import cli
    from rectiflux.cli.recipe import read_recipe
    from rectiflux.cli.serve import lora_catalogue

    folder, out = files
    tree = comfyui_tree(out, tmp_path / "models")
    other_families(tree, out)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = ["generate", "a red circle", "--comfyui-models", tree, "--tokenizers", folder, "--steps", "1", "--width",
            "32", "--height", "32", "--max-sequence-length", "16", "--seed", "3"]
    assert cli.main([*map(str, args), "-o", "plain.png"]) == 0
    assert cli.main([*map(str, args), "--lora", "style.safetensors:0.8", "-o", "lora.png"]) == 0
    recorded = read_recipe(tmp_path / "lora.png")["loras"]
    assert [(v["file"], v["scale"]) for v in recorded] == [(str(tree / "loras" / "style.safetensors"), 0.8)]
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "lora.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    # the server offers the tree's LoRAs unless --lora-dir names another folder
    (tree / "loras" / "flux").mkdir()  # subfolders too, by the file's stem
    shutil.copy(tree / "loras" / "style.safetensors", tree / "loras" / "flux" / "detail.sft")
    served = lora_catalogue(argparse.Namespace(loras=[], lora_dir=None, comfyui_models=str(tree)))
    assert [(v.name, v.active) for v in served] == [("detail", False), ("style", False)]
    assert served[0].path == str(tree / "loras" / "flux" / "detail.sft")


def test_forge_models_tree(files, folder_image, tmp_path, monkeypatch):
    """Forge's models/ folder: Stable-diffusion/, VAE/, text_encoder/ and Lora/ stand for ComfyUI's folders."""
    from rectiflux import cli
    from rectiflux.cli.recipe import read_recipe

    folder, out = files
    tree = tmp_path / "models"
    for sub, name in (("Stable-diffusion", "flux1-tiny.safetensors"), ("VAE", "ae.safetensors"),
                      ("text_encoder", "clip_l.safetensors"), ("text_encoder", "t5xxl_fp16.safetensors")):
        (tree / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(out / name, tree / sub / name)
    (tree / "Lora").mkdir()
    qkv = load_file(out / "flux1-tiny.safetensors")["double_blocks.0.img_attn.qkv.weight"]
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(4, qkv.shape[1]),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(qkv.shape[0], 4) * 0.1},
              tree / "Lora" / "style.safetensors")
    assert np.abs(image(load(tree, tokenizers=folder)) - folder_image).max() < 1e-6
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    args = ["generate", "a red circle", "--comfyui-models", tree, "--tokenizers", folder, "--steps", "1", "--width",
            "32", "--height", "32", "--max-sequence-length", "16", "--lora", "style.safetensors", "-o", "a.png"]
    assert cli.main([*map(str, args)]) == 0
    assert read_recipe(tmp_path / "a.png")["loras"][0]["file"] == str(tree / "Lora" / "style.safetensors")
