"""Measured quality of a shapes-world model: prompt fidelity per attribute, autoencoder PSNR, and speed."""

from __future__ import annotations

import random
import statistics
import time

import numpy as np
import torch

from ..images import psnr
from ..pipelines.flux import FluxPipeline
from .checker import score
from .world import ATTRIBUTES, HELD_OUT, Scene, eval_scenes, random_scene, render


@torch.no_grad()
def prompt_fidelity(pipe: FluxPipeline, scenes: list[Scene] | None = None, seed: int = 0, batch: int = 8,
                    shapes: tuple[str, ...] | None = None, **kwargs) -> dict:
    """Render each scene's canonical caption with a fixed seed per prompt and check the image against it.

    Returns accuracy per attribute and for all attributes at once, for seen and held-out color-shape pairs.
    """
    scenes = scenes if scenes is not None else eval_scenes()
    results: dict[str, list[dict[str, bool]]] = {"seen": [], "held_out": []}
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe([s.caption() for s in chunk], generator=generators, output_type="np", **kwargs).images
        for scene, image in zip(chunk, images, strict=True):
            group = "held_out" if (scene.color, scene.shape) in HELD_OUT else "seen"
            results[group].append(score(scene, image, shapes) if shapes else score(scene, image))
    report = {}
    for group, rows in results.items():
        if rows:
            report[group] = {a: float(np.mean([r[a] for r in rows])) for a in (*ATTRIBUTES, "all")}
            report[group]["n"] = len(rows)
    return report


@torch.no_grad()
def autoencoder_psnr(pipe: FluxPipeline, n: int = 128, seed: int = 987_654) -> float:
    """Reconstruction PSNR (dB) on fresh shapes images (a seed the trainer never uses), posterior mean."""
    rng = random.Random(seed)
    images = [np.asarray(render(random_scene(rng, allow_held_out=True), rng), dtype=np.float32) for _ in range(n)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    ae = pipe.autoencoder
    x = x.to(ae.decoder.conv_in.weight)
    recon = ae.decode(ae.encode(x).mean).clamp(-1, 1)
    return psnr(recon, x, data_range=2.0)


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


def format_report(fidelity: dict, psnr: float | None = None, latency: float | None = None) -> str:
    lines = [f"{'pairs':<10}" + "".join(f"{a:>12}" for a in (*ATTRIBUTES, "all")) + f"{'n':>6}"]
    for group, acc in fidelity.items():
        lines.append(f"{group:<10}" + "".join(f"{acc[a]:>12.1%}" for a in (*ATTRIBUTES, "all")) + f"{acc['n']:>6}")
    if psnr is not None:
        lines.append(f"autoencoder PSNR on fresh images: {psnr:.1f} dB")
    if latency is not None:
        lines.append(f"one image at the default settings: {latency:.3f} s")
    return "\n".join(lines)
