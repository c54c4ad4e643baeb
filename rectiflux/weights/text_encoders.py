"""Text-encoder checkpoints: transformers' CLIPTextModel and T5EncoderModel folders (safetensors) and their
tokenizers, read into our CLIPTextEncoder and T5Encoder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import CLIPTokenizerFast, T5TokenizerFast

from ..flux.text_encoders import CLIPConfig, CLIPTextEncoder, T5Config, T5Encoder, TextEncoders
from .checkpoint import CheckpointError, load_into, parse_dtype, read_json, read_state_dict
from .layout import CLIP_KEYS, T5_KEYS, rename

SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def _build(make, folder: Path, what: str):
    """Read a config.json and build the model on the meta device, refusing a bad config with the file's name."""
    settings = read_json(folder / "config.json")
    try:
        with torch.device("meta"):
            return make(settings)
    except (KeyError, TypeError, ValueError) as e:
        problem = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{what} config {folder / 'config.json'}: {problem}") from None


def load_clip(folder: str | os.PathLike, dtype: torch.dtype | str | None = None) -> CLIPTextEncoder:
    """A transformers CLIPTextModel folder (config.json + safetensors); dtype None keeps the stored one."""
    folder = Path(folder)
    model = _build(lambda d: CLIPTextEncoder(CLIPConfig.from_transformers(d)), folder, "CLIP")
    state = rename(read_state_dict(folder), CLIP_KEYS)
    state.pop("position_ids", None)  # older transformers saved this constant buffer
    return load_into(model, state, parse_dtype(dtype), f"CLIP text encoder {folder}").eval()


def load_t5(folder: str | os.PathLike, dtype: torch.dtype | str | None = None) -> T5Encoder:
    """A transformers T5EncoderModel folder; dtype None keeps the stored one. In float16 the output
    projections `wo` stay float32, as transformers keeps them (T5's activations overflow float16 there)."""
    folder = Path(folder)
    model = _build(lambda d: T5Encoder(T5Config.from_transformers(d)), folder, "T5")
    raw = read_state_dict(folder)
    if "shared.weight" in raw:  # the encoder's own copy of the tied embedding is redundant then
        raw.pop("encoder.embed_tokens.weight", None)
    state = rename(raw, T5_KEYS)
    dtype = parse_dtype(dtype)
    stored = state["shared.weight"].dtype if "shared.weight" in state else None
    if (dtype or stored) == torch.float16:  # wo from the stored values, not via float16
        state = {k: v.float() if k.endswith(".wo.weight") else v.half() for k, v in state.items()}
        dtype = None
    return load_into(model, state, dtype, f"T5 encoder {folder}").eval()


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
