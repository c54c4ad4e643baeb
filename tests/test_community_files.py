"""The transformer files people have: ComfyUI's fp8 single files (scaled or not, prefixed), files that bundle the
other models, and city96's GGUF files. Each image equals diffusers' image of the dequantised weights in float32."""

import shutil

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline as DiffusersFlux
from safetensors.torch import save_file
from test_gguf import random_raw
from test_pipeline import assert_close, generators
from tiny_models import make_tiny_flux_folder
from torch._dynamo.utils import counters

import rectiflux.quantize.gguf as gguf_module
from rectiflux.pipelines.load import load
from rectiflux.quantize.gguf import GGMLType, GGUFLinear, quantize_to_raw, write_gguf
from rectiflux.quantize.linear import QuantizedLinear
from rectiflux.quantize.nf4 import BnbLinear
from rectiflux.weights.checkpoint import CheckpointError
from rectiflux.weights.layout import unit_of
from rectiflux.weights.transformer import load_transformer, save_transformer

CALL = {"prompt": "a red circle", "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 3.5,
        "max_sequence_length": 16, "output_type": "np"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # head_dim 128 (FLUX's: BFL-layout files record no RoPE axes) and widths that are whole K-quant blocks
    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny") / "flux", attention_head_dim=128,
                                 num_attention_heads=2, axes_dims_rope=(16, 56, 56), joint_attention_dim=64,
                                 pooled_projection_dim=32)


def block_linears(state):
    return [k for k in state if k.endswith(".weight") and state[k].ndim == 2
            and unit_of(k).startswith(("double_blocks.", "single_blocks."))]


def diffusers_image(folder, tmp_path, state):
    """diffusers' image with the transformer weights `state` (our names), written through our diffusers writer."""
    oracle = tmp_path / "oracle"
    shutil.copytree(folder, oracle, ignore=shutil.ignore_patterns("transformer"))
    model = load_transformer(folder)
    model.load_state_dict(state)
    save_transformer(model, oracle / "transformer")
    pipe = DiffusersFlux.from_pretrained(oracle, local_files_only=True)
    return pipe(generator=generators(0), **CALL).images


def ours_image(pipe):
    return pipe(generator=generators(0), **CALL).images


def scaled_fp8(state, dtype=torch.float8_e4m3fn, seed=0):
    """ComfyUI's scaled fp8: every block linear divided by a per-tensor scale, stored in fp8, with the scale (and an
    input scale) beside it; img_in in plain fp8. Returns (file tensors with their prefix, dequantised state)."""
    g = torch.Generator().manual_seed(seed)
    prefix = "model.diffusion_model."
    out, dequantised = {prefix + "scaled_fp8": torch.empty(0, dtype=dtype)}, {}
    for key, w in state.items():
        if key in block_linears(state):
            scale = w.abs().max() / 448 * (0.5 + torch.rand((), generator=g))
            codes = (w / scale).to(dtype)
            out[prefix + key] = codes
            out[prefix + key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            out[prefix + key.removesuffix("weight") + "scale_input"] = torch.ones(())
            dequantised[key] = codes.float() * scale
        elif key == "img_in.weight":
            out[prefix + key] = w.to(dtype)
            dequantised[key] = w.to(dtype).float()
        else:
            out[prefix + key] = w.to(torch.bfloat16)
            dequantised[key] = w.to(torch.bfloat16).float()
    return out, dequantised


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_comfyui_scaled_fp8_file_matches_diffusers_on_its_dequantised_weights(folder, tmp_path, fp8):
    state = load_transformer(folder).state_dict()
    tensors, dequantised = scaled_fp8(state, fp8)
    file = tmp_path / "flux1-tiny-fp8.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, file)
    pipe = load(file, vae=folder / "vae", text_encoders=folder)
    assert_close(ours_image(pipe), diffusers_image(folder, tmp_path, dequantised))
    # the blocks' weights stay fp8 in memory (read at first use): one byte a weight
    linears = [m for m in pipe.transformer.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == len(block_linears(state)) and all(m.weight.dtype == fp8 for m in linears)
    assert pipe.transformer.img_in.weight.dtype == torch.float32
    # a bfloat16 pipeline keeps the fp8 codes and their float32 scales as they are
    pipe.to(torch.bfloat16)
    assert all(m.weight.dtype == fp8 and m.weight_scale.dtype == torch.float32 for m in linears)


@pytest.mark.parametrize("blocks", ["lazy", "stream"])
def test_fp8_blocks_read_on_demand_give_the_same_model(folder, tmp_path, blocks):
    state = load_transformer(folder).state_dict()
    tensors, _ = scaled_fp8(state)
    file = tmp_path / "fp8.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, file)
    now, later = load_transformer(file), load_transformer(file, blocks=blocks)
    g = torch.Generator().manual_seed(1)
    cfg = now.config
    inputs = (torch.randn(1, 16, cfg.in_channels, generator=g), torch.zeros(16, 3), torch.randn(1, 4, 64, generator=g),
              torch.zeros(4, 3), torch.tensor([0.5]), torch.randn(1, 32, generator=g), torch.tensor([3.5]))
    with torch.no_grad():
        assert torch.equal(now(*inputs), later(*inputs))


def test_a_bundle_file_gives_its_transformer(folder, tmp_path):
    state = load_transformer(folder).state_dict()
    bundle = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    bundle |= {"vae.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4)}
    file = tmp_path / "all-in-one.safetensors"
    save_file(bundle, file)
    model = load_transformer(file)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="no transformer tensor under the prefix 'unet.'"):
        load_transformer(file, prefix="unet.")


def test_fp8_weights_beside_a_mismatched_model_are_refused_by_name(folder, tmp_path):
    state = load_transformer(folder).state_dict()
    tensors, _ = scaled_fp8(state)
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    tensors[key] = tensors[key][:-1]
    file = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, file)
    with pytest.raises(CheckpointError, match=r"wrong shape double_blocks\.0\.img_attn\.qkv\.weight"):
        load_transformer(file)
    # a scale per row would be read as one number: refused, not half applied
    tensors, _ = scaled_fp8(state)
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.scale_weight"
    tensors[key] = torch.ones(tensors[key.replace("scale_weight", "weight")].shape[0])
    save_file({k: v.contiguous() for k, v in tensors.items()}, file)
    with pytest.raises(CheckpointError, match=r"qkv\.scale_weight has shape .*only per-tensor scales are read"):
        load_transformer(file)


# city96 quantises the blocks' linears and keeps the rest in F32/F16; every quantised type gets some linears here
QUANTISED = [GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q6_K,
             GGMLType.Q5_K, GGMLType.Q4_K, GGMLType.Q3_K, GGMLType.Q2_K]
K_QUANTS = (GGMLType.Q6_K, GGMLType.Q5_K, GGMLType.Q4_K, GGMLType.Q3_K, GGMLType.Q2_K)


def gguf_file(state, path, types=QUANTISED, architecture="flux"):
    """Write `state` as a GGUF file and return the dequantised weights, by gguf-py's own dequantiser."""
    tensors, dequantised = {}, {}
    linears = block_linears(state)
    for i, key in enumerate(sorted(state)):
        w = state[key]
        if key in linears:
            qtype = types[linears.index(key) % len(types)]
            # gguf-py has no K-quant quantiser: random blocks with small scales stand in for quantised weights
            raw = random_raw(qtype, tuple(w.shape), seed=i, scale=2e-4) if qtype in K_QUANTS else \
                quantize_to_raw(w, qtype)
        else:
            qtype = GGMLType.F16 if key == "img_in.weight" else GGMLType.BF16 if key == "txt_in.weight" else \
                GGMLType.F32
            raw = quantize_to_raw(w, qtype)
        tensors[key] = (int(qtype), tuple(w.shape), raw)
        values = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(int(qtype)))
        dequantised[key] = torch.from_numpy(values.copy()).float().reshape(w.shape)
    write_gguf(path, tensors, architecture=architecture)
    return dequantised


def test_gguf_file_of_every_type_matches_diffusers_on_its_dequantised_weights(folder, tmp_path):
    state = load_transformer(folder).state_dict()
    file = tmp_path / "flux1-tiny-Q4_K.gguf"
    dequantised = gguf_file(state, file)
    pipe = load(file, vae=folder / "vae", text_encoders=folder)
    assert_close(ours_image(pipe), diffusers_image(folder, tmp_path, dequantised))
    # the quantised weights stay as the file's bytes
    linears = [m for m in pipe.transformer.modules() if isinstance(m, GGUFLinear)]
    assert len(linears) == len(block_linears(state)) and all(m.weight.dtype == torch.uint8 for m in linears)
    assert {m.qtype for m in linears} == {int(t) for t in QUANTISED}


@pytest.mark.parametrize("blocks", ["memory", "stream"])
def test_gguf_blocks_read_in_any_mode_give_the_same_model(folder, tmp_path, blocks):
    file = tmp_path / "t.gguf"
    gguf_file(load_transformer(folder).state_dict(), file)
    lazy, other = load_transformer(file, blocks="lazy"), load_transformer(file, blocks=blocks)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 16, 64, generator=g), torch.zeros(16, 3), torch.randn(1, 4, 64, generator=g),
              torch.zeros(4, 3), torch.tensor([0.5]), torch.randn(1, 32, generator=g), torch.tensor([3.5]))
    with torch.no_grad():
        assert torch.equal(lazy(*inputs), other(*inputs))
        assert torch.equal(lazy(*inputs), other(*inputs))  # a streamed block read again


@pytest.mark.parametrize("kind", ["fp8", "gguf", "bnb"])
def test_compact_files_compile_to_their_eager_images(folder, tmp_path, kind, monkeypatch):
    # a GGUF file of mixed quantised types: one graph per block layout of types
    file, _, _ = compact_file(kind, load_transformer(folder).state_dict(), tmp_path)
    if kind == "gguf":
        monkeypatch.setattr(gguf_module, "COMPILED_CHUNK_ELEMENTS", 1 << 17)  # a few chunks per weight here too
    eager = ours_image(load(file, vae=folder / "vae", text_encoders=folder))
    torch._dynamo.reset()
    counters.clear()
    pipe = load(file, vae=folder / "vae", text_encoders=folder, compile=True)
    assert np.abs(ours_image(pipe) - eager).max() < 1e-5  # the dequantisers traced and fused, the same values
    graphs = counters["stats"]["unique_graphs"]
    assert counters["frames"]["ok"] == counters["frames"]["total"] == graphs  # every block layout compiled
    assert np.abs(ours_image(pipe) - eager).max() < 1e-5 and counters["stats"]["unique_graphs"] == graphs


def test_gguf_that_is_no_flux_transformer_is_refused_by_its_architecture(folder, tmp_path):
    file = tmp_path / "llama.gguf"
    gguf_file(load_transformer(folder).state_dict(), file, types=[GGMLType.Q8_0], architecture="llama")
    with pytest.raises(CheckpointError, match="architecture 'llama', not a FLUX.1 transformer") as e:
        load_transformer(file)
    assert "\n" not in str(e.value)


def bnb_file(state, path, nested=True, quant_type="nf4"):
    """A Forge-style bitsandbytes checkpoint: every linear weight as bitsandbytes quantises it (codes, scales and
    state, `QuantState.as_dict(packed=True)`), the rest in bfloat16, under `model.diffusion_model.`. Returns the
    weights it means, by bitsandbytes' own dequantiser.

    Only weights whose rows are whole 64-weight blocks, as all of FLUX.1's are: bitsandbytes 0.50's CPU dequantiser
    misplaces the others (they come back farther from what was quantised than their codes say), so it is no
    oracle for them."""
    import bitsandbytes.functional as bnb

    tensors, meant = {}, {}
    for key, value in state.items():
        name = "model.diffusion_model." + key
        if key.endswith(".weight") and value.ndim == 2 and value.shape[1] % 64 == 0:
            codes, quant_state = bnb.quantize_4bit(value.float(), blocksize=64, quant_type=quant_type,
                                                   compress_statistics=nested)
            tensors[name] = codes
            tensors |= {f"{name}.{k}": v.clone() for k, v in quant_state.as_dict(packed=True).items()}
            meant[key] = bnb.dequantize_4bit(codes, quant_state).float()
        else:
            tensors[name] = value.bfloat16()
            meant[key] = tensors[name].float()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return meant


@pytest.mark.parametrize("nested", [True, False])
def test_bnb_linear_in_row_chunks_matches_bitsandbytes(nested, monkeypatch):
    """BnbLinear's products, a few rows of its weight dequantised at a time, against bitsandbytes' own weights."""
    import bitsandbytes.functional as bnb

    from rectiflux.quantize.nf4 import parse_state
    from rectiflux.weights.checkpoint import load_into

    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(300, 256, generator=g), torch.randn(5, 256, generator=g)
    codes, quant_state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
    stored = quant_state.as_dict(packed=True)
    state = parse_state(stored.pop("quant_state.bitsandbytes__nf4"), "test")
    module = BnbLinear(256, 300, 64, nested, bias=False, nested_blocksize=state["nested_blocksize"],
                       nested_offset=state["nested_offset"], device="meta")
    load_into(module, {"weight": codes, **stored}, None, "test")
    want = x @ bnb.dequantize_4bit(codes, quant_state).float().t()
    monkeypatch.setattr(gguf_module, "CHUNK_ELEMENTS", 7 * 256)  # chunks of 7 rows, the last one short
    with torch.no_grad():
        # outputs of about 30: the products' summation order alone differs; a misplaced row would be off by ~10
        assert (module(x) - want).abs().max() < 1e-4


# Forge's first NF4 file (nested scales), its v2 (float32 scales), and bitsandbytes' other 4-bit code
@pytest.mark.parametrize(("nested", "quant_type"), [(True, "nf4"), (False, "nf4"), (True, "fp4")])
def test_bitsandbytes_file_matches_diffusers_on_its_dequantised_weights(folder, tmp_path, nested, quant_type):
    state = load_transformer(folder).state_dict()
    file = tmp_path / "flux1-dev-bnb-nf4.safetensors"
    meant = bnb_file(state, file, nested, quant_type)
    pipe = load(file, vae=folder / "vae", text_encoders=folder, blocks="memory")
    assert_close(ours_image(pipe), diffusers_image(folder, tmp_path, meant))
    linears = [m for m in pipe.transformer.modules() if isinstance(m, BnbLinear)]
    assert len(linears) == len(block_linears(state)) and all(m.weight.dtype == torch.uint8 for m in linears)


def test_gguf_of_the_wrong_size_is_refused_by_name(folder, tmp_path):
    state = load_transformer(folder).state_dict()
    state["single_blocks.0.linear2.weight"] = state["single_blocks.0.linear2.weight"][:-1]
    file = tmp_path / "bad.gguf"
    gguf_file(state, file, types=[GGMLType.Q8_0])
    with pytest.raises(CheckpointError, match=r"wrong shape single_blocks\.0\.linear2\.weight"):
        load_transformer(file)


def lora_of(state, seed=0):
    """A peft LoRA on two whole block linears, and what it adds to our weights (scale 1, alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    targets = {"single_transformer_blocks.0.proj_out": "single_blocks.0.linear2",
               "transformer_blocks.0.ff.net.2": "double_blocks.0.img_mlp.2"}
    sd, deltas = {}, {}
    for theirs, ours in targets.items():
        out_features, in_features = state[ours + ".weight"].shape
        down, up = torch.randn(4, in_features, generator=g) * 0.05, torch.randn(out_features, 4, generator=g) * 0.05
        sd[f"transformer.{theirs}.lora_A.weight"], sd[f"transformer.{theirs}.lora_B.weight"] = down, up
        deltas[ours + ".weight"] = up @ down
    return sd, deltas


def compact_file(kind, state, folder):
    """A file of `kind` holding `state` in `folder`: ComfyUI's scaled fp8 ("fp8"), GGUF ("gguf") or Forge's NF4
    ("bnb"). Returns its path, the weights it means, and the fp8 file's tensors (None for the others)."""
    if kind == "fp8":
        tensors, meant = scaled_fp8(state)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "fp8.safetensors")
        return folder / "fp8.safetensors", meant, tensors
    if kind == "gguf":
        return folder / "q.gguf", gguf_file(state, folder / "q.gguf"), None
    return folder / "nf4.safetensors", bnb_file(state, folder / "nf4.safetensors"), None


def test_loras_on_compact_files(folder, tmp_path):
    state = load_transformer(folder).state_dict()
    lora, deltas = lora_of(state)
    for kind in ("fp8", "gguf", "bnb"):
        file, dequantised, _ = compact_file(kind, state, tmp_path)
        merged = {k: v + deltas[k] if k in deltas else v for k, v in dequantised.items()}
        want = diffusers_image(folder, tmp_path / kind, merged)
        pipe = load(file, vae=folder / "vae", text_encoders=folder)
        before = ours_image(pipe)
        pipe.load_lora_weights(dict(lora))
        assert_close(ours_image(pipe), want)  # unfused: side products beside the compact weights
        if kind == "fp8":
            pipe.fuse_lora()  # merged into the float weights, re-quantised to fp8: within fp8's rounding
            assert np.abs(ours_image(pipe) - want).max() < 0.05
            pipe.unfuse_lora()
        else:
            with pytest.raises(ValueError, match="(GGUF|bitsandbytes) .* weights, which cannot be written back"):
                pipe.fuse_lora()
        assert_close(ours_image(pipe), want)
        pipe.unload_lora_weights()
        assert np.array_equal(ours_image(pipe), before)


@pytest.mark.parametrize("kind", ["fp8", "gguf", "bnb"])
def test_compact_files_quantised_again(folder, tmp_path, kind):
    """quantize= on an fp8, GGUF or bitsandbytes file quantises the blocks again from the weights the file means:
    the same model as the float file of those weights quantised alike, with a LoRA fused too; fp8 weights asked
    for in float8 are kept as stored."""
    state = load_transformer(folder).state_dict()
    file, dequantised, tensors = compact_file(kind, state, tmp_path)
    model = load_transformer(folder)
    model.load_state_dict(dequantised)
    save_transformer(model, tmp_path / "float.safetensors", layout="bfl")
    lora, _ = lora_of(state)
    kernels = {"int8_products": "int_mm", "attention": "sdpa"}
    images = []
    for source in (tmp_path / "float.safetensors", file):
        pipe = load(source, vae=folder / "vae", text_encoders=folder, quantize="int8-dynamic", kernels=kernels)
        images.append(ours_image(pipe))
        linears = [m for name, m in pipe.transformer.named_modules() if name.startswith(("double_", "single_"))
                   and isinstance(m, (torch.nn.Linear, QuantizedLinear, GGUFLinear, BnbLinear))]
        assert linears and all(isinstance(m, QuantizedLinear) and (m.weights, m.activations) == ("int8", "int8")
                               for m in linears)
        pipe.load_lora_weights(dict(lora))
        pipe.fuse_lora()  # merged into the weights the file means, quantised again
        images.append(ours_image(pipe))
    assert np.abs(images[0] - images[2]).max() < 1e-6 and np.abs(images[1] - images[3]).max() < 1e-6
    assert np.abs(images[0] - images[1]).max() > 1e-3  # the LoRA changed the image
    if kind == "fp8":
        pipe = load(file, vae=folder / "vae", text_encoders=folder, quantize="float8-dynamic", blocks="memory")
        qkv = pipe.transformer.double_blocks[0].img_attn.qkv
        assert (qkv.weights, qkv.activations) == ("float8", "float8")
        stored = tensors["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
        assert torch.equal(qkv.weight.view(torch.uint8), stored.view(torch.uint8))
