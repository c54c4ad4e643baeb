"""The `rectiflux` command line: text-to-image, img2img and inpainting, each PNG carrying the recipe that made it.

Contract kept by every command:
  * bad input exits with status 2 and exactly one line on stderr, `rectiflux: error: ...` (`--debug` adds the
    traceback); anything else that goes wrong exits with 1, also in one line;
  * everything that can be checked without the model (sizes, numbers, input files, the output names) is checked
    before the model is loaded, which takes minutes for a full-size FLUX;
  * an output file appears whole or not at all (written to a temporary file beside it, then renamed), and an
    existing file is only replaced with `--overwrite`;
  * stdout gets one summary line at the end; the progress bar goes to stderr, and only when stderr is a terminal.

Heavy imports (torch through the pipeline, transformers) happen inside the functions that need them, so that
`--help` and argument errors stay quick.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import secrets
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import __version__

PROG = "rectiflux"
MODES = ("generate", "img2img", "inpaint")
DTYPES = ("float32", "bfloat16", "float16")
MIN_SIDE = 16
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes any 64-bit unsigned value
RANDOM_SEED_LIMIT = 2**32  # random seeds stay short enough to read out and type back
VERSION_KEY = "rectiflux_version"  # the key that marks a PNG as holding a rectiflux recipe
HASH_CHUNK = 8 << 20


class UsageError(Exception):
    """Bad input from the user: exit status 2 and the message as the one line on stderr."""


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


def cache_type(text: str) -> float:
    value = _real(text, "the cache threshold")
    if value < 0:
        raise argparse.ArgumentTypeError(f"the cache threshold must be >= 0, got {value}")
    return value


def true_cfg_type(text: str) -> float:
    value = _real(text, "the true CFG scale")
    if value < 0:
        raise argparse.ArgumentTypeError(f"the true CFG scale must be >= 0, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# the parser

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the usage block first; the contract is a single line, so main() prints it.
        raise UsageError(message)


def _common_options(with_image: bool, with_mask: bool) -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="what to draw (may be left out with --from-png, which supplies it)")
    if with_image:
        p.add_argument("--image", metavar="PATH", help="the source image (the output keeps its size)")
    if with_mask:
        p.add_argument("--mask", metavar="PATH",
                       help="white where to repaint, black where to keep; the same size as --image")
    p.add_argument("--model", metavar="NAME_OR_PATH",
                   help="a diffusers FLUX folder, a BFL .safetensors file, a Hugging Face repo id already in the "
                        "local cache, or an embedded model (default: shapes)")
    p.add_argument("--steps", type=steps_type, metavar="N", help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=guidance_type, metavar="G",
                   help="distilled guidance scale (default: the model's; FLUX.1-schnell ignores it)")
    p.add_argument("--seed", type=seed_type, metavar="N", help="random seed (default: a random one, printed and "
                                                               "recorded in the PNG)")
    p.add_argument("--width", type=side_type, metavar="PX",
                   help="output width (default: the source image's, else the model's)")
    p.add_argument("--height", type=side_type, metavar="PX",
                   help="output height (default: the source image's, else the model's)")
    if with_image:
        p.add_argument("--strength", type=strength_type, metavar="S",
                       help="how much to change the source, in (0, 1] (default: the model's)")
    p.add_argument("--negative-prompt", metavar="TEXT", help="what to steer away from (needs --true-cfg > 1)")
    p.add_argument("--true-cfg", type=true_cfg_type, metavar="SCALE",
                   help="true classifier-free guidance scale, used with --negative-prompt; above 1 it runs the "
                        "transformer twice per step (default: 1, off)")
    p.add_argument("--num-images", type=count_type, metavar="N",
                   help="how many images; image k uses seed+k-1 and is saved as NAME-k.png (default: 1)")
    p.add_argument("--max-sequence-length", type=sequence_length_type, metavar="TOKENS",
                   help="T5 tokens the prompt is padded to, at most 512 (default: the model's)")
    p.add_argument("--dtype", choices=DTYPES, help="weights and compute type (default: bfloat16 on CUDA, "
                                                   "float32 elsewhere)")
    p.add_argument("--device", metavar="DEVICE", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quantize", choices=QUANTIZE, help="store the transformer blocks' linear layers in 8 bits "
                                                       "(int8-dynamic: int8 activations too)")
    p.add_argument("--cache", type=cache_type, metavar="THRESHOLD",
                   help="step caching: skip the transformer's later blocks on steps whose first-block output "
                        "changed less than THRESHOLD since the last full step (0.1-0.2 typical; default: off)")
    p.add_argument("--blocks", choices=("lazy", "memory", "stream"), default="lazy",
                   help="when the transformer's blocks are read: at first use (lazy, default), all at load "
                        "(memory), or before every use and freed after it (stream: about one block in memory, "
                        "for machines that cannot hold the model)")
    p.add_argument("--from-png", metavar="IMAGE.png",
                   help="take the recipe stored in a rectiflux PNG; options given here override its values")
    p.add_argument("-o", "--output", metavar="FILE.png",
                   help="where to write (default: rectiflux-SEED.png in the current folder; a folder puts that "
                        "name there)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


QUANTIZE = ("int8", "int8-dynamic", "float8")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Generate images with FLUX.1 models.",
                     epilog="examples:\n"
                            "  rectiflux generate 'a red circle on a blue background' --seed 7\n"
                            "  rectiflux img2img 'a green square' --image in.png --strength 0.6\n"
                            "  rectiflux inpaint 'a yellow disk' --image in.png --mask mask.png\n"
                            "  rectiflux generate --from-png rectiflux-7.png -o again.png   # the same image again",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("generate", parents=[_common_options(False, False)], help="text to image",
                        description="Text to image. With --from-png, the recipe's mode (img2img or inpaint "
                                    "included) is reproduced.")
    commands.add_parser("img2img", parents=[_common_options(True, False)], help="rework an image from a prompt",
                        description="Rework --image following the prompt.")
    commands.add_parser("inpaint", parents=[_common_options(True, True)], help="repaint the masked part of an image",
                        description="Repaint the white part of --mask in --image following the prompt.")
    _train_parser(commands)
    _eval_parser(commands)
    return parser


def _train_parser(commands) -> None:
    p = commands.add_parser("train", help="train a model (the embedded shapes model's recipe)",
                            description="Train the shapes-world model from scratch: the autoencoder, then the "
                                        "transformer with guidance distillation, then export in the diffusers "
                                        "layout. Runs under torchrun / accelerate launch unchanged.")
    p.add_argument("--preset", default="shapes", choices=["shapes"], help="the recipe (default: shapes)")
    p.add_argument("--out", default="runs/shapes", help="run folder: checkpoints, metrics.jsonl, samples/, model/")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--stages", default="ae,flux", help="which stages to run (default: ae,flux)")
    p.add_argument("--export-to", help="also write the final model folder here (default: OUT/model)")
    for name, kind, what in [("ae-steps", int, "autoencoder steps"), ("flux-steps", int, "transformer steps"),
                             ("distill-steps", int, "final transformer steps spent distilling guidance"),
                             ("batch-size", int, "transformer global batch"), ("seed", int, "seed of the run"),
                             ("bank-size", int, "images encoded once for the transformer stage"),
                             ("log-every", int, "steps between metric lines"),
                             ("checkpoint-every", int, "steps between checkpoints"),
                             ("sample-every", int, "steps between sample grids (0: never)")]:
        p.add_argument(f"--{name}", type=kind, help=what)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="measure a shapes-world model against its prompts",
                            description="Render a fixed prompt set with fixed seeds, check every image against its "
                                        "prompt, and print accuracy per attribute for seen and held-out pairs.")
    p.add_argument("model", nargs="?", default="shapes", help="the model (default: the embedded shapes model)")
    p.add_argument("--per-pair", type=lambda t: _whole(t, 1, "--per-pair"), default=5,
                   help="prompts per color-shape pair (default 5: 120 prompts)")
    p.add_argument("--seed", type=seed_type, default=0, help="first seed (prompt i uses seed + i)")
    p.add_argument("--steps", type=steps_type, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=guidance_type, help="guidance scale (default: the model's)")
    p.add_argument("--speed", action="store_true", help="also time one image and measure autoencoder PSNR")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def run_train(args: argparse.Namespace) -> int:
    from .train import train_shapes

    names = {"ae_steps": None, "flux_steps": None, "distill_steps": "flux", "batch_size": "flux", "seed": "",
             "bank_size": "flux", "log_every": "", "checkpoint_every": "", "sample_every": "flux"}
    ae, flux = {}, {}
    for name, stage in names.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name in ("ae_steps", "flux_steps"):
            (ae if name == "ae_steps" else flux)["steps"] = value
        else:
            if stage in ("", "flux"):
                flux[name] = value
            if stage == "":
                ae[name] = value
    for flag in ("bf16", "grad_checkpointing"):
        if getattr(args, flag):
            ae[flag] = flux[flag] = True
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if not stages or set(stages) - {"ae", "flux"}:
        raise UsageError(f"--stages takes ae, flux or both, got {args.stages!r}")
    out = train_shapes(args.out, ae_overrides=ae, flux_overrides=flux, resume=args.resume, stages=stages,
                       export_to=args.export_to)
    print(f"wrote the model to {out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import autoencoder_psnr, format_report, prompt_fidelity, seconds_per_image
    from .pipeline import load
    from .shapes import eval_scenes

    with quiet_libraries(args.debug):
        pipe = load(model_argument(args.model))
    kwargs = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance)) if v}
    fidelity = prompt_fidelity(pipe, eval_scenes(args.per_pair), seed=args.seed, **kwargs)
    psnr = autoencoder_psnr(pipe) if args.speed else None
    latency = seconds_per_image(pipe) if args.speed else None
    print(format_report(fidelity, psnr, latency))
    if args.json:
        Path(args.json).write_text(json.dumps({"fidelity": fidelity, "autoencoder_psnr_db": psnr,
                                               "seconds_per_image": latency}, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the request: command line merged over a stored recipe

@dataclass
class Request:
    mode: str
    prompt: str
    negative_prompt: str | None
    seed: int
    num_images: int
    model: str
    true_cfg: float
    dtype: str | None = None  # None: chosen for the device
    quantize: str | None = None
    cache: float | None = None
    blocks: str = "lazy"
    device: str | None = None
    steps: int | None = None  # None here and below: the model's default, filled in once it is loaded
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    strength: float | None = None
    max_sequence_length: int | None = None
    image: str | None = None
    mask: str | None = None


# metadata key -> parser of its text; the same parsers as the command line, so a recipe is checked like input
RECIPE_FIELDS: dict[str, Callable[[str], Any]] = {
    "mode": str, "prompt": str, "negative_prompt": str, "seed": seed_type, "steps": steps_type,
    "guidance": guidance_type, "width": side_type, "height": side_type, "strength": strength_type,
    "true_cfg": true_cfg_type, "max_sequence_length": sequence_length_type, "dtype": str, "model": str,
    "model_name": str, "model_hash": str, "image": str, "mask": str, "quantize": str, "cache": cache_type,
    VERSION_KEY: str,
}


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored in a rectiflux PNG, each value parsed and range-checked."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no PNG file at {path} (--from-png)")
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})  # .text reads the chunks after the image data too
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if VERSION_KEY not in text:
        raise UsageError(f"{path} holds no rectiflux recipe (no {VERSION_KEY} text chunk)")
    recipe: dict[str, Any] = {}
    for key, parse in RECIPE_FIELDS.items():
        if key in text:
            try:
                recipe[key] = parse(text[key])
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"{path}: bad recipe value for {key}: {e}") from None
    if recipe.get("mode", "generate") not in MODES:
        raise UsageError(f"{path}: unknown recipe mode {recipe['mode']!r}")
    if recipe.get("dtype") is not None and recipe["dtype"] not in DTYPES:
        raise UsageError(f"{path}: unknown recipe dtype {recipe['dtype']!r}")
    return recipe


def model_argument(model: str) -> str:
    """What to record for --model: an existing path made absolute (so a recipe works from any folder), else the
    name as given (an embedded model or a Hugging Face repo id)."""
    return os.path.abspath(model) if Path(model).exists() else model


def make_request(args: argparse.Namespace, recipe: dict[str, Any]) -> Request:
    """Command-line values over the recipe's; what neither gives stays None for the model's defaults."""

    def pick(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return value if value is not None else recipe.get(name, default)

    mode = args.command
    if mode == "generate" and recipe.get("mode") in ("img2img", "inpaint"):
        mode = recipe["mode"]  # `generate --from-png` reproduces whatever made the image
    prompt = pick("prompt")
    if prompt is None:
        raise UsageError("give a PROMPT (or --from-png IMAGE.png to reuse a recipe)")
    true_cfg = pick("true_cfg", 1.0)
    negative = pick("negative_prompt")
    seed = pick("seed")
    if seed is None:
        seed = secrets.randbelow(RANDOM_SEED_LIMIT)
    num_images = args.num_images or 1
    if seed + num_images > SEED_LIMIT:
        raise UsageError(f"seeds {seed}..{seed + num_images - 1} go past the largest seed {SEED_LIMIT - 1}")
    req = Request(mode=mode, prompt=prompt, negative_prompt=negative, seed=seed, num_images=num_images,
                  model=model_argument(pick("model", "shapes")), true_cfg=true_cfg, dtype=pick("dtype"),
                  quantize=pick("quantize"), cache=pick("cache"), blocks=args.blocks,
                  device=args.device, steps=pick("steps"), guidance=pick("guidance"), width=pick("width"),
                  height=pick("height"), max_sequence_length=pick("max_sequence_length"))
    if mode != "generate":
        req.strength = pick("strength")
        req.image = pick("image")
        if req.image is None:
            raise UsageError(f"{mode} needs --image")
    if mode == "inpaint":
        req.mask = pick("mask")
        if req.mask is None:
            raise UsageError("inpaint needs --mask")
    return req


def check_limits(req: Request) -> None:
    """The upper bounds that belong to the pipeline and the text encoders (imported here, not at start-up)."""
    from .pipeline import MAX_SIDE
    from .text_encoders import MAX_T5_LENGTH

    for name in ("width", "height"):
        side = getattr(req, name)
        if side is not None and not MIN_SIDE <= side <= MAX_SIDE:
            raise UsageError(f"{name} must be from {MIN_SIDE} to {MAX_SIDE} pixels, got {side}")
    if req.max_sequence_length is not None and req.max_sequence_length > MAX_T5_LENGTH:
        raise UsageError(f"--max-sequence-length must be at most {MAX_T5_LENGTH}, got {req.max_sequence_length}")


def open_input(path: str, what: str) -> Any:
    """A source image or mask, read whole now so that a bad file is reported before the model loads."""
    from .images import open_image

    try:
        return open_image(path, what)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_inputs(req: Request) -> tuple[Any, Any]:
    """(image, mask) as PIL images, checked against each other; their size fills in a missing width/height."""
    if req.image is None:
        return None, None
    image = open_input(req.image, "image")
    mask = open_input(req.mask, "mask") if req.mask is not None else None
    if mask is not None and mask.size != image.size:
        raise UsageError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}")
    # the pipeline takes a missing side from the source, one side at a time; do the same to record the real size
    for name, side in (("width", image.size[0]), ("height", image.size[1])):
        if getattr(req, name) is None:
            if side < MIN_SIDE:
                raise UsageError(f"the image is {image.size[0]}x{image.size[1]}; give --width and --height of at "
                                 f"least {MIN_SIDE}")
            setattr(req, name, side)
    return image, mask


# ----------------------------------------------------------------------------------------------------------------
# output files

def output_paths(output: str | None, seed: int, count: int) -> list[Path]:
    default_name = f"rectiflux-{seed}.png"
    if output is None:
        base = Path(default_name)
    elif output.endswith(("/", os.sep)) or Path(output).is_dir():
        base = Path(output) / default_name
    else:
        base = Path(output)
    if base.suffix.lower() != ".png":
        raise UsageError(f"the output {base} must end in .png (the recipe is stored as PNG text)")
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{k}{base.suffix}") for k in range(1, count + 1)]


def check_outputs(paths: Sequence[Path], overwrite: bool) -> None:
    for path in paths:
        if path.is_dir():
            raise UsageError(f"the output {path} is a folder")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it or -o to choose another name")
        # the nearest folder that exists must let us create the missing ones and the file (found out now, not
        # after minutes of sampling)
        folder = path.parent.absolute()
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise UsageError(f"cannot write {path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write {path}: no permission to write in {folder}")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def write_png(image: Any, path: Path, text: dict[str, str], overwrite: bool) -> None:
    """Write `image` with `text` as iTXt chunks (UTF-8, so any prompt survives), atomically.

    Without `overwrite` the final step is a hard link, which fails if the name was taken meanwhile (e.g. by another
    run started after our check), so an existing file is never replaced even in a race.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "fchmod"):  # mkstemp makes the file private; give it the mode a plain open() would
                os.fchmod(f.fileno(), 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UsageError(f"{path} appeared while generating; not replaced (pass --overwrite)") from None
        except OSError:  # a filesystem without hard links: check, then rename
            if path.exists():
                raise UsageError(f"{path} appeared while generating; not replaced (pass --overwrite)") from None
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# the transformer's fingerprint

def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rectiflux"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def weights_sha256(files: Sequence[Path], cache: Path | None = None, notice: IO[str] | None = None) -> str:
    """sha256 of the weights: of the file itself for one file (what `sha256sum` prints), else of the lines
    "name sha256" of each shard. Hashing a full FLUX transformer reads 24 GB, so each file's hash is cached,
    keyed by its absolute path, size and modification time."""
    cache_file = (cache or cache_dir()) / "weight-hashes.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    hashes, changed = [], False
    for file in files:
        key = str(Path(file).absolute())
        stat = os.stat(file)
        entry = known.get(key)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns and isinstance(entry.get("sha256"), str)):
            if notice is not None and stat.st_size > 1 << 30:
                print(f"{PROG}: hashing {file} (once; the result is cached)", file=notice, flush=True)
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(Path(file))}
            known[key], changed = entry, True
        hashes.append((Path(file).name, entry["sha256"]))
    if changed:
        with contextlib.suppress(OSError):  # a read-only home only costs the next run another hash
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".weight-hashes.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(known, f, indent=1, sort_keys=True)
            os.replace(tmp, cache_file)
    if len(hashes) == 1:
        return hashes[0][1]
    return hashlib.sha256("".join(f"{name} {h}\n" for name, h in hashes).encode()).hexdigest()


def transformer_files(source: Path) -> list[Path]:
    from .checkpoint import weight_files

    source = Path(source)
    return weight_files(source if source.is_file() else source / "transformer")


# ----------------------------------------------------------------------------------------------------------------
# progress

def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Times the denoising steps and, when given a stream, draws a one-line bar on it."""

    def __init__(self, stream: IO[str] | None, width: int = 28) -> None:
        self.stream, self.width = stream, width
        self.label = ""
        self.intervals: list[float] = []  # seconds per step, the first step of each image left out when possible
        self._drawn = False

    def start(self, label: str) -> None:
        self.label = label
        self._times = [time.perf_counter()]

    def __call__(self, step: int, total: int) -> None:
        self._times.append(time.perf_counter())
        if step == total:
            gaps = [b - a for a, b in zip(self._times, self._times[1:], strict=False)]
            # the first gap also holds the prompt encoding (and any warm-up): an honest per-step time skips it
            self.intervals.extend(gaps[1:] if len(gaps) > 1 else gaps)
        if self.stream is None:
            return
        done = self.width * step // total
        gaps = [b - a for a, b in zip(self._times, self._times[1:], strict=False)]
        gaps = gaps[1:] if len(gaps) > 1 else gaps
        per_step = sum(gaps) / len(gaps)
        if step < total:
            when = f"{_clock(per_step * (total - step))} left"
        else:
            when = f"done in {_clock(self._times[-1] - self._times[0])}"
        line = (f"\r{self.label} [{'#' * done}{'.' * (self.width - done)}] {step}/{total} "
                f"{per_step:.2f} s/step, {when}  ")
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.stream is not None and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    @property
    def seconds_per_step(self) -> float:
        return sum(self.intervals) / len(self.intervals) if self.intervals else 0.0


# ----------------------------------------------------------------------------------------------------------------
# running

@contextlib.contextmanager
def quiet_libraries(debug: bool) -> Iterator[None]:
    """transformers prints loading bars and notices on stderr; they would break the one-line error contract and
    clutter the bar. Restored afterwards so that calling main() from Python leaves no trace."""
    from transformers.utils import logging as hf_logging

    if debug:
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def pick_device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but torch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} asked for, but MPS is not available")
    return device


def load_pipeline(req: Request, device: Any) -> Any:
    from .pipeline import load

    try:
        return load(req.model, dtype=req.dtype, device=device, quantize=req.quantize, blocks=req.blocks)
    except OSError as e:  # a missing or unreadable model file is the user's input too (ValueErrors already are)
        raise UsageError(f"cannot load the model {req.model}: {_one_line(e)}") from None


def recipe_text(req: Request, seed: int, pipe: Any, model_hash: str) -> dict[str, str]:
    """The PNG text chunks: every value needed to make the same image again, as text that parses back exactly
    (repr of a float round-trips)."""
    text = {"mode": req.mode, "prompt": req.prompt}
    if req.negative_prompt is not None:
        text["negative_prompt"] = req.negative_prompt
    text.update(seed=str(seed), steps=str(req.steps), guidance=repr(float(req.guidance)), width=str(req.width),
                height=str(req.height))
    if req.mode != "generate":
        text["strength"] = repr(float(req.strength))
        text["image"] = os.path.abspath(req.image)
    if req.mask is not None:
        text["mask"] = os.path.abspath(req.mask)
    text.update(true_cfg=repr(float(req.true_cfg)), max_sequence_length=str(req.max_sequence_length),
                dtype=req.dtype, model=req.model, model_name=str(pipe.name), model_hash=model_hash,
                device=str(pipe.device), Software=f"{PROG} {__version__}")
    if req.quantize is not None:
        text["quantize"] = req.quantize
    if req.cache is not None:
        text["cache"] = repr(float(req.cache))
    text[VERSION_KEY] = __version__
    return text


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.command is None:  # argparse's own message names the metavar only
        raise UsageError(f"give a command: {', '.join(MODES)}, train, eval ({PROG} --help lists them)")
    if args.command == "train":
        return run_train(args)
    if args.command == "eval":
        return run_eval(args)
    recipe = read_recipe(args.from_png) if args.from_png else {}
    req = make_request(args, recipe)
    paths = output_paths(args.output, req.seed, req.num_images)
    check_outputs(paths, args.overwrite)
    image, mask = load_inputs(req)
    check_limits(req)
    if req.negative_prompt is not None and req.true_cfg <= 1:
        warn("--negative-prompt has no effect unless --true-cfg is above 1")
    elif req.negative_prompt is None and req.true_cfg > 1:
        warn("--true-cfg has no effect without --negative-prompt")

    device = pick_device(req.device)
    if req.dtype is None:
        req.dtype = "bfloat16" if device.type == "cuda" else "float32"
    tty = sys.stderr.isatty()
    if tty:
        print(f"{PROG}: loading {req.model} ({req.dtype}, {device})", file=sys.stderr, flush=True)
    with quiet_libraries(args.debug):
        pipe = load_pipeline(req, device)
    d = pipe.defaults
    req.steps = req.steps or d.steps
    req.guidance = d.guidance if req.guidance is None else req.guidance
    req.width, req.height = req.width or d.width, req.height or d.height
    req.max_sequence_length = req.max_sequence_length or d.max_sequence_length
    if req.mode != "generate" and req.strength is None:
        req.strength = d.strength
    check_limits(req)
    model_hash = weights_sha256(transformer_files(pipe.source), notice=sys.stderr if tty else None)
    if recipe.get("model_hash") not in (None, model_hash):
        warn(f"the transformer differs from the one in {args.from_png} (sha256 {recipe['model_hash'][:12]} there, "
             f"{model_hash[:12]} here): the image will differ")
    if recipe.get(VERSION_KEY) not in (None, __version__):
        warn(f"{args.from_png} was made by rectiflux {recipe[VERSION_KEY]}, this is {__version__}: "
             "the image may differ")

    progress = Progress(sys.stderr if tty else None)
    try:
        for k, path in enumerate(paths):
            seed = req.seed + k
            progress.start(f"{k + 1}/{len(paths)} seed {seed}" if len(paths) > 1 else f"seed {seed}")
            out = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, true_cfg_scale=req.true_cfg,
                       image=image, mask_image=mask, strength=req.strength, width=req.width, height=req.height,
                       num_inference_steps=req.steps, guidance_scale=req.guidance, seed=seed,
                       max_sequence_length=req.max_sequence_length, output_type="pil", progress=progress,
                       cache_threshold=req.cache)
            progress.close()
            # each image is saved as soon as it is made: stopping a long batch keeps what is done
            write_png(out.images[0], path, recipe_text(req, seed, pipe, model_hash), args.overwrite)
    finally:
        progress.close()

    names = ", ".join(map(str, paths)) if len(paths) <= 4 else f"{paths[0]} ... {paths[-1]}"
    seeds = f"seed {req.seed}" if len(paths) == 1 else f"seeds {req.seed}-{req.seed + len(paths) - 1}"
    print(f"wrote {names} ({req.width}x{req.height}, {seeds}, {req.steps} steps at "
          f"{progress.seconds_per_step:.3f} s/step, {time.perf_counter() - started:.1f} s in all)", flush=True)
    return 0


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rectiflux` script and of `python -m rectiflux`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # known before parsing, so that even a parse error can show its traceback
    try:
        return run(build_parser().parse_args(argv))
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError) as e:  # ValueError: the pipeline's own checks (CheckpointError included)
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"{PROG}: error: {type(e).__name__}: {_one_line(e)}{hint}", file=sys.stderr)
        return 1
