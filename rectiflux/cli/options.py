"""The command line's argument types and option groups: one group per concern, shared by every command (and by
`rectiflux serve`), each value checked as it is parsed."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

MIN_SIDE = 16
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes any 64-bit unsigned value
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("int8", "int8-dynamic", "float8", "float8-dynamic")
BLOCKS = ("lazy", "memory", "stream")
KINDS = ("flux", "fill", "control", "kontext")


class UsageError(Exception):
    """Bad input from the user: exit status 2 and the message as the one line on stderr."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the usage block first; the contract is a single line, so main() prints it.
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------------------------
# argument types: each raises ArgumentTypeError, which argparse turns into "argument --flag: message"

def _whole(text: str, low: int, what: str, high: int | None = None) -> int:
    try:
        value = int(str(text).strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
    if value < low or (high is not None and value >= high):
        bound = f"from {low} to {high - 1}" if high is not None else f"at least {low}"
        raise argparse.ArgumentTypeError(f"{what} must be {bound}, got {value}")
    return value


def _real(text: str, what: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):  # nan would slip through every range check below
        raise argparse.ArgumentTypeError(f"{what} must be a finite number, got {text!r}")
    return value


def whole_type(what: str, low: int = 1):
    return lambda text: _whole(text, low, what)


def side_type(text: str) -> int:
    """An image side in pixels (the upper bound is the pipeline's, checked once it is imported)."""
    return _whole(text, MIN_SIDE, "the size in pixels")


def steps_type(text: str) -> int:
    return _whole(text, 1, "the number of steps")


def count_type(text: str) -> int:
    return _whole(text, 1, "the number of images")


def seed_type(text: str) -> int:
    return _whole(text, 0, "the seed", SEED_LIMIT)


def sequence_length_type(text: str) -> int:
    return _whole(text, 1, "the sequence length")


def strength_type(text: str) -> float:
    value = _real(text, "the strength")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"the strength must be in (0, 1], got {value}")
    return value


def guidance_type(text: str) -> float:
    return _real(text, "the guidance")


def _non_negative(what: str):
    def parse(text: str) -> float:
        value = _real(text, what)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{what} must be >= 0, got {value}")
        return value
    return parse


def lora_type(text: str) -> tuple[str, float]:
    """PATH[:SCALE]: a LoRA file and its weight (1 when left out)."""
    path, _, scale = str(text).rpartition(":")
    if path and scale:
        try:
            value = float(scale)
        except ValueError:
            return str(text), 1.0  # a colon that is part of the path
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"the LoRA scale must be a finite number, got {scale!r}")
        return path, value
    return str(text), 1.0


def lora_folder(tree: str | None) -> Path | None:
    """The LoRA folder of a --comfyui-models tree: ComfyUI's loras/ or Forge's Lora/, if it has one."""
    if not tree:
        return None
    return next((Path(tree) / name for name in ("loras", "Lora") if (Path(tree) / name).is_dir()), None)


def loras_in_tree(args: argparse.Namespace) -> None:
    """--lora given as a file name in the --comfyui-models tree's LoRA folder (where ComfyUI's and Forge's LoRA
    loaders look) becomes that file's path."""
    folder = lora_folder(getattr(args, "comfyui_models", None))
    if folder is None or not getattr(args, "loras", None):
        return
    args.loras = [(str(folder / path) if not Path(path).exists() and (folder / path).is_file() else path, scale)
                  for path, scale in args.loras]


cache_type = _non_negative("the cache threshold")
true_cfg_type = _non_negative("the true CFG scale")
scale_type = _non_negative("the scale")


# ----------------------------------------------------------------------------------------------------------------
# option groups

def model_options(p: argparse.ArgumentParser) -> None:
    """Which model, and how it is loaded and run."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="NAME_OR_PATH",
                   help="a diffusers FLUX folder, a BFL .safetensors (or .gguf) file, an all-in-one .safetensors "
                        "(ComfyUI checkpoint), a Hugging Face repo id already in the local cache, or an embedded "
                        "model (default: shapes, or the one transformer of --comfyui-models)")
    g.add_argument("--vae", metavar="PATH", help="for a BFL single file: its autoencoder (BFL ae.safetensors or a "
                                                 "diffusers vae/ folder; default: ae.safetensors beside the file)")
    g.add_argument("--text-encoders", metavar="PATH_OR_REPO",
                   help="for a BFL single file: a diffusers FLUX folder or repo id holding text_encoder, tokenizer, "
                        "text_encoder_2 and tokenizer_2 (default: the file's folder)")
    g.add_argument("--clip", metavar="FILE",
                   help="the CLIP-L text encoder as one .safetensors file (ComfyUI's clip_l.safetensors) or a "
                        "transformers folder; with --comfyui-models also a file name in its clip/ or text_encoders/")
    g.add_argument("--t5", metavar="FILE",
                   help="the T5 encoder as one .safetensors file (ComfyUI's t5xxl_fp16 or t5xxl_fp8_e4m3fn(_scaled)), "
                        "one .gguf file (city96's t5-v1_1-xxl-encoder) or a transformers folder; with "
                        "--comfyui-models also a file name in its clip/ or text_encoders/")
    g.add_argument("--tokenizers", metavar="DIR_OR_REPO",
                   help="for --clip/--t5 and all-in-one files, which carry none: a diffusers FLUX folder or repo id "
                        "in the local cache holding tokenizer/ and tokenizer_2/ (default: the model's folder, else "
                        "black-forest-labs/FLUX.1-dev or FLUX.1-schnell from the cache)")
    g.add_argument("--comfyui-models", metavar="DIR",
                   help="a ComfyUI models/ folder: the transformer from diffusion_models/ or unet/ (--model may name "
                        "a file there), --vae from vae/, --clip and --t5 from clip/ or text_encoders/, each told by "
                        "its tensors (other families' models beside them are passed over); where several fit, the "
                        "flag of that part chooses; --lora may name a file in its loras/. Forge's models/ folder "
                        "too (Stable-diffusion/, VAE/, text_encoder/, Lora/)")
    g.add_argument("--lora", type=lora_type, action="append", dest="loras", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA (any common format: diffusers/peft, kohya, XLabs, LyCORIS, ComfyUI) at SCALE "
                        "(default 1); repeatable, the LoRAs add up; with --comfyui-models also a file name in its "
                        "loras/")
    g.add_argument("--kind", choices=KINDS, help="the model's variant when its weights cannot tell (a BFL Kontext "
                                                 "file has FLUX.1-dev's keys; default: detected)")
    g.add_argument("--dtype", choices=DTYPES,
                   help="weights and compute type (default: auto, per model the fastest this machine offers within "
                        "35 dB of float32: bfloat16 on CUDA and on CPUs that multiply it faster, such as AVX-512-BF16 "
                        "or AMX, else float32; the PNG records what ran)")
    g.add_argument("--device", metavar="DEVICE", help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--quantize", choices=QUANTIZE, help="store the transformer blocks' linear layers in 8 bits "
                                                       "(-dynamic: 8-bit activations too; float8-dynamic is for "
                                                       "GPUs with fp8 units)")
    g.add_argument("--compile", action="store_true",
                   help="compile the transformer's blocks with torch.compile (the first image takes longer; "
                        "needs a C++ compiler on the CPU)")
    g.add_argument("--blocks", choices=BLOCKS, default="lazy",
                   help="when the transformer's blocks are read: at first use (lazy, default), all at load "
                        "(memory), or before every use and freed after it (stream: about one block in memory, "
                        "for machines that cannot hold the model)")


def sampling_options(p: argparse.ArgumentParser, with_strength: bool) -> None:
    """How the image is sampled."""
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=steps_type, metavar="N", help="denoising steps (default: the model's)")
    g.add_argument("--guidance", type=guidance_type, metavar="G",
                   help="distilled guidance scale (default: the model's; FLUX.1-schnell ignores it)")
    g.add_argument("--seed", type=seed_type, metavar="N", help="random seed (default: a random one, printed and "
                                                               "recorded in the PNG)")
    g.add_argument("--width", type=side_type, metavar="PX",
                   help="output width (default: the source image's, else the model's)")
    g.add_argument("--height", type=side_type, metavar="PX",
                   help="output height (default: the source image's, else the model's)")
    if with_strength:
        g.add_argument("--strength", type=strength_type, metavar="S",
                       help="how much to change the source, in (0, 1] (default: the model's)")
    g.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from (needs --true-cfg > 1)")
    g.add_argument("--true-cfg", type=true_cfg_type, metavar="SCALE",
                   help="true classifier-free guidance scale, used with --negative-prompt; above 1 it runs the "
                        "transformer twice per step (default: 1, off)")
    g.add_argument("--num-images", type=count_type, metavar="N",
                   help="how many images; image k uses seed+k-1 and is saved as NAME-k.png (default: 1)")
    g.add_argument("--max-sequence-length", type=sequence_length_type, metavar="TOKENS",
                   help="T5 tokens the prompt is padded to, at most 512 (default: the model's)")
    cache_option(g)


def cache_option(g) -> None:
    g.add_argument("--cache", type=cache_type, metavar="THRESHOLD",
                   help="step caching: skip the transformer's later blocks on steps whose first-block output "
                        "changed less than THRESHOLD since the last full step (0.1-0.2 typical; default: off)")


def output_options(p: argparse.ArgumentParser) -> None:
    """Where the images go, and how errors are shown."""
    g = p.add_argument_group("output")
    g.add_argument("--from-png", metavar="IMAGE.png",
                   help="take the recipe stored in a rectiflux PNG; options given here override its values")
    g.add_argument("--force", action="store_true",
                   help="with --from-png: use input images even if they changed since the recipe was written")
    g.add_argument("-o", "--output", metavar="FILE.png",
                   help="where to write (default: rectiflux-SEED.png in the current folder; a folder puts that "
                        "name there)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    debug_option(p)


def debug_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
