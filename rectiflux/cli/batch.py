"""`rectiflux batch PROMPTS --out DIR`: one image (or `num_images`) per line of a text or JSONL file.

A text line is a prompt; a JSONL line is a recipe: any setting the generating commands take, by its recipe name
(the keys a rectiflux PNG carries, so a PNG's recipe works as a line) or its flag name. Line n's seed is the base
seed (`--seed`, default 0) + n unless the line gives one, so any image can be made again alone. Image files are
named by line number, written whole (with their recipe, like every rectiflux PNG), and a line whose images exist
is skipped: re-running resumes. A bad line is reported and skipped; the exit status is then 1, after every other
line ran. `manifest.jsonl` lists every line's images (or error), rewritten whole after each line.

Under torchrun the lines are shared out over the ranks (line n to rank (n - 1) mod world), each rank writing its
own part of the manifest; rank 0 merges them at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ..files import atomic_write
from .options import SEED_LIMIT, UsageError, model_options, sampling_options, whole_type
from .recipe import INPUTS, RECIPE_FIELDS, VERSION_KEY

# how the model is loaded and run: the command line's for the whole batch (one batch is one model). A line (a PNG's
# recipe, say) may name the batch's model and LoRAs; anything else about the model in a line is left alone.
MODEL_KEYS = ("vae", "text_encoders", "clip", "t5", "tokenizers", "comfyui_models", "kind", "dtype", "dtypes",
              "kernels", "quantize", "device", "blocks", "compile", "cache_dir")
# what a PNG recipe carries beside its settings: read and left alone
RECORDED = ("model_name", "model_hash", VERSION_KEY, "Software", "parameters", "redux_images", "redux_model",
            "siglip")
SAMPLING = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "strength", "true_cfg",
            "max_sequence_length", "cache", "num_images")


def add_parsers(commands) -> None:
    p = commands.add_parser(
        "batch", help="make the images of every line of a prompt file (text or JSONL), resumable",
        description="Make the images of every line of PROMPTS: a text file (one prompt a line) or JSONL (one recipe "
                    "a line, any setting of the generating commands). Line n uses seed --seed + n unless it gives "
                    "one. Re-running skips the lines already made; a bad line is reported and skipped (exit "
                    "status 1 at the end). Under torchrun the lines are shared out over the ranks.")
    p.add_argument("prompts", metavar="PROMPTS", help="the prompt file (.txt: a prompt a line; .jsonl: a recipe a "
                                                      "line; blank lines and lines starting with # are skipped)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the images and manifest.jsonl go")
    p.add_argument("--redo", action="store_true", help="make every line again, replacing its images")
    p.add_argument("--ray", action="store_true", help="run the lines on Ray Data: an actor pool of pipelines, one per "
                                                     "GPU (else per CPU slot) of the Ray cluster")
    p.add_argument("--ray-address", metavar="ADDRESS", help="the Ray cluster to join (default: $RAY_ADDRESS, else a "
                                                            "local Ray started for the batch)")
    p.add_argument("--ray-workers", type=whole_type("the number of Ray workers"), metavar="N",
                   help="pipelines in the actor pool (default: one per GPU, else per CPU)")
    sampling_options(p, with_strength=True)
    model_options(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


class BadLine(ValueError):
    pass


def _value(key: str, value: Any) -> Any:
    """A line's value, checked by the recipe's own parser (which takes text)."""
    if key == "num_images":
        from .options import count_type

        parse = count_type
    else:
        parse = RECIPE_FIELDS[key]
    if parse is str:
        if not isinstance(value, str):
            raise BadLine(f"{key} must be text, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadLine(f"{key}: got {value!r}")
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as e:
        raise BadLine(f"{key}: {e}") from None


def parse_line(text: str, folder: Path) -> dict[str, Any] | None:
    """The settings of one line (None for a blank or comment line); input paths are relative to the file's folder."""
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    if not text.startswith("{"):
        return {"prompt": text}
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise BadLine(f"not a JSON object ({e})") from None
    if not isinstance(raw, dict):
        raise BadLine("not a JSON object")
    line: dict[str, Any] = {}
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key in RECORDED or key.endswith("_sha256") or value is None:
            continue
        if key in MODEL_KEYS:
            continue
        if key == "model":
            line[key] = value
            continue
        if key == "loras":
            files = value if isinstance(value, list) else _value("loras", value)
            line[key] = sorted((v.get("file"), float(v.get("scale", 1))) for v in files if isinstance(v, dict))
            continue
        inputs = {k for v in INPUTS.values() for k in v}
        if key not in SAMPLING and key not in inputs and key not in ("mode", "keep_reference_size"):
            raise BadLine(f"unknown setting {key}")
        if key in inputs:
            if not isinstance(value, str):
                raise BadLine(f"{key} must be a path")
            line[key] = str((folder / value).absolute())
        elif key == "keep_reference_size":
            line[key] = value in (True, "true")
        else:
            line[key] = _value(key, value)
    if "prompt" not in line:
        raise BadLine("no prompt")
    return line


def read_lines(path: Path) -> list[tuple[int, dict[str, Any] | BadLine]]:
    """(line number, settings or the reason it is bad) of each line that is not blank or a comment."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    out: list[tuple[int, dict[str, Any] | BadLine]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            settings = parse_line(line, path.parent)
        except BadLine as e:
            out.append((number, e))
            continue
        if settings is not None:
            out.append((number, settings))
    return out


def image_paths(out: Path, number: int, count: int) -> list[Path]:
    stem = f"line-{number:05d}"
    return [out / f"{stem}.png"] if count == 1 else [out / f"{stem}-{k}.png" for k in range(1, count + 1)]


def is_done(paths: list[Path]) -> bool:
    """Every image of the line exists whole (a PNG with its recipe): written atomically, so existing means whole."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                if VERSION_KEY not in getattr(im, "text", {}):
                    return False
        except (OSError, ValueError):
            return False
    return True


def request_for(args: argparse.Namespace, line: dict[str, Any], number: int) -> Any:
    """The line's request: the command line's settings under the line's own."""
    from .recipe import make_request, model_argument

    batch_model = model_argument(args.model or args.comfyui_models or "shapes")
    if "model" in line and model_argument(str(line["model"])) != batch_model:
        raise BadLine(f"model: the line names the model {line['model']}; one batch runs one model ({batch_model})")
    batch_loras = sorted((os.path.abspath(p), float(s)) for p, s in args.loras)
    if "loras" in line and line["loras"] != batch_loras:
        raise BadLine("loras: the line names other LoRAs; one batch runs the command line's --lora ones")
    base = {k: getattr(args, k) for k in SAMPLING if getattr(args, k, None) is not None}
    settings = {k: v for k, v in {**base, **line}.items() if k not in ("model", "loras")}
    if "seed" not in line:
        settings["seed"] = (args.seed or 0) + number
    line_args = argparse.Namespace(**{**vars(args), **{k: None for k in SAMPLING}, "command": "generate",
                                      "num_images": settings.get("num_images") or 1})
    if settings["seed"] + line_args.num_images > SEED_LIMIT:
        raise BadLine(f"seed {settings['seed']} + line {number} goes past the largest seed")
    return make_request(line_args, settings)


class LineMaker:
    """The batch's model and what it makes of one line: in this process, or as Ray Data's actor in each worker."""

    def __init__(self, args: argparse.Namespace, device: Any = None) -> None:
        from .generate import pick_device, prepare_pipeline
        from .recipe import transformer_files, weights_sha256

        self.args, self.out = args, Path(args.out)
        base = request_for(args, {"prompt": ""}, 1)
        base.dtype = base.dtype or "auto"
        self.pipe = prepare_pipeline(base, device if device is not None else pick_device(base.device), args.debug)
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype, self.dtypes = base.dtype, base.dtypes
        self.model_hash = weights_sha256(transformer_files(self.pipe.source))

    def make(self, number: int, settings: dict[str, Any], on_image: Any = None) -> dict[str, Any]:
        """The line's images, written; its manifest entry (with `error` if the line could not be made)."""
        from .generate import (
            check_kind,
            check_text,
            load_inputs,
            make_image,
            one_line,
            pipe_inputs,
            resolve_settings,
            write_png,
        )
        from .recipe import recipe_text

        try:
            req = request_for(self.args, settings, number)
            req.dtype, req.dtypes = self.dtype, self.dtypes
            paths = image_paths(self.out, number, req.num_images)
            check_text(req)
            images = load_inputs(req)
            check_kind(req, self.pipe)
            resolve_settings(req, self.pipe, images)
            for k, path in enumerate(paths):
                result = make_image(self.pipe, req, req.seed + k, {"prompt": req.prompt}, pipe_inputs(images))
                write_png(result.images[0], path, recipe_text(req, req.seed + k, self.pipe, self.model_hash), True)
                if on_image is not None:
                    on_image()
        except (UsageError, BadLine, ValueError, ArithmeticError) as e:
            return {"line": number, "error": one_line(e)}
        return {"line": number, "images": [p.name for p in paths], "seed": req.seed, "prompt": req.prompt,
                "mode": req.mode, "width": req.width, "height": req.height, "steps": req.steps}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data's map_batches: rows of (line, settings as JSON) to rows of (line, manifest entry as JSON)."""
        entries = [self.make(int(n), json.loads(str(s))) for n, s in zip(batch["line"], batch["settings"],
                                                                           strict=True)]
        return {"line": [e["line"] for e in entries], "entry": [json.dumps(e) for e in entries]}


def run_batch(args: argparse.Namespace) -> int:
    from ..progress import progress_bar
    from ..training.trainer import init_distributed
    from .generate import one_line, warn

    started = time.perf_counter()
    source, out = Path(args.prompts), Path(args.out)
    if not source.is_file():
        raise UsageError(f"no prompt file at {source}")
    lines = read_lines(source)
    if not lines:
        raise UsageError(f"{source} holds no prompt")
    if out.exists() and not out.is_dir():
        raise UsageError(f"the output {out} is not a folder")
    if args.ray and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--ray shares the lines out itself: run it without torchrun")
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out.absolute())  # Ray's workers may start elsewhere
    rank, world = init_distributed()
    if rank == 0:  # what a killed run was writing (atomic writes leave only these behind)
        for pattern in (".line-*.png.*.tmp", ".manifest*.jsonl.*.tmp"):
            for stale in out.glob(pattern):
                stale.unlink(missing_ok=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    mine = [(n, s) for n, s in lines if (n - 1) % world == rank]

    entries: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, dict[str, Any], int]] = []
    for number, settings in mine:
        if isinstance(settings, BadLine):
            entries[number] = {"line": number, "error": str(settings)}
            continue
        try:
            req = request_for(args, settings, number)
        except (UsageError, BadLine) as e:
            entries[number] = {"line": number, "error": one_line(e)}
            continue
        paths = image_paths(out, number, req.num_images)
        if not args.redo and is_done(paths):
            entries[number] = {"line": number, "images": [p.name for p in paths], "seed": req.seed,
                               "prompt": req.prompt, "skipped": True}
            continue
        todo.append((number, settings, req.num_images))
    for number, entry in sorted(entries.items()):
        if "error" in entry:
            warn(f"line {number}: {entry['error']}")

    part = out / f"manifest.rank{rank}.jsonl" if world > 1 else out / "manifest.jsonl"
    made = 0
    if todo:
        bar = progress_bar(sum(count for _, _, count in todo), desc="batch" if world == 1 else f"batch rank {rank}")

        def record(entry: dict[str, Any]) -> None:
            nonlocal made
            entries[entry["line"]] = entry
            if "error" in entry:
                warn(f"line {entry['line']}: {entry['error']}")
            else:
                made += len(entry["images"])
            write_manifest(part, entries)

        if args.ray:
            for entry in run_on_ray(args, todo):
                record(entry)
                bar.update(len(entry.get("images", ())))
        else:
            device = None
            if world > 1:
                import torch

                if torch.cuda.is_available():
                    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            maker = LineMaker(args, device)
            for number, settings, _ in todo:
                record(maker.make(number, settings, on_image=lambda: bar.update(1)))
        bar.close()
    write_manifest(part, entries)
    failed = sum("error" in e for e in entries.values())
    if world > 1:
        import torch.distributed as dist

        counts = [None] * world
        dist.all_gather_object(counts, (made, failed))
        if rank == 0:
            merged: dict[int, dict[str, Any]] = {}
            for r in range(world):
                merged.update(read_manifest(out / f"manifest.rank{r}.jsonl"))
            write_manifest(out / "manifest.jsonl", merged)
            for r in range(world):
                (out / f"manifest.rank{r}.jsonl").unlink(missing_ok=True)
        made, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"made {made} image{'s' if made != 1 else ''} in {out} ({len(lines) - failed} of {len(lines)} lines "
              f"done, {failed} bad; {time.perf_counter() - started:.1f} s)", flush=True)
    return 1 if failed else 0


def run_on_ray(args: argparse.Namespace, todo: list[tuple[int, dict[str, Any], int]]):
    """The lines on Ray Data: an actor pool of LineMakers (one per GPU, else one per CPU slot), `map_batches` over
    the lines, one line per batch; yields each line's manifest entry as it arrives."""
    # the progress bar is ours: Ray Data's own progress lines (INFO, read when ray.data is imported) would repeat it
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'rectiflux[ray]'") from None
    import logging

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    for name in ("ray", "ray.data"):  # ray.init configures its loggers: quiet them after it
        logging.getLogger(name).setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    context.enable_progress_bars = False
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        workers = args.ray_workers or max(1, gpus or int(resources.get("CPU", 1)))
        per_worker = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        rows = [{"line": n, "settings": json.dumps(s)} for n, s, _ in todo]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        pool = ray.data.ActorPoolStrategy(size=min(workers, len(rows)))
        results = ds.map_batches(LineMaker, fn_constructor_kwargs={"args": args}, batch_size=1, compute=pool,
                                 **per_worker)
        for row in results.iter_rows():
            yield json.loads(row["entry"])
    finally:
        if started_here:
            ray.shutdown()


def write_manifest(path: Path, entries: dict[int, dict[str, Any]]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(entries[n]) + "\n" for n in sorted(entries)))


def read_manifest(path: Path) -> dict[int, dict[str, Any]]:
    try:
        return {e["line"]: e for e in map(json.loads, path.read_text().splitlines()) if isinstance(e, dict)}
    except (OSError, ValueError):
        return {}
