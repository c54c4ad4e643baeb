"""Which models a safetensors file holds, told by its tensor names (never by its file name), and ComfyUI's
`models/` tree (or Forge's).

ComfyUI's files nest each model under a prefix: a checkpoint holding everything keeps the transformer under
`model.diffusion_model.`, the autoencoder under `vae.` or `first_stage_model.`, CLIP under
`text_encoders.clip_l.transformer.` (older ones `cond_stage_model.`...) and T5 under `text_encoders.t5xxl.transformer.`;
its single text-encoder files (`clip_l.safetensors`, `t5xxl_fp16.safetensors`) carry transformers' names with or
without such prefixes. Each model is found by one tensor only it has, and what precedes that tensor's name is its
prefix; every tensor then belongs to the model with the longest prefix it starts with.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from .checkpoint import SAFETENSORS_SUFFIXES, CheckpointError, read_keys_and_shapes
from .layout import T5_GGUF_ARCHITECTURES, is_scaled_fp8_marker, t5_gguf_names

KINDS = ("transformer", "vae", "clip", "t5")
NAMES = {"transformer": "FLUX transformer", "vae": "autoencoder", "clip": "CLIP text encoder", "t5": "T5 encoder"}
# how the user names each part: load()'s keyword and the command line's flag
ARGUMENTS = {"transformer": ("source", "--model"), "vae": ("vae", "--vae"), "clip": ("clip", "--clip"),
             "t5": ("t5", "--t5")}

# the tensor that marks each model (group 1: its prefix); both transformer layouts, both autoencoder layouts
_ANCHORS = {
    "transformer": [re.compile(r"^(.*?)img_in\.weight$"), re.compile(r"^(.*?)x_embedder\.weight$")],
    "vae": [re.compile(r"^(.*?)encoder\.conv_in\.weight$")],
    "clip": [re.compile(r"^(.*?)(?:text_model\.)?embeddings\.token_embedding\.weight$")],
    "t5": [re.compile(r"^(.*?)(?:encoder\.)?block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$")],
}
# a second tensor each must have under the same prefix, so that one stray name does not make a model
_PARTNERS = {"transformer": ("txt_in.weight", "context_embedder.weight"), "vae": ("decoder.conv_in.weight",)}
# among several models of a kind in one file (SD3's clip_l and clip_g), the one FLUX uses
_PREFERRED = {"clip": "clip_l", "t5": "t5xxl"}


def _candidates(keys: Iterable[str]) -> dict[str, list[str]]:
    keys = set(keys)
    found: dict[str, list[str]] = {}
    for kind, patterns in _ANCHORS.items():
        for key in sorted(keys):
            for pattern in patterns:
                m = pattern.match(key)
                if m is None:
                    continue
                prefix = m[1]
                if kind in _PARTNERS and not any(prefix + p in keys for p in _PARTNERS[kind]):
                    continue
                if prefix not in found.get(kind, []):
                    found.setdefault(kind, []).append(prefix)
    return found


def find_models(keys: Iterable[str], file: str | os.PathLike | None = None) -> dict[str, str]:
    """kind ("transformer", "vae", "clip", "t5") -> the prefix its tensors carry ("" for none), for each model the
    tensor names (e.g. `read_keys_and_shapes(file)`) hold. Of several CLIPs or T5s, the one named like FLUX's
    (clip_l, t5xxl) is taken; several of another kind are refused."""
    out = {}
    for kind, prefixes in _candidates(keys).items():
        if len(prefixes) > 1:
            preferred = [p for p in prefixes if _PREFERRED.get(kind, "\0") in p]
            if len(preferred) != 1:
                where = f"{file} holds" if file is not None else "the tensors hold"
                raise CheckpointError(f"{where} several {NAMES[kind]}s (under {', '.join(map(repr, prefixes))}); "
                                      "pass the one to use on its own (or its prefix as prefix=)")
            prefixes = preferred
        out[kind] = prefixes[0]
    return out


def owner(key: str, models: Mapping[str, str]) -> str | None:
    """The model a tensor belongs to: the one with the longest prefix the name starts with."""
    best = None
    for kind, prefix in models.items():
        if key.startswith(prefix) and (best is None or len(prefix) > len(models[best])):
            best = kind
    return best


def select(state: Mapping[str, object], kind: str, models: Mapping[str, str]) -> dict[str, object]:
    """The tensors of one model of `models` (from `find_models`), their prefix dropped.

    The text encoders keep only their encoder's tensors: CLIP's `text_model.` (the projection and logit scale a
    CLIPModel file also holds are not used by FLUX), T5's `encoder.` and `shared.` (a full T5's decoder is not);
    ComfyUI's scaled-fp8 marker is dropped too.
    """
    prefix = models[kind]
    mine = {k[len(prefix):]: v for k, v in state.items() if owner(k, models) == kind and not is_scaled_fp8_marker(k)}
    if kind == "clip":
        roots = ("text_model.",) if any(k.startswith("text_model.") for k in mine) else (
            "embeddings.", "encoder.", "final_layer_norm.")
        mine = {k: v for k, v in mine.items() if k.startswith(roots)}
    elif kind == "t5":
        roots = ("encoder.", "shared.") if any(k.startswith("encoder.block.") for k in mine) else (
            "block.", "final_layer_norm.", "embed_tokens.", "shared.")
        mine = {k: v for k, v in mine.items() if k.startswith(roots)}
    return mine


def read_models(file: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """`find_models` of a file and its tensors' shapes, from its header: a safetensors file, or a GGUF file by its
    architecture (a FLUX transformer, or a T5 encoder whose llama.cpp names are given as transformers' here).
    Without the gguf package a GGUF file's architecture cannot be read: it counts as a transformer, and loading it
    then names the package."""
    file = Path(file)
    if file.suffix != ".gguf":
        shapes = read_keys_and_shapes(file)
        return find_models(shapes, file), shapes
    try:
        import gguf  # noqa: F401
    except ImportError:
        return {"transformer": ""}, {}
    from ..quantize.gguf import read_gguf

    contents = read_gguf(file)
    shapes = {k: shape for k, (_, shape, _) in contents.tensors.items()}
    if contents.architecture == "flux":
        return {"transformer": ""}, shapes
    if contents.architecture in T5_GGUF_ARCHITECTURES:
        return {"t5": ""}, t5_gguf_names(shapes)
    return {}, shapes


def width(shapes: Mapping[str, tuple[int, ...]], kind: str, prefix: str) -> int | None:
    """What must match the transformer, or None where the shapes do not say: a text encoder's width (CLIP's hidden
    size, T5's d_model, from its embedding), an autoencoder's latent channels (SD and SDXL ones have 4, FLUX's 16;
    the encoder's last convolution gives a mean and a log-variance for each)."""
    if kind == "vae":
        conv = shapes.get(prefix + "encoder.conv_out.weight")
        return conv[0] // 2 if conv is not None and len(conv) == 4 else None
    names = {"clip": ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
             "t5": ("shared.weight", "encoder.embed_tokens.weight", "embed_tokens.weight")}[kind]
    for name in names:
        if prefix + name in shapes and len(shapes[prefix + name]) == 2:
            return shapes[prefix + name][1]
    return None


def is_umt5(keys: Iterable[str], prefix: str = "") -> bool:
    """UMT5 (Wan's umt5-xxl, as wide as T5-XXL) has a relative attention bias in every layer; FLUX's T5 v1.1 only
    in the first."""
    return any(prefix + f"{root}block.1.layer.0.SelfAttention.relative_attention_bias.weight" in keys
               for root in ("", "encoder."))


# ----------------------------------------------------------------------------------------------------------------
# ComfyUI's models/ tree, and Forge's

# where each kind lies: ComfyUI's folders, then Forge's (Stable-diffusion/, VAE/, text_encoder/)
FOLDERS = {"transformer": ("diffusion_models", "unet", "checkpoints", "Stable-diffusion"), "vae": ("vae", "VAE"),
           "clip": ("clip", "text_encoders", "text_encoder"), "t5": ("clip", "text_encoders", "text_encoder")}
TRANSFORMER_FOLDERS = ("diffusion_models", "unet", "Stable-diffusion")  # one of them makes a folder a tree


def is_comfyui_tree(path: Path) -> bool:
    """A ComfyUI (or Forge) `models/` folder, not a diffusers one: it has diffusion_models/, unet/ or
    Stable-diffusion/ and no transformer/."""
    return (path.is_dir() and not (path / "transformer").is_dir()
            and any((path / name).is_dir() for name in TRANSFORMER_FOLDERS))


class ComfyUIModels:
    """The models of a ComfyUI `models/` tree, each file identified by its tensor names and shapes: transformers
    in diffusion_models/, unet/ (.safetensors, .sft or .gguf) or checkpoints/, autoencoders in vae/, CLIP and T5 in
    clip/ or text_encoders/ (T5 in GGUF too). Files that cannot be read are passed over, and so are the other
    families' models a tree holds beside FLUX's: GGUF files of another architecture, autoencoders and text encoders
    that do not fit the transformer (SDXL's, say), UMT5."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"no ComfyUI models folder at {self.root} (comfyui_models= / --comfyui-models)")
        self._seen: dict[Path, tuple[dict[str, str], dict[str, tuple[int, ...]]] | None] = {}

    def _read(self, file: Path):
        if file not in self._seen:
            try:
                self._seen[file] = read_models(file)
            except CheckpointError:
                self._seen[file] = None
        return self._seen[file]

    def files(self, kind: str) -> list[Path]:
        suffixes = (*SAFETENSORS_SUFFIXES, ".gguf")
        found, real = [], set()
        for folder in FOLDERS[kind]:
            for file in sorted((self.root / folder).rglob("*")) if (self.root / folder).is_dir() else []:
                if file.suffix in suffixes and file.is_file() and file.resolve() not in real:
                    real.add(file.resolve())  # unet/ is often a link to diffusion_models/
                    found.append(file)
        return found

    def candidates(self, kind: str, wide: int | None = None) -> list[tuple[Path, str]]:
        """(file, prefix) of each file holding a model of `kind`; only those whose `width` is `wide` when given."""
        out = []
        for file in self.files(kind):
            seen = self._read(file)
            if seen is None or kind not in seen[0]:
                continue
            models, shapes = seen
            if wide is not None and width(shapes, kind, models[kind]) not in (None, wide):
                continue
            if kind == "t5" and is_umt5(shapes, models[kind]):
                continue
            out.append((file, models[kind]))
        return out

    def named(self, kind: str, name: str | os.PathLike) -> Path | None:
        """A file the user named: a path, or a name inside the kind's folders."""
        for folder in FOLDERS[kind]:
            file = self.root / folder / name
            if file.is_file():
                return file
        return None

    def find(self, kind: str, wide: int | None = None) -> tuple[Path, str] | None:
        """The one model of `kind` in the tree; None when there is none; several are refused, listed."""
        found = self.candidates(kind, wide)
        if len(found) > 1:
            names = ", ".join(str(f.relative_to(self.root)) for f, _ in found)
            keyword, flag = ARGUMENTS[kind]
            raise CheckpointError(f"{self.root} holds several {NAMES[kind]}s: {names}; choose one with {keyword}= "
                                  f"({flag})")
        return found[0] if found else None

    def where(self, kind: str) -> str:
        """The folders of `kind` this tree has (all it could have, if none)."""
        folders = [f for f in FOLDERS[kind] if (self.root / f).is_dir()] or FOLDERS[kind]
        return ", ".join(f"{self.root / f}/" for f in folders)
