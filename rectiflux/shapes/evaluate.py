"""Measured quality of a shapes-world model: prompt fidelity per attribute, shape IoU, autoencoder PSNR, speed."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..images import postprocess, psnr
from ..pipelines.flux import FluxPipeline
from .checker import compare, read_scene, shape_iou
from .world import ATTRIBUTES, HELD_OUT, SHAPES, Scene, eval_scenes, random_scene, render

IOU_BAR = 0.80  # the share of images whose shape IoU reaches this is reported beside the median


@dataclass
class Judged:
    """One generated image, what the checker read in it, and its shape IoU against the ideal render."""
    scene: Scene
    seed: int
    image: np.ndarray
    found: dict[str, str | None]
    iou: float

    @property
    def right(self) -> dict[str, bool]:
        return compare(self.scene, self.found)

    @property
    def held_out(self) -> bool:
        return (self.scene.color, self.scene.shape) in HELD_OUT


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1] (the pipeline's `output_type="np"`) as the 8-bit pixels a PNG would hold."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def judge(pipe: FluxPipeline, scenes: list[Scene], seeds: list[int], batch: int = 8,
          shapes: tuple[str, ...] = SHAPES, **kwargs) -> list[Judged]:
    """Render each scene's canonical caption with its seed and read the image back."""
    judged = []
    for start in range(0, len(scenes), batch):
        chunk, chunk_seeds = scenes[start:start + batch], seeds[start:start + batch]
        generators = [torch.Generator().manual_seed(s) for s in chunk_seeds]
        images = pipe([s.caption() for s in chunk], generator=generators, output_type="np", **kwargs).images
        for scene, seed, pixels in zip(chunk, chunk_seeds, to_uint8(images), strict=True):
            judged.append(Judged(scene, seed, pixels, read_scene(pixels, shapes), shape_iou(scene, pixels)))
    return judged


def summarize(judged: list[Judged]) -> dict[str, dict[str, float]]:
    """Accuracy per attribute and of all at once, the median shape IoU and the share at IOU_BAR or above, for
    seen and held-out color-shape pairs, each also split by size."""
    groups: dict[str, list[Judged]] = {}
    for j in judged:
        pairs = "held_out" if j.held_out else "seen"
        groups.setdefault(pairs, []).append(j)
        groups.setdefault(f"{pairs} {j.scene.size}", []).append(j)
    report = {}
    for name in ("seen", "seen small", "seen large", "held_out", "held_out small", "held_out large"):
        rows = groups.get(name)
        if not rows:
            continue
        acc = {a: float(np.mean([j.right[a] for j in rows])) for a in (*ATTRIBUTES, "all")}
        ious = [j.iou for j in rows]
        report[name] = {**acc, "iou_median": float(np.median(ious)),
                        "iou_share_at_bar": float(np.mean([i >= IOU_BAR for i in ious])), "n": len(rows)}
    return report


def prompt_fidelity(pipe: FluxPipeline, scenes: list[Scene] | None = None, seed: int = 0, batch: int = 8,
                    shapes: tuple[str, ...] = SHAPES, **kwargs) -> dict:
    """`summarize` of the scenes rendered with seeds seed, seed + 1, ... (default: the fixed `eval_scenes()`)."""
    scenes = scenes if scenes is not None else eval_scenes()
    return summarize(judge(pipe, scenes, [seed + i for i in range(len(scenes))], batch, shapes, **kwargs))


def drawn_seeds(draw: int, count: int) -> list[int]:
    """One image seed per prompt, drawn from the prompt set's seed."""
    rng = random.Random(draw * 7919 + 1)
    return [rng.randrange(2**31) for _ in range(count)]


@torch.no_grad()
def autoencoder_round_trip(pipe: FluxPipeline, n: int = 240, seed: int = 987_654) -> dict[str, float]:
    """Fresh shapes images (a seed the trainer never uses) through the autoencoder and back (posterior mean):
    the PSNR (dB), and the checker's reading of the reconstructions (all attributes right, median shape IoU).
    Beside the prompt fidelity it says which half of the model a miss comes from: a shape the decoder cannot
    draw, or a latent the transformer did not make."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, allow_held_out=True) for _ in range(n)]
    images = [np.asarray(render(scene, rng), dtype=np.float32) for scene in scenes]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    ae = pipe.autoencoder
    x = x.to(ae.decoder.conv_in.weight)
    recon = ae.decode(ae.encode(x).mean).float().clamp(-1, 1)
    pixels = to_uint8(postprocess(recon))  # as the pipeline turns a decoded latent into an image
    right = [compare(scene, read_scene(image))["all"] for scene, image in zip(scenes, pixels, strict=True)]
    ious = [shape_iou(scene, image) for scene, image in zip(scenes, pixels, strict=True)]
    return {"psnr_db": psnr(recon, x.float(), data_range=2.0), "all": float(np.mean(right)),
            "iou_median": float(np.median(ious)), "n": n}


@torch.no_grad()
def seconds_per_image(pipe: FluxPipeline, repeats: int = 5, prompt: str = "a large red circle on the left") -> float:
    """Median wall time of one image at the model's default size and steps, text encoding and decoding included."""
    pipe(prompt, seed=0)  # warm-up
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        pipe(prompt, seed=i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def folder_megabytes(folder: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20


def format_report(fidelity: dict, round_trip: dict | None = None, latency: float | None = None,
                  megabytes: float | None = None) -> str:
    columns = (*ATTRIBUTES, "all")
    lines = [f"{'pairs':<15}" + "".join(f"{a:>11}" for a in columns) + f"{'IoU med':>9}{'>=' + str(IOU_BAR):>8}"
             + f"{'n':>5}"]
    for group, acc in fidelity.items():
        lines.append(f"{group:<15}" + "".join(f"{acc[a]:>11.1%}" for a in columns)
                     + f"{acc['iou_median']:>9.3f}{acc['iou_share_at_bar']:>8.1%}{acc['n']:>5}")
    if round_trip is not None:
        lines.append(f"autoencoder round trip of {round_trip['n']} fresh images: {round_trip['psnr_db']:.1f} dB PSNR, "
                     f"all attributes read right {round_trip['all']:.1%}, IoU median {round_trip['iou_median']:.3f}")
    if latency is not None:
        lines.append(f"one image at the default settings: {latency:.3f} s")
    if megabytes is not None:
        lines.append(f"on disk: {megabytes:.1f} MB")
    return "\n".join(lines)


SHORT = {"center": "centre", "left": "left", "right": "right", "top": "top", "bottom": "bottom"}


def contact_sheet(judged: list[Judged], columns: int = 12, scale: int = 2) -> Image.Image:
    """The images in a grid, each with its prompt and the checker's verdict under it: `ok` or what was read
    instead, and the shape IoU; held-out pairs are marked `(held out)`."""
    font = ImageFont.load_default(size=11)
    cell_w, image_side, text_h = 64 * scale + 8, 64 * scale, 44
    rows = (len(judged) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * (image_side + text_h + 6)), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    for k, j in enumerate(judged):
        x, y = (k % columns) * cell_w + 4, (k // columns) * (image_side + text_h + 6) + 4
        sheet.paste(Image.fromarray(j.image).resize((image_side, image_side), Image.NEAREST), (x, y))
        s = j.scene
        lines = [f"{s.size} {s.color} {s.shape}", f"{SHORT[s.position]}, {s.background}"
                 + (" (held out)" if j.held_out else "")]
        wrong = [f"{a}: {j.found[a]}" for a in ATTRIBUTES if not j.right[a]]
        verdict = ("ok" if not wrong else "; ".join(wrong)) + f"  IoU {j.iou:.2f}"
        colour = (20, 120, 40) if not wrong else (190, 30, 30)
        ty = y + image_side + 2
        for line in lines:
            draw.text((x, ty), line, fill=(40, 40, 40), font=font)
            ty += 13
        draw.text((x, ty), verdict, fill=colour, font=font)
    return sheet
