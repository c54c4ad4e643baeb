"""The recipe of an image: the command line merged over the one stored in a rectiflux PNG, every value checked like
input; written back into each PNG as text, with the sha256 of the model and of every input file."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import __version__
from ..files import file_sha256
from .options import (
    DTYPES,
    KINDS,
    SEED_LIMIT,
    UsageError,
    cache_type,
    guidance_type,
    seed_type,
    sequence_length_type,
    side_type,
    steps_type,
    strength_type,
    true_cfg_type,
)

PROG = "rectiflux"
VERSION_KEY = "rectiflux_version"  # the key that marks a PNG as holding a rectiflux recipe
RANDOM_SEED_LIMIT = 2**32  # random seeds stay short enough to read out and type back
# the command of each mode, the model kind it needs, and the input files it reads
MODES = {"generate": "flux", "img2img": "flux", "inpaint": "flux", "fill": "fill", "control": "control",
         "edit": "kontext"}
INPUTS = {"img2img": ("image",), "inpaint": ("image", "mask"), "fill": ("image", "mask"),
          "control": ("control_image",), "edit": ("image",)}
WITH_STRENGTH = ("img2img", "inpaint", "fill")
# where the model's parts come from, beside --model: recorded as given (an existing path made absolute)
SOURCES = ("vae", "text_encoders", "clip", "t5", "tokenizers", "comfyui_models")


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
    kind: str | None = None
    vae: str | None = None
    text_encoders: str | None = None
    clip: str | None = None
    t5: str | None = None
    tokenizers: str | None = None
    comfyui_models: str | None = None
    steps: int | None = None  # None here and below: the model's default, filled in once it is loaded
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    strength: float | None = None
    max_sequence_length: int | None = None
    image: str | None = None
    mask: str | None = None
    control_image: str | None = None
    redux_images: list[str] = field(default_factory=list)
    redux_model: str | None = None
    siglip: str | None = None
    keep_reference_size: bool = False
    loras: list[tuple[str, float]] = field(default_factory=list)  # (absolute path, scale)
    dtypes: dict[str, str] | None = None  # what each model computed in (what dtype "auto" chose), replayed
    kernels: dict[str, str] | None = None  # a recipe's kernels (FluxPipeline.kernels where it was made), replayed
    compile: bool = False

    def input_files(self) -> dict[str, str]:
        """Recipe key -> path of every input file this request reads."""
        files = {k: getattr(self, k) for k in ("image", "mask", "control_image") if getattr(self, k)}
        files.update({f"redux_image_{i + 1}": p for i, p in enumerate(self.redux_images)})
        return files


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JSON list: {text[:40]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError("not a JSON list of file names")
    return value


def _loras(text: str) -> list[dict]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JSON list: {text[:40]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) and isinstance(v.get("file"), str)
                                              and isinstance(v.get("scale"), (int, float)) for v in value):
        raise argparse.ArgumentTypeError("not a list of LoRAs (file, scale, sha256)")
    return value


def _dtypes(text: str) -> dict[str, str]:
    from ..runtime.kernels import COMPONENTS

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text[:40]!r}") from None
    if not isinstance(value, dict) or set(value) != set(COMPONENTS) or not all(v in DTYPES[1:] for v in
                                                                              value.values()):
        raise argparse.ArgumentTypeError(f"not a dtype for each of {', '.join(COMPONENTS)}")
    return value


def _kernels(text: str) -> dict[str, str]:
    from ..pipelines.load import check_kernels

    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text[:40]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object of kernel choices")
    try:
        return check_kernels(value, "int8-dynamic")  # whether the recipe's quantize allows them: load checks
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _choice(choices) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


# metadata key -> parser of its text; the same parsers as the command line, so a recipe is checked like input
RECIPE_FIELDS: dict[str, Callable[[str], Any]] = {
    "mode": _choice(MODES), "prompt": str, "negative_prompt": str, "seed": seed_type, "steps": steps_type,
    "guidance": guidance_type, "width": side_type, "height": side_type, "strength": strength_type,
    "true_cfg": true_cfg_type, "max_sequence_length": sequence_length_type, "dtype": _choice(DTYPES),
    "model": str, "model_name": str, "model_hash": str, "kind": _choice(KINDS), "vae": str, "text_encoders": str,
    "clip": str, "t5": str, "tokenizers": str, "comfyui_models": str,
    "image": str, "mask": str, "control_image": str, "redux_images": _json_list, "redux_model": str, "siglip": str,
    "dtypes": _dtypes, "kernels": _kernels, "quantize": str, "cache": cache_type,
    "keep_reference_size": _choice(("true",)), "loras": _loras,
    VERSION_KEY: str,
}


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored in a rectiflux PNG, each value parsed and range-checked; input hashes under `hashes`."""
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
    recipe["hashes"] = {k[: -len("_sha256")]: v for k, v in text.items()
                        if k.endswith("_sha256") and k != "model_sha256"}
    return recipe


def model_argument(model: str) -> str:
    """What to record for --model: an existing path made absolute (so a recipe works from any folder), else the
    name as given (an embedded model or a Hugging Face repo id)."""
    return os.path.abspath(model) if Path(model).exists() else model


def make_request(args: argparse.Namespace, recipe: dict[str, Any]) -> Request:
    """Command-line values over the recipe's; what neither gives stays None for the model's defaults."""

    def pick(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return value if value not in (None, []) else recipe.get(name, default)

    mode = args.command
    if mode == "generate" and recipe.get("mode", "generate") != "generate":
        mode = recipe["mode"]  # `generate --from-png` reproduces whatever made the image
    prompt = pick("prompt")
    if prompt is None:
        raise UsageError("give a PROMPT (or --from-png IMAGE.png to reuse a recipe)")
    seed = pick("seed")
    if seed is None:
        seed = secrets.randbelow(RANDOM_SEED_LIMIT)
    num_images = args.num_images or 1
    if seed + num_images > SEED_LIMIT:
        raise UsageError(f"seeds {seed}..{seed + num_images - 1} go past the largest seed {SEED_LIMIT - 1}")
    paths = {name: os.path.abspath(v) if v else v for name in (*SOURCES, "redux_model", "siglip")
             if (v := pick(name)) is not None and Path(v).exists()}
    # with --comfyui-models and no --model, the tree's one transformer
    model = pick("model") or pick("comfyui_models") or "shapes"
    req = Request(mode=mode, prompt=prompt, negative_prompt=pick("negative_prompt"), seed=seed,
                  num_images=num_images, model=model_argument(model),
                  true_cfg=pick("true_cfg", 1.0), dtype=pick("dtype"), quantize=pick("quantize"), cache=pick("cache"),
                  blocks=args.blocks, device=args.device, compile=bool(getattr(args, "compile", False)),
                  dtypes=recipe.get("dtypes") if args.dtype is None else None,
                  kernels=recipe.get("kernels") if getattr(args, "quantize", None) is None else None,
                  kind=pick("kind"), vae=pick("vae"),
                  text_encoders=pick("text_encoders"), clip=pick("clip"), t5=pick("t5"),
                  tokenizers=pick("tokenizers"), comfyui_models=pick("comfyui_models"), steps=pick("steps"),
                  guidance=pick("guidance"),
                  width=pick("width"), height=pick("height"), max_sequence_length=pick("max_sequence_length"),
                  redux_images=[os.path.abspath(p) for p in pick("redux_images", [])],
                  redux_model=pick("redux_model"), siglip=pick("siglip"),
                  keep_reference_size=bool(pick("keep_reference_size")),
                  loras=[(os.path.abspath(p), s) for p, s in args.loras] if args.loras else
                  [(v["file"], float(v["scale"])) for v in recipe.get("loras", [])])
    for name, value in paths.items():
        setattr(req, name, value)
    if mode in WITH_STRENGTH:
        req.strength = pick("strength")
    for name in INPUTS.get(mode, ()):
        value = pick(name)
        if value is None:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{mode} needs {flag}")
        setattr(req, name, os.path.abspath(value))
    return req


def check_loras_unchanged(req: Request, recipe: dict[str, Any], source: str, force: bool) -> None:
    """Refuse (unless `force`) a recipe's LoRA whose file no longer has the sha256 the recipe recorded."""
    recorded = {v["file"]: v.get("sha256") for v in recipe.get("loras", [])}
    for path, _ in req.loras:
        want = recorded.get(path)
        if want is None:
            continue
        if not Path(path).is_file():
            raise UsageError(f"the LoRA {path} that made {source} is gone")
        got = file_sha256(path)
        if got != want:
            message = (f"the LoRA {path} no longer matches the one that made {source} (sha256 {want[:12]} then, "
                       f"{got[:12]} now): the image would differ")
            if not force:
                raise UsageError(f"{message}; pass --force to use it anyway")
            from .generate import warn

            warn(message)


def check_inputs_unchanged(req: Request, recipe: dict[str, Any], source: str, force: bool) -> None:
    """Refuse (unless `force`) input files whose sha256 differs from the one the recipe recorded."""
    for key, path in req.input_files().items():
        recorded = recipe.get("hashes", {}).get(key)
        if recorded is None or not Path(path).is_file():
            continue
        if file_sha256(path) != recorded:
            message = (f"{path} has changed since {source} was made (sha256 {recorded[:12]} then, "
                       f"{file_sha256(path)[:12]} now): the image would differ")
            if not force:
                raise UsageError(f"{message}; pass --force to use it anyway")
            from .generate import warn

            warn(message)


def _model_file(req: Request, pipe: Any) -> str:
    """What the recipe records as the model: as given, except that a ComfyUI tree's transformer, picked from the
    tree, is named by its file (so that the recipe still means it once the tree holds another)."""
    if req.comfyui_models and Path(req.model).is_dir() and Path(req.model).resolve() == \
            Path(req.comfyui_models).resolve() and getattr(pipe, "source", None) is not None:
        return os.path.abspath(pipe.source)
    return req.model


def recipe_text(req: Request, seed: int, pipe: Any, model_hash: str) -> dict[str, str]:
    """The PNG text chunks: every value needed to make the same image again, as text that parses back exactly
    (repr of a float round-trips), and the sha256 of every input file."""
    text = {"mode": req.mode, "prompt": req.prompt}
    if req.negative_prompt is not None:
        text["negative_prompt"] = req.negative_prompt
    text.update(seed=str(seed), steps=str(req.steps), guidance=repr(float(req.guidance)), width=str(req.width),
                height=str(req.height))
    if req.strength is not None:
        text["strength"] = repr(float(req.strength))
    for key, path in req.input_files().items():
        if not key.startswith("redux_image_"):
            text[key] = path
        text[f"{key}_sha256"] = file_sha256(path)
    if req.redux_images:
        text["redux_images"] = json.dumps(req.redux_images)
    text.update(true_cfg=repr(float(req.true_cfg)), max_sequence_length=str(req.max_sequence_length),
                dtype=req.dtype, dtypes=json.dumps(req.dtypes, sort_keys=True),
                kernels=json.dumps(pipe.kernels, sort_keys=True), model=_model_file(req, pipe),
                model_name=str(pipe.name), model_hash=model_hash,
                kind=pipe.kind, device=str(pipe.device), Software=f"{PROG} {__version__}")
    for name in (*SOURCES, "redux_model", "siglip", "quantize"):
        if getattr(req, name) is not None:
            text[name] = str(getattr(req, name))
    if req.cache is not None:
        text["cache"] = repr(float(req.cache))
    if req.keep_reference_size:
        text["keep_reference_size"] = "true"
    if req.loras:
        text["loras"] = json.dumps([{"file": p, "name": Path(p).name, "sha256": file_sha256(p), "scale": s}
                                    for p, s in req.loras])
    text["parameters"] = infotext(req, seed, str(pipe.name), model_hash)
    text[VERSION_KEY] = __version__
    return text


def infotext(req: Request, seed: int, model_name: str, model_hash: str) -> str:
    """AUTOMATIC1111's "parameters" text (prompt, negative prompt, then "Key: value, ..."), which A1111, Forge,
    ComfyUI's readers and image sites show; the recipe itself is in the other chunks."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    items = {"Steps": req.steps, "Sampler": "Euler", "Schedule type": "Simple", "CFG scale": req.true_cfg,
             "Distilled CFG Scale": req.guidance, "Seed": seed, "Size": f"{req.width}x{req.height}",
             "Model hash": model_hash[:10], "Model": model_name}
    if req.strength is not None:
        items["Denoising strength"] = req.strength
    if req.loras:
        items["Lora hashes"] = json.dumps(", ".join(f"{Path(p).stem}: {file_sha256(p)[:12]}" for p, _ in req.loras))
    items["Version"] = f"{PROG} {__version__}"
    lines.append(", ".join(f"{k}: {v}" for k, v in items.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# the transformer's fingerprint

def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rectiflux"


def weights_sha256(files: Sequence[Path], cache: Path | None = None, notice: IO[str] | None = None) -> str:
    """sha256 of the weights: of the file itself for one file (what `sha256sum` prints), else of the lines
    "name sha256" of each shard. Hashing a full FLUX transformer reads 24 GB, so each file's hash is cached,
    keyed by its absolute path, size and modification time."""
    from ..files import atomic_write

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
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(file)}
            known[key], changed = entry, True
        hashes.append((Path(file).name, entry["sha256"]))
    if changed:
        with contextlib.suppress(OSError):  # a read-only home only costs the next run another hash
            with atomic_write(cache_file) as tmp:
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    if len(hashes) == 1:
        return hashes[0][1]
    return hashlib.sha256("".join(f"{name} {h}\n" for name, h in hashes).encode()).hexdigest()


def transformer_files(source: Path) -> list[Path]:
    from ..weights.checkpoint import weight_files

    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":  # one file, hashed as it is
        return [source]
    return weight_files(source if source.is_file() else source / "transformer")

