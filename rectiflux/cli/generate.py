"""The generating commands: generate (text to image, or any recipe with --from-png), img2img, inpaint, fill, control
and edit. Everything that can be checked without the model (sizes, numbers, input files, the output names) is
checked before the model is loaded, which takes minutes for a full-size FLUX."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .options import (
    MIN_SIDE,
    UsageError,
    model_options,
    output_options,
    sampling_options,
)
from .recipe import (
    INPUTS,
    MODES,
    PROG,
    VERSION_KEY,
    Request,
    check_inputs_unchanged,
    check_loras_unchanged,
    make_request,
    read_recipe,
    recipe_text,
    transformer_files,
    weights_sha256,
)

DESCRIPTIONS = {
    "generate": ("text to image", "Text to image. With --from-png, the recipe's mode (img2img, inpaint, fill, control "
                                  "or edit included) is reproduced."),
    "img2img": ("rework an image from a prompt", "Rework --image following the prompt."),
    "inpaint": ("repaint the masked part of an image", "Repaint the white part of --mask in --image following the "
                                                       "prompt."),
    "fill": ("inpaint or outpaint with a FLUX.1-Fill model", "Fill the white part of --mask in --image with a "
                                                             "FLUX.1-Fill model."),
    "control": ("follow an edge or depth map with a FLUX.1-Canny/Depth model",
                "Generate following --control-image (an edge or depth map) with a FLUX.1-Canny or Depth model."),
    "edit": ("edit an image from an instruction with FLUX.1-Kontext",
             "Edit --image following the prompt (an instruction) with a FLUX.1-Kontext model."),
}


def add_parsers(commands) -> None:
    for mode in MODES:
        short, description = DESCRIPTIONS[mode]
        p = commands.add_parser(mode, help=short, description=description)
        p.add_argument("prompt", nargs="?", metavar="PROMPT",
                       help="what to draw (may be left out with --from-png, which supplies it)")
        inputs = INPUTS.get(mode, ())
        if "image" in inputs:
            p.add_argument("--image", metavar="PATH", help="the image to edit" if mode == "edit" else
                           "the source image (the output keeps its size)")
        if "mask" in inputs:
            p.add_argument("--mask", metavar="PATH",
                           help="white where to repaint, black (or transparent) where to keep; the size of --image")
        if "control_image" in inputs:
            p.add_argument("--control-image", metavar="PATH", dest="control_image",
                           help="the edge or depth map to follow (rectiflux.images.canny makes one from a photo)")
        if mode == "edit":
            p.add_argument("--keep-reference-size", action="store_true", dest="keep_reference_size", default=None,
                           help="use --image at its own size (each side floored to a multiple of 16) instead of "
                                "resizing it to the nearest resolution Kontext was trained on")
        if mode == "generate":
            p.add_argument("--redux-image", metavar="PATH", action="append", dest="redux_images", default=[],
                           help="FLUX.1-Redux: make variations of this image (repeatable: the images are mixed)")
            p.add_argument("--redux-model", metavar="PATH_OR_REPO",
                           help="the Redux model (default: black-forest-labs/FLUX.1-Redux-dev)")
            p.add_argument("--siglip", metavar="PATH_OR_REPO",
                           help="for a BFL Redux file: the SigLIP vision model (google/siglip-so400m-patch14-384)")
        sampling_options(p, with_strength=mode in ("img2img", "inpaint", "fill"))
        model_options(p)
        p.add_argument("--sequence-parallel", nargs="?", const="ulysses", choices=("ulysses", "ring"),
                       metavar="BACKEND", help="under torchrun: split each image's tokens over the processes "
                       "(sequence parallelism: ulysses, the default, or ring attention for head counts the "
                       "processes do not divide; NCCL on GPUs, gloo on CPUs); the first process writes the files")
        output_options(p)


# ----------------------------------------------------------------------------------------------------------------
# checks before loading

def check_limits(req: Request) -> None:
    """The upper bounds that belong to the pipeline and the text encoders (imported here, not at start-up)."""
    from ..flux.text_encoders import MAX_T5_LENGTH
    from ..pipelines.flux import MAX_SIDE

    for name in ("width", "height"):
        side = getattr(req, name)
        if side is not None and not MIN_SIDE <= side <= MAX_SIDE:
            raise UsageError(f"{name} must be from {MIN_SIDE} to {MAX_SIDE} pixels, got {side}")
    if req.max_sequence_length is not None and req.max_sequence_length > MAX_T5_LENGTH:
        raise UsageError(f"--max-sequence-length must be at most {MAX_T5_LENGTH}, got {req.max_sequence_length}")


def check_text(req: Request) -> None:
    from ..pipelines.flux import check_text as check

    for name, text in (("the prompt", req.prompt), ("the negative prompt", req.negative_prompt)):
        try:
            check(name, text)
        except ValueError:
            raise UsageError(f"{name} is not valid UTF-8 text (the command line gave bytes that do not decode); "
                             "pass it as UTF-8") from None


def open_input(path: str, what: str) -> Any:
    """An input image, read whole now so that a bad file is reported before the model loads."""
    from ..images import open_image

    try:
        return open_image(path, what)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_inputs(req: Request) -> dict[str, Any]:
    """The input images, checked against each other; the source's size fills in a missing width/height."""
    names = {"image": "image", "mask": "mask", "control_image": "control image"}
    images = {k: open_input(getattr(req, k), what) for k, what in names.items() if getattr(req, k)}
    images["redux_images"] = [open_input(p, "Redux image") for p in req.redux_images]
    image, mask = images.get("image"), images.get("mask")
    if mask is not None and mask.size != image.size:
        raise UsageError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}")
    source = image if req.mode in ("img2img", "inpaint", "fill") else images.get("control_image")
    if source is not None:
        # the pipeline takes a missing side from the source, one side at a time; do the same to record the real size
        for name, side in (("width", source.size[0]), ("height", source.size[1])):
            if getattr(req, name) is None:
                if side < MIN_SIDE:
                    raise UsageError(f"the {'image' if source is image else 'control image'} is "
                                     f"{source.size[0]}x{source.size[1]}; give --width and --height of at least "
                                     f"{MIN_SIDE}")
                setattr(req, name, side)
    return images


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
        # the nearest folder that exists must let us create the missing ones and the file: found out now, by
        # creating a file there, not after minutes of sampling (permissions alone do not tell, e.g. in /proc)
        folder = path.parent.absolute()
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise UsageError(f"cannot write {path}: {folder} is not a folder")
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".rectiflux-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e} in {folder}") from None


def write_png(image: Any, path: Path, text: dict[str, str], overwrite: bool) -> None:
    """Write `image` with `text` as iTXt chunks (UTF-8, so any prompt survives), atomically; an existing file is
    replaced only with `overwrite`, even if it appeared while the image was made."""
    from PIL.PngImagePlugin import PngInfo

    from ..files import FileExists, atomic_write

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    try:
        with atomic_write(path, overwrite=overwrite) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
    except FileExists:
        raise UsageError(f"{path} appeared while generating; not replaced (pass --overwrite)") from None
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------------------------
# running

class StepTimer:
    """Seconds per denoising step, the first step of each image left out when possible (it also holds the prompt
    encoding and any warm-up)."""

    def __init__(self) -> None:
        self.intervals: list[float] = []
        self._times: list[float] = []

    def start(self) -> None:
        self._times = [time.perf_counter()]

    def __call__(self, step: int, total: int) -> None:
        self._times.append(time.perf_counter())
        if step == total:
            gaps = [b - a for a, b in zip(self._times, self._times[1:], strict=False)]
            self.intervals.extend(gaps[1:] if len(gaps) > 1 else gaps)

    @property
    def seconds_per_step(self) -> float:
        return sum(self.intervals) / len(self.intervals) if self.intervals else 0.0


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

    from ..pipelines.flux import check_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return check_device(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_pipeline(req: Request, device: Any) -> Any:
    from ..pipelines.load import load

    products = (req.kernels or {}).get("int8_products")
    if products in ("int_mm", "fbgemm") and getattr(device, "type", device) == "cpu":
        import torch

        from ..quantize import linear

        if products == "int_mm" and not linear.int8_matmul_is_fast():
            warn("the recipe's int8 products ran on torch._int_mm, which this CPU multiplies many times slower than "
                 "float32 (no VNNI or AMX): replaying them takes far longer; --quantize int8-dynamic lets this "
                 "machine choose (a slightly different image)")
        elif products == "fbgemm" and linear.int8_product_on(torch.device("cpu"), "fbgemm") != "fbgemm":
            warn("the recipe's int8 products ran on FBGEMM, which this torch lacks: the weights are dequantised "
                 "instead (a slightly different image)")
    try:
        return load(req.model, dtype=req.dtypes or req.dtype, device=device, compile=req.compile,
                    quantize=req.quantize, blocks=req.blocks, vae=req.vae, text_encoders=req.text_encoders,
                    kind=req.kind, clip=req.clip, t5=req.t5, tokenizers=req.tokenizers,
                    comfyui_models=req.comfyui_models, kernels=req.kernels)
    except OSError as e:  # a missing or unreadable model file is the user's input too (ValueErrors already are)
        raise UsageError(f"cannot load the model {req.model}: {one_line(e)}") from None


KIND_NAMES = {"flux": "a text-to-image (FLUX.1-dev or schnell)", "fill": "a FLUX.1-Fill",
              "control": "a FLUX.1-Canny/Depth", "kontext": "a FLUX.1-Kontext"}


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines) or type(e).__name__


def redux_embeddings(req: Request, pipe: Any, images: list, device: Any) -> tuple[Any, Any]:
    from ..pipelines.redux import load_redux

    source = req.redux_model or "black-forest-labs/FLUX.1-Redux-dev"
    try:
        prior = load_redux(source, siglip=req.siglip, text_encoders=pipe.text_encoders, dtype=pipe.dtype,
                           device=device)
    except OSError as e:
        raise UsageError(f"cannot load the Redux model {source}: {one_line(e)}") from None
    out = prior(images if len(images) > 1 else images[0], prompt=req.prompt or None)
    return out.prompt_embeds, out.pooled_prompt_embeds


def prepare_pipeline(req: Request, device: Any, debug: bool) -> Any:
    """The pipeline of `req`, loaded, with its LoRAs active; `req.dtypes` records what each model computes in."""
    with quiet_libraries(debug):
        pipe = load_pipeline(req, device)
    req.dtypes = {name: str(dtype).removeprefix("torch.") for name, dtype in pipe.dtypes.items()}
    if req.loras:
        names = [f"lora{i + 1}" for i in range(len(req.loras))]
        for name, (path, _) in zip(names, req.loras, strict=True):
            pipe.load_lora_weights(path, adapter_name=name)
        pipe.set_adapters(names, [scale for _, scale in req.loras])
    return pipe


def check_kind(req: Request, pipe: Any) -> None:
    needed = MODES[req.mode]
    if pipe.kind != needed:
        raise UsageError(f"{PROG} {req.mode} needs {KIND_NAMES[needed]} model; {req.model} is {KIND_NAMES[pipe.kind]}"
                         f" model" + (" (use rectiflux edit)" if pipe.kind == "kontext" else ""))


def resolve_settings(req: Request, pipe: Any, images: dict[str, Any]) -> None:
    """Fill in what the request left to the model (steps, guidance, size, sequence length, strength) and check the
    result, so that the recipe records the values that ran."""
    d = pipe.defaults
    req.steps = req.steps or d.steps
    req.guidance = d.guidance if req.guidance is None else req.guidance
    if req.mode == "edit" and (req.width is None or req.height is None):
        from ..pipelines.kontext import output_size

        width, height = output_size(pipe, images["image"], auto_resize=not req.keep_reference_size)
        req.width, req.height = req.width or width, req.height or height
    req.width, req.height = req.width or d.width, req.height or d.height
    req.max_sequence_length = req.max_sequence_length or d.max_sequence_length
    if req.mode in ("img2img", "inpaint") and req.strength is None:
        req.strength = d.strength
    if req.mode == "fill" and req.strength is None:
        req.strength = 1.0
    check_limits(req)


def pipe_inputs(images: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's image arguments from the opened input images."""
    return {name: images[key] for name, key in (("image", "image"), ("mask_image", "mask"),
                                                ("control_image", "control_image")) if key in images}


def make_image(pipe: Any, req: Request, seed: int, prompt_args: dict[str, Any], inputs: dict[str, Any],
               **hooks: Any) -> Any:
    """One image of `req` with `seed`: the one pipeline call of the CLI and the server (`hooks`: `progress`,
    `callback_on_step_end` and its tensor inputs)."""
    return pipe(**prompt_args, negative_prompt=req.negative_prompt, true_cfg_scale=req.true_cfg, **inputs,
                strength=req.strength, width=req.width, height=req.height, num_inference_steps=req.steps,
                guidance_scale=req.guidance, seed=seed, max_sequence_length=req.max_sequence_length,
                output_type="pil", cache_threshold=req.cache,
                **({"_auto_resize": False} if req.keep_reference_size else {}), **hooks)


def start_sequence_parallel(req: Request) -> int:
    """Join torchrun's processes; every one takes the first one's seed (a random seed is drawn per process)."""
    import torch.distributed as dist

    from ..training.trainer import init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--sequence-parallel splits the work over torchrun's processes: run it as torchrun "
                         "--nproc-per-node N -m rectiflux ... (N >= 2)")
    rank, _ = init_distributed()
    seed = [req.seed]
    dist.broadcast_object_list(seed, src=0)
    req.seed = seed[0]
    return rank


def run_generate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    recipe = read_recipe(args.from_png) if args.from_png else {}
    req = make_request(args, recipe)
    rank = start_sequence_parallel(req) if getattr(args, "sequence_parallel", False) else 0
    check_text(req)
    paths = output_paths(args.output, req.seed, req.num_images)
    check_outputs(paths, args.overwrite)
    images = load_inputs(req)
    check_limits(req)
    if recipe:
        check_inputs_unchanged(req, recipe, str(args.from_png), args.force)
        check_loras_unchanged(req, recipe, str(args.from_png), args.force)
    for path, _ in req.loras:
        if not Path(path).is_file():
            raise UsageError(f"no LoRA file at {path} (--lora)")
    if req.negative_prompt is not None and req.true_cfg <= 1:
        warn("--negative-prompt has no effect unless --true-cfg is above 1")
    elif req.negative_prompt is None and req.true_cfg > 1:
        warn("--true-cfg has no effect without --negative-prompt")

    device = pick_device(req.device)
    if req.dtype is None:
        req.dtype = "auto"
    tty = sys.stderr.isatty()
    if tty:
        print(f"{PROG}: loading {req.model} ({req.dtype}, {device})", file=sys.stderr, flush=True)
    if getattr(args, "sequence_parallel", False):
        if device.type == "cuda":
            import torch

            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    pipe = prepare_pipeline(req, device, args.debug)
    if getattr(args, "sequence_parallel", False):
        pipe.enable_sequence_parallel(backend=args.sequence_parallel)  # Ulysses and a head count the processes
        # do not divide: one line, exit 2
    check_kind(req, pipe)
    resolve_settings(req, pipe, images)
    model_hash = weights_sha256(transformer_files(pipe.source), notice=sys.stderr if tty else None)
    if recipe.get("model_hash") not in (None, model_hash):
        warn(f"the transformer differs from the one in {args.from_png} (sha256 {recipe['model_hash'][:12]} there, "
             f"{model_hash[:12]} here): the image will differ")
    if recipe.get(VERSION_KEY) not in (None, __version__):
        warn(f"{args.from_png} was made by rectiflux {recipe[VERSION_KEY]}, this is {__version__}: "
             "the image may differ")

    prompt_args: dict[str, Any] = {"prompt": req.prompt}
    if images["redux_images"]:
        with quiet_libraries(args.debug):
            embeds, pooled = redux_embeddings(req, pipe, images["redux_images"], device)
        prompt_args = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    inputs = pipe_inputs(images)
    timer, ran, cached = StepTimer(), 0, 0
    for k, path in enumerate(paths):
        seed = req.seed + k
        pipe.set_progress_bar_config(desc=f"{k + 1}/{len(paths)} seed {seed}" if len(paths) > 1 else f"seed {seed}",
                                     disable=not tty, leave=False)
        timer.start()
        out = make_image(pipe, req, seed, prompt_args, inputs, progress=timer)
        ran, cached = ran + out.steps, cached + out.cached_steps
        # each image is saved as soon as it is made: stopping a long batch keeps what is done
        if rank == 0:
            write_png(out.images[0], path, recipe_text(req, seed, pipe, model_hash), args.overwrite)
    if getattr(args, "sequence_parallel", False):
        import torch.distributed as dist

        dist.barrier()  # the first process has written the files
        dist.destroy_process_group()
    if rank != 0:
        return 0

    names = ", ".join(map(str, paths)) if len(paths) <= 4 else f"{paths[0]} ... {paths[-1]}"
    seeds = f"seed {req.seed}" if len(paths) == 1 else f"seeds {req.seed}-{req.seed + len(paths) - 1}"
    steps = ran // len(paths)
    skipped = f", {cached // len(paths)} of them cached" if req.cache is not None else ""
    print(f"wrote {names} ({req.width}x{req.height}, {seeds}, {steps} steps{skipped} at "
          f"{timer.seconds_per_step:.3f} s/step, {time.perf_counter() - started:.1f} s in all)", flush=True)
    return 0

