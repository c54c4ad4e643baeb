"""Text-encoder checkpoints, read into our CLIPTextEncoder and T5Encoder: transformers' CLIPTextModel and
T5EncoderModel folders (safetensors), or one .safetensors file as ComfyUI ships them (`clip_l.safetensors`,
`t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn(_scaled).safetensors`, or the encoders inside an all-in-one checkpoint),
whose config is read off the tensor shapes; and the tokenizers, which single files do not carry."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTokenizerFast, T5TokenizerFast

from ..flux.text_encoders import CLIPConfig, CLIPTextEncoder, T5Config, T5Encoder, TextEncoders
from .bundles import NAMES, find_models, select
from .checkpoint import CheckpointError, load_into, parse_dtype, read_json, read_state_dict
from .layout import CLIP_KEYS, INPUT_SCALES, T5_GGUF_ARCHITECTURES, T5_KEYS, WEIGHT_SCALES, rename, t5_gguf_names

SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# No tensor shows CLIP's head count. 64 wide heads are what every CLIP text tower has (CLIP-L: 12 of 64, ViT-bigG's:
# 20 of 64, ViT-B's: 8 of 64); a width that is no multiple of 64 needs `config=`. T5's count is the width of its
# relative attention bias.
CLIP_HEAD_DIM = 64
# Nor does T5's relative attention max distance show: every T5 (v1.0, v1.1, T5-XXL) has transformers' default 128.
T5_MAX_DISTANCE = 128


def _build(make, folder: Path, what: str):
    """Read a config.json and build the model on the meta device, refusing a bad config with the file's name."""
    settings = read_json(folder / "config.json")
    try:
        with torch.device("meta"):
            return make(settings)
    except (KeyError, TypeError, ValueError) as e:
        problem = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{what} config {folder / 'config.json'}: {problem}") from None


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})


def clip_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], what: str = "CLIP text encoder") -> CLIPConfig:
    """A CLIPConfig read off the tensor shapes (our names): widths, layers and vocabulary are in the weights; the
    head count is the width / 64 (CLIP_HEAD_DIM); eps, activation (quick_gelu) and the pooling are CLIP-L's, which
    pools at the largest token id (eos_token_id 2 in its config), the end-of-text token of CLIP's tokenizers."""
    try:
        vocab, hidden = shapes["token_embedding.weight"]
        positions = shapes["position_embedding.weight"][0]
        intermediate = shapes["layers.0.fc1.weight"][0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{what} is no CLIP text encoder (no {e})") from None
    if hidden % CLIP_HEAD_DIM:
        raise CheckpointError(f"{what}: cannot tell the head count of a CLIP {hidden} wide (no multiple of "
                              f"{CLIP_HEAD_DIM}); pass config=")
    return CLIPConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_layers=_count(shapes, "layers."), num_heads=hidden // CLIP_HEAD_DIM,
                      max_positions=positions, eps=1e-5, activation="quick_gelu", eos_token_id=2)


def t5_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], what: str = "T5 encoder") -> T5Config:
    """A T5Config read off the tensor shapes (our names): the head count and relative-position buckets from the
    relative attention bias, gated-GELU (T5 v1.1, FLUX's T5-XXL) when there are wi_0/wi_1, else ReLU (T5 v1.0)."""
    if "blocks.1.relative_attention_bias.weight" in shapes:
        raise CheckpointError(f"{what} is a UMT5 encoder (a relative attention bias in every layer, as Wan's "
                              "umt5-xxl), not the T5 v1.1 FLUX was trained with")
    try:
        vocab, d_model = shapes["shared.weight"]
        buckets, heads = shapes["relative_attention_bias.weight"]
        inner = shapes["blocks.0.q.weight"][0]
        gated = "blocks.0.wi_0.weight" in shapes
        d_ff = shapes["blocks.0.wi_0.weight" if gated else "blocks.0.wi.weight"][0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{what} is no T5 encoder (no {e})") from None
    if inner % heads:
        raise CheckpointError(f"{what}: attention width {inner} is no multiple of its {heads} heads")
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
                    num_layers=_count(shapes, "blocks."), num_heads=heads, num_buckets=buckets,
                    max_distance=T5_MAX_DISTANCE, eps=1e-6, activation="gelu_new" if gated else "relu", gated=gated)


def _file_state(path: Path, kind: str, prefix: str | None) -> dict[str, torch.Tensor]:
    """One model's tensors out of a single file (memory-mapped), its prefix dropped: the prefix given, else the one
    its tensor names show (`bundles.find_models`)."""
    state = read_state_dict(path)
    if prefix is not None:
        models = {kind: prefix}
    else:
        models = find_models(state, path)
        if kind not in models:
            held = f" (it holds: {', '.join(NAMES[k] for k in models)})" if models else ""
            raise CheckpointError(f"{path} holds no {NAMES[kind]}{held}")
    return select(state, kind, models)


def _float8_dtype(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype | None:
    """dtype None keeps the stored dtype, except for float8: our layers compute in no float8 type, and bfloat16 is
    what such a file is computed in (as ComfyUI does): half of float32's memory, and unlike float16 it cannot
    overflow T5's activations (transformers keeps T5's `wo` in float32 for float16 for that reason)."""
    if dtype is None and any(t.dtype in FLOAT8 for t in state.values()):
        return torch.bfloat16
    return dtype


def _fitted(scale: torch.Tensor, weight: torch.Tensor, key: str, what: str) -> torch.Tensor:
    """A weight's scale shaped to multiply it: one per tensor, or one per output row (as (rows,) or (rows, 1));
    block scales are refused, as a (rows,) scale could silently broadcast along the wrong axis of a square one."""
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if weight.ndim == 2 and scale.numel() == weight.shape[0] and scale.ndim in (1, 2):
        return scale.reshape(-1, 1)
    raise CheckpointError(f"{what}: the scale of {key} {tuple(scale.shape)} does not fit its weight "
                          f"{tuple(weight.shape)}; only per-tensor and per-row scales are read")


def dequantize(state: dict[str, torch.Tensor], dtype: torch.dtype | None, what: str,
               float32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """ComfyUI's float8 weights multiplied out: `<module>.weight * <module>.scale_weight` (its scaled-fp8 files) or
    `* <module>.weight_scale` (its newer per-tensor float8 format); their input scales, format records and markers
    dropped. Each such weight is made in float32 and cast to `dtype` at once (names ending in `float32` stay
    float32), so no more than one weight is ever held in float32."""
    scales = {}
    for key in list(state):
        if key.endswith(WEIGHT_SCALES):
            scales[key.rsplit(".", 1)[0] + ".weight"] = state.pop(key)
        elif key.endswith(INPUT_SCALES):
            state.pop(key)
        elif key.endswith(".comfy_quant"):
            try:
                form = json.loads(bytes(state.pop(key).tolist())).get("format")
            except (ValueError, AttributeError):
                form = None
            if form not in ("float8_e4m3fn", "float8_e5m2"):
                raise CheckpointError(f"{what}: {key} is quantised as {form!r}; only float8 weights are read")
    orphans = scales.keys() - state.keys()
    if orphans:
        raise CheckpointError(f"{what}: weight scales without their weights: {', '.join(sorted(orphans)[:3])}")
    out = {}
    for key in list(state):
        tensor = state.pop(key)
        scale = scales.get(key)
        if scale is not None or tensor.dtype in FLOAT8:
            stored = torch.bfloat16 if tensor.dtype in FLOAT8 else tensor.dtype
            to = torch.float32 if key.endswith(float32) else (dtype or stored)
            tensor = tensor.to(torch.float32)
            if scale is not None:
                tensor = tensor * _fitted(scale, tensor, key, what)
            tensor = tensor.to(to)
        out[key] = tensor
    return out


def load_clip(path: str | os.PathLike, dtype: torch.dtype | str | None = None, prefix: str | None = None,
              config: CLIPConfig | None = None) -> CLIPTextEncoder:
    """CLIP's text encoder from a transformers CLIPTextModel folder (config.json + safetensors) or one .safetensors
    file: transformers' names, with or without `text_model.` and whatever prefix the file nests them under (found
    from the names, or `prefix`); float32/16, bfloat16 or float8 (ComfyUI's scaled fp8 too). A file's config is
    read off its shapes (`clip_config_from_shapes`) unless `config` is given. dtype None keeps the stored one
    (bfloat16 for float8, see `_float8_dtype`)."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    if path.is_dir():
        model = _build(lambda d: CLIPTextEncoder(CLIPConfig.from_transformers(d)), path, "CLIP")
        state = rename(read_state_dict(path), CLIP_KEYS)
        state.pop("position_ids", None)  # older transformers saved this constant buffer
        return load_into(model, state, dtype, f"CLIP text encoder {path}").eval()
    what = f"CLIP text encoder {path}"
    state = rename(_file_state(path, "clip", prefix), CLIP_KEYS)
    state.pop("position_ids", None)
    dtype = _float8_dtype(state, dtype)
    state = dequantize(state, dtype, what)
    config = config or clip_config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, what)
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    return load_into(model, state, dtype, what).eval()


def _t5_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' T5 names, `encoder.` put back where a file left it out; the encoder's copy of the tied
    embedding dropped when `shared` is there too."""
    state = {k if k.startswith(("encoder.", "shared.")) else "encoder." + k: v for k, v in state.items()}
    if "shared.weight" in state:
        state.pop("encoder.embed_tokens.weight", None)
    return state


def load_t5(path: str | os.PathLike, dtype: torch.dtype | str | None = None, prefix: str | None = None,
            config: T5Config | None = None) -> T5Encoder:
    """T5's encoder from a transformers T5EncoderModel folder or one .safetensors file (transformers' names, with or
    without `encoder.` and an outer prefix; float32/16, bfloat16 or float8, ComfyUI's scaled fp8 too) or GGUF file
    (`_gguf_t5`); a file's config is read off its shapes (`t5_config_from_shapes`) unless `config` is given. dtype
    None keeps the stored one (bfloat16 for float8, float32 for GGUF). In float16 the output projections `wo` stay
    float32, as transformers keeps them (T5's activations overflow float16 there)."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_t5(path, dtype, config)
    if path.is_dir():
        model = _build(lambda d: T5Encoder(T5Config.from_transformers(d)), path, "T5")
        state = rename(_t5_names(read_state_dict(path)), T5_KEYS)
        what = f"T5 encoder {path}"
    else:
        what = f"T5 encoder {path}"
        state = rename(_t5_names(_file_state(path, "t5", prefix)), T5_KEYS)
        dtype = _float8_dtype(state, dtype)
        stored = state["shared.weight"].dtype if "shared.weight" in state else None
        wo = (".wo.weight",) if (dtype or stored) == torch.float16 else ()
        state = dequantize(state, dtype, what, float32=wo)
        config = config or t5_config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, what)
        with torch.device("meta"):
            model = T5Encoder(config)
    stored = state["shared.weight"].dtype if "shared.weight" in state else None
    if (dtype or stored) == torch.float16:  # wo from the stored values, not via float16
        state = {k: v.float() if k.endswith(".wo.weight") else v.half() for k, v in state.items()}
        dtype = None
    return load_into(model, state, dtype, what).eval()


def _gguf_t5(path: Path, dtype: torch.dtype | None, config: T5Config | None) -> T5Encoder:
    """city96's T5 GGUF files (llama.cpp's names): the blocks' quantised linears stay quantised in memory
    (GGUFLinear, dequantised for each product, as in a GGUF transformer); everything else is dequantised."""
    from ..quantize.gguf import GGUFLinear, byte_shape, dequantize, read_gguf
    from ..quantize.linear import replace_module
    from .gguf import FLOAT_TYPES

    what = f"T5 encoder {path}"
    contents = read_gguf(path)
    if contents.architecture not in T5_GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path} is a GGUF file of architecture {contents.architecture!r}, not a T5 encoder")
    tensors = rename(_t5_names(t5_gguf_names(contents.tensors)), T5_KEYS)
    config = config or t5_config_from_shapes({k: shape for k, (_, shape, _) in tensors.items()}, what)
    with torch.device("meta"):
        model = T5Encoder(config)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = {}
    for key, (qtype, shape, raw) in tensors.items():
        name = key.removesuffix(".weight")
        try:
            if qtype in FLOAT_TYPES or name not in linears:
                state[key] = dequantize(raw, qtype, shape)
                continue
            linear = model.get_submodule(name)
            # the module the model expects, holding the file's bytes: check_fits compares their byte shapes
            replace_module(model, name, GGUFLinear(linear.in_features, linear.out_features, qtype, bias=False,
                                                   device="meta"))
            state[key] = raw.reshape(byte_shape(shape, qtype))
        except ValueError as e:  # a type we cannot dequantise, or a size that is no whole number of blocks
            raise CheckpointError(f"{what}: {key}: {e}") from None
    return load_into(model, state, dtype, what).eval()


def load_tokenizers(folder: str | os.PathLike) -> tuple[CLIPTokenizerFast, T5TokenizerFast]:
    """CLIP's and T5's tokenizers from a folder holding diffusers' tokenizer/ and tokenizer_2/ subfolders."""
    folder = Path(folder)
    missing = [name for name in ("tokenizer", "tokenizer_2") if not (folder / name).is_dir()]
    if missing:
        raise CheckpointError(f"{folder} has no {' or '.join(missing)} subfolder: tokenizers= (--tokenizers) takes a "
                              "diffusers FLUX folder or repo id holding tokenizer/ and tokenizer_2/")
    return (CLIPTokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True),
            T5TokenizerFast.from_pretrained(folder / "tokenizer_2", local_files_only=True))


def load_text_encoders(folder: str | os.PathLike, dtype: str | torch.dtype | None = None,
                       device: str | torch.device = "cpu") -> TextEncoders:
    """CLIP and T5 with their tokenizers from a diffusers FLUX folder; dtype None keeps each model's stored dtype."""
    folder = Path(folder)
    missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise CheckpointError(
            f"{folder} has no {', '.join(missing)} subfolder(s); expected the diffusers FLUX layout "
            f"({', '.join(SUBFOLDERS)})"
        )
    return TextEncoders(
        load_clip(folder / "text_encoder", dtype).to(device),
        CLIPTokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True),
        load_t5(folder / "text_encoder_2", dtype).to(device),
        T5TokenizerFast.from_pretrained(folder / "tokenizer_2", local_files_only=True),
    )
