"""FLUX's two text encoders: CLIP-L for the pooled vector, T5 for the token sequence.

Loaded from a diffusers-layout folder (text_encoder, tokenizer, text_encoder_2, tokenizer_2) with
transformers, local files only. `encode` reproduces diffusers' `FluxPipeline.encode_prompt`
bit for bit, except that a prompt too long for T5 is an error instead of a silent truncation:
T5 carries everything the image is conditioned on, so a dropped tail is a dropped instruction.
CLIP still truncates at 77 tokens without a word, as everywhere else: only its pooled summary
is used.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers import CLIPTextModel, CLIPTokenizerFast, T5EncoderModel, T5TokenizerFast

from .checkpoint import CheckpointError, parse_dtype

SUBFOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
MAX_T5_LENGTH = 512  # T5's relative positions were trained up to this length; diffusers refuses more too

# transformers renamed `torch_dtype` to `dtype` in 4.56 and warns about the old name from 5.0 on.
_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])
_DTYPE_KWARG = "dtype" if _VERSION >= (4, 56) else "torch_dtype"


class TextEncoders:
    """CLIP + T5 with their tokenizers; `encode` gives (prompt_embeds, pooled_prompt_embeds)."""

    def __init__(
        self, clip: CLIPTextModel, clip_tokenizer: CLIPTokenizerFast, t5: T5EncoderModel, t5_tokenizer: T5TokenizerFast
    ) -> None:
        self.clip, self.clip_tokenizer = clip.eval(), clip_tokenizer
        self.t5, self.t5_tokenizer = t5.eval(), t5_tokenizer

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> TextEncoders:
        """Load from a diffusers FLUX folder; dtype None keeps each model's stored dtype."""
        folder = Path(folder)
        missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
        if missing:
            raise CheckpointError(
                f"{folder} has no {', '.join(missing)} subfolder(s); expected the diffusers FLUX layout "
                f"({', '.join(SUBFOLDERS)})"
            )
        # "auto" reads the dtype from each config, which is what transformers 5 does by default anyway.
        model_kw = {_DTYPE_KWARG: parse_dtype(dtype) or "auto", "local_files_only": True, "use_safetensors": True}
        return cls(
            CLIPTextModel.from_pretrained(folder / "text_encoder", **model_kw).to(device),
            CLIPTokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True),
            T5EncoderModel.from_pretrained(folder / "text_encoder_2", **model_kw).to(device),
            T5TokenizerFast.from_pretrained(folder / "tokenizer_2", local_files_only=True),
        )

    def check(self, prompt: str | list[str], prompt_2: str | list[str] | None = None,
              max_sequence_length: int = 512) -> tuple[list[str], list[str]]:
        """Refuse prompts T5 cannot take whole (tokenizers only, no model runs); returns the prompt lists."""
        if not 1 <= max_sequence_length <= MAX_T5_LENGTH:
            raise ValueError(f"max_sequence_length must be between 1 and {MAX_T5_LENGTH}, got {max_sequence_length}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # `or`, not `is None`, on purpose: diffusers also falls back to prompt for "" and [].
        t5_name = "prompt_2" if prompt_2 else "prompt"
        prompt_2 = prompt_2 or prompt
        prompts_2 = [prompt_2] if isinstance(prompt_2, str) else list(prompt_2)
        if len(prompts_2) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(prompts_2)} prompt_2 values")

        # T5 counts its end-of-sequence token too; that is what has to fit.
        for i, ids in enumerate(self.t5_tokenizer(prompts_2, verbose=False).input_ids):
            if len(ids) > max_sequence_length:
                where = t5_name if len(prompts_2) == 1 else f"{t5_name} {i}"
                raise ValueError(
                    f"{where} is {len(ids)} T5 tokens, longer than max_sequence_length {max_sequence_length}; "
                    f"shorten it or raise --max-sequence-length (at most {MAX_T5_LENGTH})"
                )

        return prompts, prompts_2

    @torch.no_grad()
    def encode(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 512,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B*n, max_sequence_length, T5 dim), pooled_prompt_embeds (B*n, CLIP dim)).

        prompt goes to CLIP, prompt_2 (default: prompt) to T5. Rows repeat per prompt: p0, p0, p1, p1.
        """
        prompts, prompts_2 = self.check(prompt, prompt_2, max_sequence_length)
        clip_ids = self.clip_tokenizer(
            prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            prompts_2, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        # No attention mask, as in FLUX: the padding tokens' states are part of the conditioning.
        embeds = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False).last_hidden_state
        # Cast like diffusers does (T5 keeps some layers in float32 when loaded in float16).
        pooled, embeds = pooled.to(self.clip.dtype), embeds.to(self.t5.dtype)
        return (
            embeds.repeat_interleave(num_images_per_prompt, dim=0),
            pooled.repeat_interleave(num_images_per_prompt, dim=0),
        )
