"""`rectiflux.load`: a whole pipeline from a diffusers folder, a BFL single file (completed by single-file parts), an
all-in-one file, a ComfyUI models/ tree, a repo id in the local HF cache or an embedded model, with its kind
(text-to-image, Fill, Control, Kontext) detected and its defaults read."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..flux.config import FluxConfig
from ..flux.layers import ATTENTIONS
from ..flux.text_encoders import TextEncoders
from ..sampling.schedule import SchedulerConfig
from ..weights.autoencoder import load_autoencoder
from ..weights.bundles import ARGUMENTS, NAMES, ComfyUIModels, find_models, is_comfyui_tree, read_models, width
from ..weights.checkpoint import CheckpointError, parse_dtype, read_json, read_keys_and_shapes
from ..weights.layout import is_diffusers_transformer
from ..weights.sources import default_tokenizers, resolve_source, resolve_tokenizers
from ..weights.text_encoders import load_clip, load_t5, load_text_encoders, load_tokenizers
from ..weights.transformer import BLOCK_MODES, load_transformer, read_config
from .flux import KINDS, Defaults, FluxPipeline

QUANTIZE_MODES = {"int8": ("int8", None), "int8-dynamic": ("int8", "int8"), "float8": ("float8", None),
                  "float8-dynamic": ("float8", "float8")}
# diffusers pipeline class -> kind
PIPELINE_CLASSES = {"FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
                    "FluxFillPipeline": "fill", "FluxControlPipeline": "control", "FluxKontextPipeline": "kontext"}


def in_channels_of(kind: str, latent_channels: int, downscale: int) -> int:
    """The transformer input width of a variant: packed noise, plus the conditioning it concatenates on channels."""
    base = 4 * latent_channels
    return {"flux": base, "kontext": base, "control": 2 * base, "fill": 2 * base + 4 * downscale ** 2}[kind]


def detect_kind(cfg: FluxConfig, latent_channels: int, downscale: int, name: str = "",
                pipeline_class: str | None = None, kind: str | None = None) -> str:
    """The variant a transformer is: from its input width, then (dev and Kontext share one) from the diffusers
    pipeline class, the file or folder name, or an explicit `kind`."""
    widths = {}
    for k in ("flux", "control", "fill"):
        widths.setdefault(in_channels_of(k, latent_channels, downscale), k)
    known = ", ".join(f"{w} ({'text-to-image or Kontext' if k == 'flux' else k})" for w, k in widths.items())
    if cfg.in_channels not in widths or cfg.out_channels != 4 * latent_channels:
        raise CheckpointError(f"a transformer with in_channels {cfg.in_channels} and out_channels {cfg.out_channels} "
                              f"is no FLUX.1 variant rectiflux knows (in_channels: {known})")
    found = widths[cfg.in_channels]
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if in_channels_of(kind, latent_channels, downscale) != cfg.in_channels:
            raise CheckpointError(f"kind {kind!r} needs in_channels {in_channels_of(kind, latent_channels, downscale)}"
                                  f", but this transformer has {cfg.in_channels} ({found})")
        return kind
    if found == "flux" and (PIPELINE_CLASSES.get(pipeline_class or "") == "kontext" or "kontext" in name.lower()):
        return "kontext"
    return found


def read_defaults(folder: Path | None, transformer_config: FluxConfig, downscale: int, kind: str,
                  name: str = "") -> Defaults:
    """The model's defaults: its rectiflux.json where it has one, else those of its kind (diffusers' own)."""
    d = Defaults()
    d.width = d.height = 128 * downscale  # diffusers' default_sample_size
    if not transformer_config.guidance_embed:  # schnell-like: few steps, no guidance, shorter T5 context
        d.steps, d.guidance, d.max_sequence_length = 4, 0.0, 256
    elif kind == "fill":
        d.steps, d.guidance = 50, 30.0
    elif kind == "control":  # BFL's recommendations: Depth 10, Canny 30
        d.steps, d.guidance = (30, 10.0) if "depth" in name.lower() else (50, 30.0)
    elif kind == "kontext":
        d.guidance = 2.5
    file = folder / "rectiflux.json" if folder is not None else None
    if file is None or not file.exists():
        return d
    fields = {f.name: f for f in dataclasses.fields(Defaults)}
    for key, value in read_json(file).items():
        if key == "kind":
            continue  # read by load()
        if key not in fields:
            raise CheckpointError(f"{file}: unknown setting {key!r} (known: {', '.join(fields)}, kind)")
        try:
            if key == "known_sizes":
                value = tuple((int(w), int(h)) for w, h in value)
            elif key == "known_words":
                value = frozenset(str(w) for w in value)
            else:
                kind_of = type(getattr(d, key))
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                        kind_of is int and value != int(value)):
                    raise ValueError(f"{value!r} is not a {kind_of.__name__}")
                value = kind_of(value)
                if value <= 0 and key != "guidance":
                    raise ValueError(f"{value!r} must be positive")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: bad value for {key}: {e}") from None
        setattr(d, key, value)
    d.__post_init__()
    return d


def _beside(path: Path, name: str) -> Path | None:
    found = path.parent / name
    return found if found.exists() else None


def _check_single_file(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """A diffusers transformer file handed over alone would load without its pipeline: say what to pass instead."""
    if not is_diffusers_transformer(read_keys_and_shapes(path) if shapes is None else shapes):
        return
    folder = path.parent.parent if path.parent.name == "transformer" else None
    if folder is not None and (folder / "model_index.json").exists():
        raise CheckpointError(f"{path} is the transformer of the diffusers folder {folder}: pass the folder")
    raise CheckpointError(f"{path} is a diffusers-layout transformer, not a BFL single file: pass the diffusers "
                          "pipeline folder that holds it (with model_index.json)")


def _same(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _transformer_source(source: str | os.PathLike | None, tree: ComfyUIModels | None
                        ) -> tuple[Path, ComfyUIModels | None]:
    """The transformer's path (a diffusers folder or a file) and the ComfyUI tree, if any: `source` as
    `resolve_source` reads it, a ComfyUI models/ folder (its one transformer), or with a tree a file name in its
    diffusion_models/ or unet/."""
    if tree is None:
        path = resolve_source("shapes" if source is None else source)
        if not is_comfyui_tree(path):
            return path, None
        tree, source = ComfyUIModels(path), None
    if source is not None and _same(Path(source), tree.root):
        source = None
    if source is not None:
        if Path(source).exists():
            return Path(source), tree
        found = tree.named("transformer", source)
        if found is not None:
            return found, tree
        try:
            return resolve_source(source), tree
        except CheckpointError:
            raise CheckpointError(f"no model {source}: not a path, nor a repo id in the local Hugging Face cache, "
                                  f"nor a file in {tree.where('transformer')}") from None
    found = tree.find("transformer")
    if found is None:
        raise CheckpointError(f"no FLUX transformer (.safetensors or .gguf) in {tree.where('transformer')}")
    return found[0], tree


def _named(value: str | os.PathLike, kind: str, tree: ComfyUIModels | None) -> Path:
    """A part the user named: a path, or with a ComfyUI tree a file name inside the folders of its kind."""
    path = Path(value)
    if path.exists() or tree is None:
        return path  # the loader names it if it is missing
    found = tree.named(kind, value)
    if found is None:
        raise CheckpointError(f"no {NAMES[kind]} {value}: not a path, nor a file in {tree.where(kind)}")
    return found


def _no_part(kind: str, path: Path, tree: ComfyUIModels | None, wide: int | None, how: str) -> CheckpointError:
    keyword, flag = ARGUMENTS[kind]
    where = ""
    if tree is not None:
        fitting = f"with {wide} latent channels" if kind == "vae" else f"{wide} wide"
        where = f", none {fitting} (the transformer's) is in {tree.where(kind)}" if wide else \
            f", none is in {tree.where(kind)}"
    return CheckpointError(f"no {NAMES[kind]} for {path}: pass {keyword}= ({flag}) {how}{where}")


def _check_width(kind: str, where: Path, wanted: int, transformer: Path, got: int | None = None) -> None:
    """Refuse a text encoder of another width than the transformer takes (SDXL's clip_g for CLIP-L, say), or an
    autoencoder of other latent channels (SDXL's); `got` None reads a single file's `width` off its header."""
    if got is None and where.is_file():
        models, shapes = read_models(where)
        got = width(shapes, kind, models[kind]) if kind in models else None
    if got is not None and got != wanted:
        keyword, flag = ARGUMENTS[kind]
        has = f"has {got} latent channels" if kind == "vae" else f"is {got} wide"
        raise CheckpointError(f"the {NAMES[kind]} {where} {has}, but the transformer {transformer} takes {wanted}: "
                              f"pass {keyword}= ({flag}) the one it was trained with")


def component_dtypes(dtype: torch.dtype | str | Mapping[str, torch.dtype | str] | None, device: torch.device,
                     width: int = 3072) -> dict[str, torch.dtype | None]:
    """The dtype of each of the transformer, the VAE and the text encoders: one for all, "auto" (the fastest
    arithmetic this machine has for each, rectiflux.runtime.kernels), or a mapping by component (what a recipe
    records of an "auto" run, so replaying it does not depend on a new measurement). `width` is the transformer's
    hidden size, which "auto" times its linears at."""
    from ..runtime.kernels import COMPONENTS, fastest_dtypes

    if isinstance(dtype, Mapping):
        if set(dtype) != set(COMPONENTS):
            raise ValueError(f"a dtype mapping names each of {', '.join(COMPONENTS)} (got {', '.join(sorted(dtype))})")
        return {k: parse_dtype(v) for k, v in dtype.items()}
    if dtype == "auto":
        return fastest_dtypes(device, width)
    return dict.fromkeys(COMPONENTS, parse_dtype(dtype))


def check_kernels(kernels: Mapping[str, str] | None, quantize: str | None) -> dict[str, str]:
    """`load`'s `kernels`, checked (ValueError naming what is wrong)."""
    from ..quantize.linear import INT8_PRODUCTS

    choices = {"attention": tuple(ATTENTIONS), "int8_products": INT8_PRODUCTS}
    kernels = dict(kernels or {})
    for name, value in kernels.items():
        if name not in choices:
            raise ValueError(f"unknown kernel choice {name!r}; use {' or '.join(choices)}")
        if value not in choices[name]:
            raise ValueError(f"{name} must be one of {', '.join(choices[name])}, got {value!r}")
    if "int8_products" in kernels and quantize != "int8-dynamic":
        raise ValueError("int8_products is a choice of quantize='int8-dynamic' only")
    return kernels


def load(source: str | os.PathLike | None = None,
         dtype: torch.dtype | str | Mapping[str, torch.dtype | str] | None = torch.float32,
         device: str | torch.device = "cpu", vae: str | os.PathLike | None = None,
         text_encoders: str | os.PathLike | None = None, quantize: str | None = None,
         blocks: str = "lazy", kind: str | None = None, *, clip: str | os.PathLike | None = None,
         t5: str | os.PathLike | None = None, tokenizers: str | os.PathLike | None = None,
         comfyui_models: str | os.PathLike | None = None, compile: bool | str = False,
         kernels: Mapping[str, str] | None = None) -> FluxPipeline:
    """Load a whole pipeline.

    `source` is a diffusers-layout folder, a BFL transformer .safetensors (or .gguf) file, an all-in-one
    .safetensors (ComfyUI's checkpoints: transformer, autoencoder and both text encoders in one file), a Hugging
    Face repo id in the local cache, or the name of an embedded model ('shapes', the default).
    A file's missing parts come from `vae=` (BFL's ae.safetensors or a diffusers vae/ folder), `text_encoders=` (a
    diffusers folder or repo id holding text_encoder, tokenizer, text_encoder_2 and tokenizer_2), or `clip=` and
    `t5=` (single .safetensors files such as ComfyUI's clip_l.safetensors and t5xxl_fp16.safetensors, or
    transformers folders) with `tokenizers=` (a diffusers FLUX folder or repo id holding tokenizer/ and
    tokenizer_2/; by default those beside the file, else black-forest-labs/FLUX.1-dev's or FLUX.1-schnell's from
    the local cache), each found beside the file when not given. `comfyui_models=` is a ComfyUI `models/` folder:
    the transformer in diffusion_models/ or unet/ (`source` may name a file there), the autoencoder in vae/, CLIP
    and T5 in clip/ or text_encoders/, each told by its tensors; where a folder holds several, the argument of
    that part chooses (a path or a file name there).
    The kind (text-to-image, Fill, Control or Kontext) is read off the transformer's input width and, for Kontext
    (which has dev's weights), the diffusers pipeline class or the name; `kind=` says it outright.
    `quantize` ("int8", "int8-dynamic" for int8 activations too, or "float8") stores the transformer blocks'
    linear layers in 8 bits with per-channel scales, each block as it is read; from a GGUF or fp8 file, quantised
    again from the weights the file means (fp8 weights asked for in float8 stay as stored).
    `blocks` says when the transformer's blocks are read from disk: "lazy" (at first use: loading takes the
    time to read the headers), "memory" (now) or "stream" (before every use and freed after it: peak memory
    is about one block, for machines that cannot hold the model; slower, since every step reads the file).
    `dtype` is one for all models, "auto" (per model the fastest arithmetic this machine offers whose images stay
    within 35 dB of float32's: bfloat16 where the CPU multiplies it faster, as with AVX-512-BF16 or AMX, and on
    CUDA; else float32), or a mapping {"transformer", "vae", "text_encoders"} -> dtype (`pipe.dtypes` says what
    ran). `compile=True` compiles the transformer's blocks with torch.compile (rectiflux.runtime.compile; on CUDA
    with CUDA graphs), a string names torch.compile's mode.
    `kernels` fixes the choices that this machine's timings make otherwise and that change pixels (`pipe.kernels`
    says what ran; a replayed recipe passes what it records): {"attention": "sdpa" or "by-head"} and, with
    int8-dynamic, {"int8_products": "int_mm", "fbgemm" or "dequant"}.
    """
    from .flux import check_device

    device = check_device(device)
    kernels = check_kernels(kernels, quantize)
    component_dtypes(dtype if dtype != "auto" else None, device)  # refuses a bad dtype before any file is read
    if blocks not in BLOCK_MODES:
        raise ValueError(f"unknown blocks mode {blocks!r}; use one of {', '.join(BLOCK_MODES)}")
    prepare = None
    if quantize is not None:
        from ..quantize.linear import block_quantizer

        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        if blocks == "stream":
            raise ValueError("quantize with blocks='stream' would quantise every block at every step; convert the "
                             "checkpoint once with rectiflux.quantize.quantize_file and stream that")
        prepare = block_quantizer(*QUANTIZE_MODES[quantize], product=kernels.get("int8_products"))
    tree = ComfyUIModels(comfyui_models) if comfyui_models is not None else None
    path, tree = _transformer_source(source, tree)
    pipeline_class, folder, parts = None, None, {}
    if path.is_file():  # a BFL single file, a GGUF file, or an all-in-one file
        if path.suffix == ".gguf":
            parts = {"transformer": ""}
        else:
            shapes = read_keys_and_shapes(path)
            _check_single_file(path, shapes)
            parts = find_models(shapes, path)
            if "transformer" not in parts and parts:
                held = ", ".join(NAMES[k] for k in parts)
                raise CheckpointError(f"{path} holds no FLUX transformer (it holds: {held}); pass it as "
                                      f"{'/'.join(ARGUMENTS[k][0] + '=' for k in parts)} and the transformer as source")
        transformer_path = path
    else:
        if not (path / "transformer").is_dir():
            raise CheckpointError(f"{path} is not a diffusers FLUX folder (no transformer/ subfolder)")
        transformer_path, folder = path / "transformer", path
        if (path / "model_index.json").exists():
            pipeline_class = read_json(path / "model_index.json").get("_class_name")
        if kind is None and (path / "rectiflux.json").exists():
            kind = read_json(path / "rectiflux.json").get("kind")
    # where the transformer shares its file (an all-in-one checkpoint), only the tensors under its prefix are its
    prefix = {"prefix": parts["transformer"]} if len(parts) > 1 else {}
    _, transformer_config, _ = read_config(transformer_path, **prefix)
    dtypes = component_dtypes(dtype, device, transformer_config.hidden_size)

    # what each part must have to fit the transformer (bundles.width)
    widths = {"clip": transformer_config.pooled_projection_dim, "t5": transformer_config.joint_attention_dim,
              "vae": transformer_config.out_channels // 4}
    # where each part comes from: what is named, else what the source holds, else the ComfyUI tree, else beside
    if vae:
        vae_path = _named(vae, "vae", tree)
    elif "vae" in parts or folder is not None:
        vae_path = path if folder is None else path / "vae"
    else:
        found = tree.find("vae", widths["vae"]) if tree is not None else None
        vae_path = found[0] if found else _beside(path, "ae.safetensors") or _beside(path, "ae.sft")
        if vae_path is None:
            raise _no_part("vae", path, tree, widths["vae"] if tree is not None else None,
                           "the BFL ae.safetensors or a diffusers vae/ folder (none is beside the file)")
    encoders_dir = resolve_source(text_encoders) if text_encoders else None

    def encoder_path(part: str, named) -> Path | None:
        if named:
            return _named(named, part, tree)
        if encoders_dir is not None or folder is not None:
            return None  # from the diffusers folder
        if part in parts:
            return path
        found = tree.find(part, widths[part]) if tree is not None else None
        return found[0] if found else None

    clip_path, t5_path = encoder_path("clip", clip), encoder_path("t5", t5)
    base = encoders_dir or (path if folder is not None else path.parent)  # a diffusers folder's encoders
    single = clip_path is not None or t5_path is not None or tokenizers is not None
    tokenizer_pair = None
    if not single and folder is None and not (base / "text_encoder_2").is_dir():
        raise CheckpointError(f"no text encoders for the BFL file {path}: pass text_encoders= (--text-encoders) a "
                              f"diffusers FLUX folder or repo id holding text_encoder, tokenizer, text_encoder_2, "
                              f"tokenizer_2 (none is beside the file), or clip= (--clip), t5= (--t5) and "
                              f"tokenizers= (--tokenizers)")
    if single:
        how = {"clip": "a .safetensors file (ComfyUI's clip_l.safetensors) or a transformers folder",
               "t5": "a .safetensors file (ComfyUI's t5xxl_fp16.safetensors) or a transformers folder"}
        if clip_path is None:
            clip_path = base / "text_encoder"
            if not (clip_path / "config.json").exists():
                raise _no_part("clip", path, tree, widths["clip"] if tree is not None else None, how["clip"])
        if t5_path is None:
            t5_path = base / "text_encoder_2"
            if not (t5_path / "config.json").exists():
                raise _no_part("t5", path, tree, widths["t5"] if tree is not None else None, how["t5"])
        if tokenizers:
            tokenizer_dir = resolve_tokenizers(tokenizers)
        elif (base / "tokenizer").is_dir() and (base / "tokenizer_2").is_dir():
            tokenizer_dir = base
        else:
            tokenizer_dir = default_tokenizers()
        if tokenizer_dir is None:
            raise CheckpointError(f"no tokenizers for the text encoders of {path} (single files carry none): pass "
                                  "tokenizers= (--tokenizers) a diffusers FLUX folder or a repo id in the local "
                                  "Hugging Face cache holding tokenizer/ and tokenizer_2/ (black-forest-labs/"
                                  "FLUX.1-dev's or FLUX.1-schnell's are used when the cache has them)")
        tokenizer_pair = load_tokenizers(tokenizer_dir)
        for part, where in (("clip", clip_path), ("t5", t5_path)):
            _check_width(part, where, widths[part], path)  # before any weight is read

    autoencoder = load_autoencoder(vae_path, dtype=dtypes["vae"])
    cfg = autoencoder.config
    _check_width("vae", vae_path, widths["vae"], path, cfg.latent_channels)
    found = detect_kind(transformer_config, cfg.latent_channels, cfg.downscale, path.name, pipeline_class, kind)
    transformer = load_transformer(transformer_path, dtype=dtypes["transformer"], blocks=blocks, prepare=prepare,
                                   **prefix)
    if folder is not None and (folder / "scheduler" / "scheduler_config.json").exists():
        scheduler = SchedulerConfig.from_diffusers(read_json(folder / "scheduler" / "scheduler_config.json"))
    else:
        dev_like = transformer_config.guidance_embed
        scheduler = SchedulerConfig(shift=3.0 if dev_like else 1.0, use_dynamic_shifting=dev_like)
    if tokenizer_pair is None:
        encoders = load_text_encoders(base, dtype=dtypes["text_encoders"])
    else:
        clip_model = load_clip(clip_path, dtypes["text_encoders"])
        t5_model = load_t5(t5_path, dtypes["text_encoders"])
        _check_width("clip", clip_path, widths["clip"], path, clip_model.config.hidden_size)
        _check_width("t5", t5_path, widths["t5"], path, t5_model.config.d_model)
        encoders = TextEncoders(clip_model, tokenizer_pair[0], t5_model, tokenizer_pair[1])
    defaults = read_defaults(folder, transformer_config, cfg.downscale, found, path.name)
    pipe = FluxPipeline(transformer.to(device), autoencoder.to(device), encoders.to(device), scheduler, defaults,
                        name=path.name, kind=found)
    pipe.source = path
    if quantize == "int8-dynamic":
        from ..quantize.linear import use_int8_dynamic_attention

        if "attention" not in kernels:
            use_int8_dynamic_attention(pipe.transformer)
    if "attention" in kernels:
        pipe.transformer.attention = ATTENTIONS[kernels["attention"]]
    if compile:
        from ..runtime.compile import compile_blocks

        compile_blocks(pipe.transformer, compile if isinstance(compile, str) else
                       "reduce-overhead" if device.type == "cuda" else None)
    return pipe
