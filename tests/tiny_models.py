"""Tiny random FLUX pipelines in the diffusers folder layout, built offline for tests.

Nothing here touches the network: both tokenizers are written from a small hand-made vocabulary
(shapes-world words plus every letter, digit and punctuation mark) and every model gets seeded
random weights. The folder is what `diffusers.FluxPipeline.save_pretrained` writes, so it is also
exactly what `FluxPipeline.from_pretrained` reads back, and it doubles as a stand-in for a real
FLUX checkpoint folder in the tests of our own loaders.

Building takes about a second; `make_tiny_flux_folder` builds each configuration once per process
and copies the result, so a test may modify its copy freely.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from rectiflux.shapes.tokenizers import CLIP_MAX_LENGTH, T5_MAX_LENGTH, WORDS, build_t5_tokenizer, write_clip_tokenizer  # noqa: F401

VARIANTS = {"flux": FluxPipeline, "fill": FluxFillPipeline, "control": FluxControlPipeline,
            "kontext": FluxKontextPipeline}


def _build(
    folder: Path,
    *,
    guidance_embeds: bool,
    num_layers: int,
    num_single_layers: int,
    attention_head_dim: int,
    num_attention_heads: int,
    axes_dims_rope: tuple[int, ...],
    joint_attention_dim: int,
    pooled_projection_dim: int,
    vae_block_out_channels: tuple[int, ...],
    latent_channels: int,
    vae_norm_num_groups: int,
    text_layers: int,
    seed: int,
    variant: str = "flux",
) -> None:
    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(f"axes_dims_rope {axes_dims_rope} must sum to attention_head_dim {attention_head_dim}")

    # The CLIP tokenizer is read back from vocab.json / merges.txt, the files a real FLUX folder has.
    clip_vocab = write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    tokenizer_2 = build_t5_tokenizer()

    # Each model is seeded on its own so changing one part of the config leaves the others' weights alone.
    torch.manual_seed(seed)
    n_blocks = len(vae_block_out_channels)
    downscale = 2 ** (n_blocks - 1)
    # latents are packed 2x2 into the channel axis; Fill and Control read their conditioning on channels too
    in_channels = {"flux": 1, "kontext": 1, "control": 2}.get(variant, 2) * 4 * latent_channels
    if variant == "fill":
        in_channels += 4 * downscale ** 2  # the pixel mask, each downscale x downscale block folded, packed 2x2
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=axes_dims_rope,
    )
    torch.manual_seed(seed + 1)
    # FLUX's VAE has 4 blocks (8x); here vae_scale_factor = 2 ** (n_blocks - 1).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=tuple(vae_block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=vae_norm_num_groups,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=pooled_projection_dim,
            intermediate_size=2 * pooled_projection_dim,
            num_hidden_layers=text_layers,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=joint_attention_dim,
            d_kv=8,
            d_ff=2 * joint_attention_dim,
            num_layers=text_layers,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as in FLUX's T5-XXL
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )
    pipe = VARIANTS[variant](
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # Make the tokenizer folders look like FLUX.1-dev's: transformers 5 saves CLIP as tokenizer.json
    # (and records `local_files_only` in its config), the real repo ships vocab.json + merges.txt.
    shutil.rmtree(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]  # the real name; an alias in transformers 5
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@functools.cache
def _cached(**kwargs) -> Path:
    root = tempfile.mkdtemp(prefix="tiny-flux-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = Path(root) / "model"
    _build(folder, **kwargs)
    return folder


def make_tiny_flux_folder(
    path: str | Path,
    *,
    guidance_embeds: bool = True,
    num_layers: int = 1,
    num_single_layers: int = 2,
    attention_head_dim: int = 8,
    num_attention_heads: int = 2,
    axes_dims_rope: tuple[int, int, int] = (2, 2, 4),
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 32,
    vae_block_out_channels: tuple[int, ...] = (16, 32),
    latent_channels: int = 16,
    vae_norm_num_groups: int = 8,
    text_layers: int = 2,
    seed: int = 0,
    variant: str = "flux",
) -> Path:
    """Write a complete tiny random FLUX pipeline (diffusers layout, safetensors) to `path` and return it.

    `guidance_embeds=True` mimics FLUX.1-dev (the scheduler always has dev's dynamic shifting). `variant` is
    "flux", "fill", "control" or "kontext": the transformer's input width and the pipeline class follow it.
    The VAE downsamples by 2 ** (len(vae_block_out_channels) - 1), so the defaults give 2x and image
    sides must be multiples of 4. Each configuration is built once per process, then copied.
    """
    cached = _cached(
        guidance_embeds=guidance_embeds,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        axes_dims_rope=tuple(axes_dims_rope),
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        vae_block_out_channels=tuple(vae_block_out_channels),
        latent_channels=latent_channels,
        vae_norm_num_groups=vae_norm_num_groups,
        text_layers=text_layers,
        seed=seed,
        variant=variant,
    )
    path = Path(path)
    shutil.copytree(cached, path, dirs_exist_ok=True)
    return path


def make_tiny_redux_folder(path: str | Path, *, joint_attention_dim: int = 32, seed: int = 0) -> Path:
    """A tiny random FLUX.1-Redux folder as diffusers' FluxPriorReduxPipeline saves it: SigLIP (image_encoder/,
    feature_extractor/) and the projector (image_embedder/) into T5's width `joint_attention_dim`."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:
        from transformers import SiglipImageProcessor as Processor

    torch.manual_seed(seed)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=32, patch_size=8))
    processor = Processor(size={"height": 32, "width": 32})
    torch.manual_seed(seed + 1)
    embedder = ReduxImageEncoder(redux_dim=16, txt_in_features=joint_attention_dim)
    path = Path(path)
    FluxPriorReduxPipeline(image_encoder=encoder.eval(), feature_extractor=processor,
                           image_embedder=embedder.eval()).save_pretrained(path, safe_serialization=True)
    return path
