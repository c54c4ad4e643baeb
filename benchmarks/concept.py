"""Teach the embedded shapes model a shape it has never seen (a diamond) with a LoRA trained here, and measure it:
the checker's fidelity on diamond prompts without and with the LoRA, and on the world's own prompts (do the old
concepts stay right?).

    python -m benchmarks.concept [--new 48] [--others 24] [--steps 800] [--rank 16] [--out docs/lora-concept.md]

The training folder holds rendered diamonds and a few of the world's own shapes (so the adapters learn what is new
rather than to draw everything as a diamond), each with a caption file, as kohya and ai-toolkit read them. (A new
color cannot be taught to this model: its autoencoder, trained on the world's six, decodes any other as one of them.)
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_dataset(folder: Path, new: int, others: int, seed: int) -> None:
    from rectiflux.shapes.world import random_caption, random_scene, render

    rng = random.Random(seed)
    for i in range(new + others):
        scene = random_scene(rng)
        if i < new:
            scene = type(scene)(scene.background, scene.color, "diamond", scene.size, scene.position)
        render(scene, rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(random_caption(scene, rng))


def diamond_scenes(count: int):
    from rectiflux.shapes.world import BACKGROUNDS, COLORS, POSITIONS, SIZES, Scene

    combos = list(itertools.product(BACKGROUNDS, COLORS, SIZES, POSITIONS))
    random.Random(1).shuffle(combos)
    return [Scene(bg, color, "diamond", size, pos) for bg, color, size, pos in combos[:count]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, default=48, help="training images of diamonds")
    p.add_argument("--others", type=int, default=24, help="training images of the world's own shapes")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "lora-concept.md")
    args = p.parse_args(argv)
    import torch

    import rectiflux
    from benchmarks.bench import machine, write_report
    from rectiflux.shapes.evaluate import prompt_fidelity
    from rectiflux.shapes.world import NEW_SHAPES, SHAPES, eval_scenes
    from rectiflux.training.lora import train_lora

    torch.set_num_threads(2)
    warnings.simplefilter("ignore")  # the model rightly warns that it does not know 'diamond'
    shapes = SHAPES + NEW_SHAPES
    pipe = rectiflux.load("shapes")
    pipe.set_progress_bar_config(disable=True)
    new, old = diamond_scenes(40), eval_scenes(1)
    figures = {"without": (prompt_fidelity(pipe, new, shapes=shapes), prompt_fidelity(pipe, old))}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        write_dataset(data, args.new, args.others, seed=0)
        start = time.perf_counter()
        lora = train_lora(pipe, data=str(data), out=str(Path(tmp) / "run"), rank=args.rank, steps=args.steps,
                          batch_size=8, lr=args.lr, save_every=args.steps)
        seconds = time.perf_counter() - start
        pipe.load_lora_weights(lora)
        figures["with"] = (prompt_fidelity(pipe, new, shapes=shapes), prompt_fidelity(pipe, old))
        size = lora.stat().st_size / 2**10
    rows = []
    for label, (diamond, world) in figures.items():
        rows.append(f"| {label} the LoRA | {diamond['seen']['shape']:.0%} | {diamond['seen']['all']:.0%} | "
                    f"{world['seen']['all']:.0%} | {world['held_out']['all']:.0%} |")
    lines = ["# Teaching the embedded model a new shape with a LoRA", "",
             f"`python -m benchmarks.concept {' '.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}", "", *machine(2, "cpu", "float32")[:2],
             "", f"Training: {args.new} rendered diamonds and {args.others} of the world's own shapes, captions "
             f"as the world writes them; rank {args.rank} on every attention and MLP projection of the blocks, "
             f"{args.steps} steps of batch 8, lr {args.lr}: {seconds:.0f} s on this CPU, a {size:.0f} KiB LoRA "
             "(diffusers layout).", "",
             f"The checker (with the diamond among the shapes it reads) on {len(new)} diamond prompts of every color, "
             f"size, position and background, and on the world's {len(old)} canonical prompts (seen and held-out "
             "color-shape pairs); default steps and guidance, fixed seeds.", "",
             "| | diamond prompts: shape right | diamond prompts: all right | world, seen: all right | "
             "world, held-out: all right |", "|---|---|---|---|---|", *rows]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
