"""The one table between our parameter names (Black Forest Labs') and the diffusers / transformers ones.

Loading, saving and LoRA keys all go through it. Our transformer keeps BFL's fused projections: a double block's
q, k, v in one `qkv` linear, a single block's q, k, v and MLP input in one `linear1`; diffusers stores them as
separate linears, whose rows are stacked in the order listed here. The final layer's modulation is stored as
(scale, shift) by diffusers and (shift, scale) by BFL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

from ..flux.autoencoder import AutoEncoderConfig
from ..flux.config import FluxConfig
from .checkpoint import CheckpointError

V = TypeVar("V")

# how BFL single files and ComfyUI bundles nest the transformer and the autoencoder
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
AUTOENCODER_PREFIXES = ("first_stage_model.", "vae.", "ae.")
SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) here, (scale, shift) in diffusers
# ComfyUI's float8 files: a marker tensor saying the file is scaled, and beside a weight the scale it was divided by
# (`.scale_weight` in its scaled-fp8 files, `.weight_scale` in its newer per-tensor format) and an input scale for
# fp8 x fp8 products, which a dequantising product does not need
SCALED_FP8_MARKER = "scaled_fp8"
WEIGHT_SCALES = (".scale_weight", ".weight_scale")
INPUT_SCALES = (".scale_input", ".input_scale")


def is_scaled_fp8_marker(key: str) -> bool:
    return key.rpartition(".")[2] == SCALED_FP8_MARKER


# ----------------------------------------------------------------------------------------------------------------
# transformer

def transformer_parts(cfg: FluxConfig) -> dict[str, list[str]]:
    """Our module name -> the diffusers module names whose rows it stacks (in order)."""
    parts = {
        "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
        "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
        "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
        "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
        "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
        "final_layer.linear": ["proj_out"], SWAPPED: ["norm_out.linear"],
    }
    if cfg.guidance_embed:
        parts["guidance_in.in_layer"] = ["time_text_embed.guidance_embedder.linear_1"]
        parts["guidance_in.out_layer"] = ["time_text_embed.guidance_embedder.linear_2"]
    for i in range(cfg.depth):
        ours, theirs = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        parts |= {
            ours + "img_mod.lin": [theirs + "norm1.linear"], ours + "txt_mod.lin": [theirs + "norm1_context.linear"],
            ours + "img_attn.qkv": [theirs + f"attn.to_{c}" for c in "qkv"],
            ours + "txt_attn.qkv": [theirs + f"attn.add_{c}_proj" for c in "qkv"],
            ours + "img_attn.norm.query_norm": [theirs + "attn.norm_q"],
            ours + "img_attn.norm.key_norm": [theirs + "attn.norm_k"],
            ours + "txt_attn.norm.query_norm": [theirs + "attn.norm_added_q"],
            ours + "txt_attn.norm.key_norm": [theirs + "attn.norm_added_k"],
            ours + "img_attn.proj": [theirs + "attn.to_out.0"], ours + "txt_attn.proj": [theirs + "attn.to_add_out"],
            ours + "img_mlp.0": [theirs + "ff.net.0.proj"], ours + "img_mlp.2": [theirs + "ff.net.2"],
            ours + "txt_mlp.0": [theirs + "ff_context.net.0.proj"], ours + "txt_mlp.2": [theirs + "ff_context.net.2"],
        }
    for i in range(cfg.depth_single):
        ours, theirs = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        parts |= {
            ours + "modulation.lin": [theirs + "norm.linear"],
            ours + "linear1": [theirs + f"attn.to_{c}" for c in "qkv"] + [theirs + "proj_mlp"],
            ours + "norm.query_norm": [theirs + "attn.norm_q"], ours + "norm.key_norm": [theirs + "attn.norm_k"],
            ours + "linear2": [theirs + "proj_out"],
        }
    return parts


def diffusers_rows(cfg: FluxConfig) -> dict[str, tuple[str, int, int]]:
    """diffusers module name -> (our module, first row, end row) of its rows in our (fused) weight; end -1 for a
    module that is all of ours (the final layer's modulation, whose halves swap, among them). LoRA keys use it."""
    h = cfg.hidden_size
    out = {}
    for ours, theirs in transformer_parts(cfg).items():
        if len(theirs) == 1:
            out[theirs[0]] = (ours, 0, -1)
            continue
        start = 0
        for name, rows in zip(theirs, [h, h, h, cfg.mlp_hidden], strict=False):
            out[name] = (ours, start, start + rows)
            start += rows
    return out


def tensor_suffixes(ours: str) -> list[tuple[str, str]]:
    """(our suffix, diffusers suffix) of a module's tensors: RMSNorm scales are `scale` here, `weight` there."""
    return [("scale", "weight")] if ours.endswith("_norm") else [("weight", "weight"), ("bias", "bias")]


def swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_diffusers(state: Mapping[str, Tensor], cfg: FluxConfig) -> dict[str, Tensor]:
    """Our state dict -> diffusers' `FluxTransformer2DModel` one (fused projections split by rows)."""
    out: dict[str, Tensor] = {}
    h = cfg.hidden_size
    for ours, theirs in transformer_parts(cfg).items():
        for our_suffix, their_suffix in tensor_suffixes(ours):
            t = state[f"{ours}.{our_suffix}"]
            if ours == SWAPPED:
                t = swap_halves(t)
            sizes = [h, h, h, cfg.mlp_hidden][: len(theirs)] if len(theirs) > 1 else [t.shape[0]]
            for name, piece in zip(theirs, t.split(sizes, dim=0), strict=True):
                out[f"{name}.{their_suffix}"] = piece
    return out


def is_diffusers_transformer(keys: Iterable[str]) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys)


def transformer_config_from_shapes(shapes: Mapping[str, tuple[int, ...]],
                                   axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """Read a config off the tensor shapes of a checkpoint in our (= BFL) naming."""
    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})
    try:
        hidden, in_channels = shapes["img_in.weight"]
        qnorm = "double_blocks.0.img_attn.norm.query_norm.scale"
        head_dim = shapes[qnorm if qnorm in shapes else "single_blocks.0.norm.query_norm.scale"][0]
        if "double_blocks.0.img_mlp.0.weight" in shapes:
            mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        else:
            mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
        cfg = dict(
            in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0],
            num_heads=hidden // head_dim, head_dim=head_dim,
            depth=count("double_blocks."), depth_single=count("single_blocks."), mlp_ratio=mlp_hidden / hidden,
            joint_attention_dim=shapes["txt_in.weight"][1],
            pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not a FLUX.1 transformer checkpoint (no {e})") from None
    if axes_dim is None:
        if head_dim != 128:  # RoPE axes leave no trace in the weights; only FLUX.1's own are known
            raise CheckpointError(f"cannot read the RoPE axes of a head_dim {head_dim} checkpoint; pass axes_dim")
        axes_dim = (16, 56, 56)
    return FluxConfig(axes_dim=tuple(axes_dim), **cfg)


def unit_of(key: str) -> str:
    """The piece of the transformer a tensor belongs to: `double_blocks.3`, `single_blocks.0`, `img_in`, ..."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") and len(parts) > 2 else parts[0]


def blocks_of(cfg: FluxConfig) -> list[str]:
    """The names of the double and single blocks, in the order they run."""
    return [f"double_blocks.{i}" for i in range(cfg.depth)] + [f"single_blocks.{i}" for i in range(cfg.depth_single)]


# ----------------------------------------------------------------------------------------------------------------
# autoencoder: (ours, diffusers) name pieces, applied in this order both ways; the mid-block pairs come first so
# that `.block.` <-> `.resnets.` never touches them. Decoder level indices are flipped separately.

_AE_RENAMES = [
    (".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."), (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."), (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".down.", ".down_blocks."), (".up.", ".up_blocks."), (".block.", ".resnets."),
    (".downsample.", ".downsamplers.0."), (".upsample.", ".upsamplers.0."),
    (".nin_shortcut.", ".conv_shortcut."), (".norm_out.", ".conv_norm_out."),
]
_AE_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _flip_up(key: str, levels: int) -> str:
    # diffusers numbers decoder blocks in execution order (coarsest first), BFL by resolution (finest first)
    return re.sub(r"^decoder\.up\.(-?\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)


def autoencoder_diffusers_name(key: str, levels: int) -> str:
    key = _flip_up(key, levels)
    for ours, theirs in _AE_RENAMES:
        key = key.replace(ours, theirs)
    return key


def autoencoder_our_name(key: str, levels: int) -> str:
    for ours, theirs in _AE_RENAMES:
        key = key.replace(theirs, ours)
    return _flip_up(key, levels)


def autoencoder_to_diffusers(state: Mapping[str, Tensor], cfg: AutoEncoderConfig) -> dict[str, Tensor]:
    """Ours -> diffusers; its attention projections are Linear [C, C], ours 1x1 convs [C, C, 1, 1]."""
    n = len(cfg.block_out_channels)
    return {autoencoder_diffusers_name(k, n): v.flatten(1) if _AE_ATTN_WEIGHT.search(k) else v
            for k, v in state.items()}


def autoencoder_from_diffusers(state: Mapping[str, Tensor], cfg: AutoEncoderConfig) -> dict[str, Tensor]:
    out = {}
    for key, v in state.items():
        key = autoencoder_our_name(key, len(cfg.block_out_channels))
        out[key] = v[:, :, None, None] if _AE_ATTN_WEIGHT.search(key) and v.ndim == 2 else v
    return out


def is_diffusers_autoencoder(keys: Iterable[str]) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k for k in keys)


def autoencoder_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> AutoEncoderConfig:
    """Read a config off the tensor shapes of a checkpoint in our (= BFL) naming.

    Shapes do not show the GroupNorm group count (BFL's code fixes it at 32) nor the latent scaling, so those keep
    FLUX's values.
    """
    def count(pattern: str) -> int:
        return 1 + max(int(m[1]) for k in shapes if (m := re.match(pattern, k)))
    try:
        levels, layers = count(r"encoder\.down\.(\d+)\."), count(r"encoder\.down\.0\.block\.(\d+)\.")
        return AutoEncoderConfig(
            in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
            latent_channels=shapes["decoder.conv_in.weight"][1], layers_per_block=layers,
            block_out_channels=tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)),
        )
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not a FLUX autoencoder checkpoint (no {e})") from None


# ----------------------------------------------------------------------------------------------------------------
# text encoders: transformers' CLIPTextModel / T5EncoderModel names -> ours

CLIP_KEYS = [(r"^text_model\.", ""), (r"^embeddings\.", ""), (r"^encoder\.layers\.", "layers."),
             (r"\.self_attn\.", "."), (r"\.mlp\.", ".")]
T5_KEYS = [(r"^encoder\.embed_tokens\.", "shared."), (r"^encoder\.final_layer_norm\.", "final_layer_norm."),
           (r"^encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.", "relative_attention_bias."),
           (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"blocks.\1."),
           (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.attn_norm."),
           (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.", r"blocks.\1."),
           (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.ff_norm.")]
# llama.cpp's names for T5's encoder (city96's T5 GGUF files, architecture "t5encoder" or "t5") -> transformers'
T5_GGUF_ARCHITECTURES = ("t5encoder", "t5")
T5_GGUF_KEYS = [(r"^token_embd\.", "shared."), (r"^enc\.output_norm\.", "encoder.final_layer_norm."),
                (r"^enc\.blk\.(\d+)\.attn_rel_b\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
                (r"^enc\.blk\.(\d+)\.attn_([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
                (r"^enc\.blk\.(\d+)\.attn_norm\.", r"encoder.block.\1.layer.0.layer_norm."),
                (r"^enc\.blk\.(\d+)\.ffn_gate\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
                (r"^enc\.blk\.(\d+)\.ffn_up\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
                (r"^enc\.blk\.(\d+)\.ffn_down\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
                (r"^enc\.blk\.(\d+)\.ffn_norm\.", r"encoder.block.\1.layer.1.layer_norm.")]


def t5_gguf_names(tensors: Mapping[str, V]) -> dict[str, V]:
    """llama.cpp's T5 names -> transformers'; ffn_up is wi_1 beside a gate (T5 v1.1, FLUX's), else wi (v1.0)."""
    out = rename(tensors, T5_GGUF_KEYS)
    if not any(k.endswith(".DenseReluDense.wi_0.weight") for k in out):
        out = {k.replace(".DenseReluDense.wi_1.", ".DenseReluDense.wi."): v for k, v in out.items()}
    return out


def rename(state: Mapping[str, V], rules: list[tuple[str, str]]) -> dict[str, V]:
    out = {}
    for key, tensor in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = tensor
    return out
