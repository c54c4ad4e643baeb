"""`rectiflux train` (the embedded shapes model's recipe) and `rectiflux eval` (its measured quality)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..training import DEFAULT_TARGETS
from .options import UsageError, debug_option, guidance_type, scale_type, seed_type, steps_type, whole_type
from .recipe import model_argument

STAGE_FILES = ("checkpoint.safetensors", "checkpoint.json", "metrics.jsonl")  # .json: a sharded run's manifest
SHARD_DIR = "checkpoint-shards"  # rectiflux.training.sharding.SHARD_DIR (not imported here: it imports torch)
FSDP_HELP = ("shard the model over the processes with FSDP2 instead of replicating it (DDP): under torchrun / "
             "accelerate launch; checkpoints are written one file per process and resume under as many")


def add_parsers(commands) -> None:
    p = commands.add_parser("train", help="train a model (the embedded shapes model's recipe)",
                            description="Train the shapes-world model from scratch: the autoencoder, then the "
                                        "transformer with guidance distillation, then export in the diffusers "
                                        "layout. Runs under torchrun / accelerate launch unchanged.")
    p.add_argument("--preset", default="shapes", choices=["shapes"], help="the recipe (default: shapes)")
    p.add_argument("--out", default="runs/shapes", help="run folder: checkpoints, metrics.jsonl, samples/, model/")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run")
    p.add_argument("--stages", default="ae,flux", help="which stages to run (default: ae,flux)")
    p.add_argument("--export-to", help="also write the final model folder here (default: OUT/model)")
    for name, what in [("ae-steps", "autoencoder steps"), ("flux-steps", "transformer steps"),
                       ("distill-steps", "final transformer steps spent distilling guidance"),
                       ("batch-size", "transformer global batch"), ("seed", "seed of the run"),
                       ("bank-size", "images encoded once for the transformer stage"),
                       ("log-every", "steps between metric lines"),
                       ("checkpoint-every", "steps between checkpoints"),
                       ("sample-every", "steps between sample grids (0: never)")]:
        low = 0 if name in ("seed", "sample-every", "distill-steps") else 1
        p.add_argument(f"--{name}", type=whole_type(f"--{name}", low), help=what)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--fsdp", action="store_true", help=FSDP_HELP)
    debug_option(p)

    p = commands.add_parser("train-lora", help="train LoRA adapters on a folder of captioned images",
                            description="Fine-tune LoRA adapters of a model's transformer on the images of DATA, each "
                                        "with a .txt caption beside it (as kohya and ai-toolkit read them). Writes "
                                        "OUT/pytorch_lora_weights.safetensors (diffusers/peft layout; "
                                        "--format kohya: OUT/lora.safetensors). Runs under torchrun / accelerate "
                                        "launch unchanged.")
    p.add_argument("data", metavar="DATA", help="the folder of images and captions")
    p.add_argument("--model", default="shapes", help="the model to adapt (default: the embedded shapes model)")
    p.add_argument("--out", default="runs/lora", help="run folder: the LoRA, checkpoint.safetensors, metrics.jsonl")
    p.add_argument("--rank", type=whole_type("--rank"), default=16, help="adapter rank (default 16)")
    p.add_argument("--alpha", type=scale_type, help="scale numerator: the adapters add alpha/rank x their product "
                                                    "(default: the rank)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated endings of the block linear layers to adapt (our names; default: "
                        f"{','.join(DEFAULT_TARGETS)})")
    p.add_argument("--steps", type=whole_type("--steps"), default=500)
    p.add_argument("--batch-size", type=whole_type("--batch-size"), default=8)
    p.add_argument("--lr", type=scale_type, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--seed", type=seed_type, default=0)
    p.add_argument("--timesteps", choices=("logit-normal", "shifted"), default="logit-normal",
                   help="noise levels drawn logit-normal, or shifted as the sampler shifts them for the image size")
    p.add_argument("--guidance", type=guidance_type, default=1.0, help="distilled guidance value while training")
    p.add_argument("--caption-dropout", type=scale_type, default=0.0, help="share of empty captions")
    p.add_argument("--resolution", type=whole_type("--resolution", 16), help="training image side (default: "
                                                                              "the model's width)")
    p.add_argument("--format", choices=("peft", "kohya"), default="peft", help="the LoRA file's layout")
    p.add_argument("--save-every", type=whole_type("--save-every"), default=100)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--fsdp", action="store_true", help=FSDP_HELP + " (the frozen transformer is sharded too)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run")
    debug_option(p)

    p = commands.add_parser("eval", help="measure a shapes-world model against its prompts",
                            description="Draw a fresh prompt set (every color-shape pair, held-out ones included, "
                                        "half small and half large) and a seed per prompt, render each canonical "
                                        "caption, read every image back with the world's checker, and print "
                                        "accuracy per attribute and the shape IoU for seen and held-out pairs, "
                                        "small and large apart.")
    p.add_argument("model", nargs="?", default="shapes", help="the model (default: the embedded shapes model)")
    p.add_argument("--per-pair", type=whole_type("--per-pair"), default=10,
                   help="prompts per color-shape pair (default 10: 240 prompts)")
    p.add_argument("--draw", type=seed_type, help="seed of the prompt set and its image seeds (default: drawn "
                                                  "now and printed, so the run can be repeated)")
    p.add_argument("--steps", type=steps_type, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=guidance_type, help="guidance scale (default: the model's)")
    p.add_argument("--speed", action="store_true", help="also time one image, measure the autoencoder's round "
                                                        "trip (PSNR, and the checker on its reconstructions) and "
                                                        "the model's size on disk")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--contact-sheet", metavar="PNG", help="also write the first four images of every pair (96) "
                                                         "with the checker's verdict under each")
    debug_option(p)


def existing_run(out: Path, stages: tuple[str, ...]) -> list[Path]:
    """The checkpoints and metrics of earlier runs in `out` that this run would overwrite or append to."""
    return [out / stage / name for stage in stages for name in STAGE_FILES if (out / stage / name).exists()]


def run_train(args: argparse.Namespace) -> int:
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
    for flag in ("bf16", "grad_checkpointing", "fsdp"):
        if getattr(args, flag):
            ae[flag] = flux[flag] = True
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if not stages or set(stages) - {"ae", "flux"}:
        raise UsageError(f"--stages takes ae, flux or both, got {args.stages!r}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    found = existing_run(Path(args.out), stages)
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"{args.out} holds a run ({found[0]}); pass --resume to continue it or --overwrite to "
                         "start afresh")
    if args.overwrite:
        for path in found:
            path.unlink(missing_ok=True)  # every process of a launch runs this
        for stage in stages:
            shutil.rmtree(Path(args.out) / stage / SHARD_DIR, ignore_errors=True)
    from ..shapes.recipe import train_shapes
    from .generate import quiet_libraries

    with quiet_libraries(args.debug):
        out = train_shapes(args.out, ae_overrides=ae, flux_overrides=flux, resume=args.resume, stages=stages,
                           export_to=args.export_to)
    print(f"wrote the model to {out}")
    return 0


def run_train_lora(args: argparse.Namespace) -> int:
    out = Path(args.out)
    found = [out / name for name in STAGE_FILES if (out / name).exists()]
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"{out} holds a run ({found[0]}); pass --resume to continue it or --overwrite to start "
                         "afresh")
    if not Path(args.data).is_dir():
        raise UsageError(f"no training folder at {args.data}")
    if args.overwrite:
        for path in found:
            path.unlink(missing_ok=True)  # every process of a launch runs this
        shutil.rmtree(out / SHARD_DIR, ignore_errors=True)
    from ..pipelines.load import load
    from ..training.lora import train_lora
    from .generate import quiet_libraries

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    with quiet_libraries(args.debug):
        pipe = load(model_argument(args.model))
    path = train_lora(pipe, resume=args.resume, data=args.data, out=args.out, rank=args.rank, alpha=args.alpha,
                      targets=targets, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      timesteps=args.timesteps, guidance=args.guidance, caption_dropout=args.caption_dropout,
                      resolution=args.resolution, format=args.format, save_every=args.save_every, bf16=args.bf16,
                      grad_checkpointing=args.grad_checkpointing, fsdp=args.fsdp)
    print(f"wrote the LoRA to {path}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import secrets

    from ..files import atomic_write
    from ..pipelines.load import load
    from ..shapes.evaluate import (
        autoencoder_round_trip,
        contact_sheet,
        drawn_seeds,
        folder_megabytes,
        format_report,
        judge,
        seconds_per_image,
        summarize,
    )
    from ..shapes.world import drawn_scenes
    from ..weights.sources import model_path
    from .generate import quiet_libraries

    model = model_argument(args.model)
    with quiet_libraries(args.debug):
        pipe = load(model)
    pipe.set_progress_bar_config(disable=True)
    draw = args.draw if args.draw is not None else secrets.randbelow(2**31)
    scenes = drawn_scenes(draw, args.per_pair)
    print(f"{len(scenes)} prompts drawn with --draw {draw}")
    kwargs = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance)) if v}
    judged = judge(pipe, scenes, drawn_seeds(draw, len(scenes)), **kwargs)
    fidelity = summarize(judged)
    round_trip = latency = megabytes = None
    if args.speed:
        round_trip, latency = autoencoder_round_trip(pipe), seconds_per_image(pipe)
        folder = model_path(model) or Path(model)
        megabytes = folder_megabytes(folder) if folder.is_dir() else None
    print(format_report(fidelity, round_trip, latency, megabytes))
    if args.contact_sheet:
        first = [j for k, j in enumerate(judged) if k % args.per_pair < 4][:96]
        with atomic_write(args.contact_sheet) as tmp:
            contact_sheet(first).save(tmp, format="PNG")
        print(f"wrote {args.contact_sheet}")
    if args.json:
        figures = {"draw": draw, "per_pair": args.per_pair, **kwargs, "fidelity": fidelity,
                   "autoencoder_round_trip": round_trip, "seconds_per_image": latency, "megabytes": megabytes}
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(figures, indent=2) + "\n")
    return 0
