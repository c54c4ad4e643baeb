"""Step caching (transformer.FirstBlockCache): speed-up and PSNR against the uncached image.

    python -m benchmarks.cache [--configs shapes,medium] [--thresholds 0.05,0.1,0.2] [--out docs/bench-cache.md]

shapes: the embedded model on its 24 one-per-pair evaluation prompts (fixed seeds), at its default 8 steps and
at 28. medium: bench.py's medium random FLUX (8 double + 16 single blocks, hidden 1536) on one 512x512 image
at 20 steps. Float32, all threads; each row is the same images rendered with the cache at that threshold.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def render(pipe, prompts: list[str], steps: int, size: int | None, threshold: float | None):
    """Images of `prompts` (seed = index), seconds per image, and steps per image that ran every block."""
    images, cached, start = [], 0, time.perf_counter()
    for i, prompt in enumerate(prompts):
        out = pipe(prompt, num_inference_steps=steps, height=size, width=size, seed=i, output_type="np",
                   cache_threshold=threshold)
        images.append(out.images)
        cached += out.cached_steps
    return np.concatenate(images), (time.perf_counter() - start) / len(prompts), steps - cached / len(prompts)


def psnr_text(a: np.ndarray, b: np.ndarray) -> str:
    from rectiflux.images import psnr

    db = psnr(a, b)
    return "identical" if db == float("inf") else f"{db:.1f}"


def run(name: str, pipe, prompts: list[str], steps: int, size: int | None, thresholds: list[float]) -> list[str]:
    render(pipe, prompts[:1], 1, size, None)  # warm-up
    reference, seconds, _ = render(pipe, prompts, steps, size, None)
    lines = [f"| {name} | {steps} | off | {seconds:.3g} | 1.00 | - | {steps} |"]
    print(lines[-1], flush=True)
    for threshold in thresholds:
        images, cached_s, full = render(pipe, prompts, steps, size, threshold)
        lines.append(f"| {name} | {steps} | {threshold:g} | {cached_s:.3g} | {seconds / cached_s:.2f} | "
                     f"{psnr_text(images, reference)} | {full:.1f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    import rectiflux
    from benchmarks.bench import CONFIGS, build_folder, write_report
    from rectiflux.shapes.world import eval_scenes

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="shapes,medium")
    p.add_argument("--thresholds", default="0.05,0.1,0.2")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-cache.md")
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in args.configs.split(","):
        if name == "shapes":
            pipe = rectiflux.load("shapes")
            prompts = [s.caption() for s in eval_scenes(1)]
            for steps in (8, 28):
                rows += run("shapes", pipe, prompts, steps, None, thresholds)
        elif name == "medium":
            with tempfile.TemporaryDirectory(prefix="rectiflux-cache-") as tmp:
                print("medium: writing random weights", flush=True)
                build_folder(Path(tmp), CONFIGS["medium"].model)
                pipe = rectiflux.load(tmp)
                rows += run("medium", pipe, ["a large red circle on the left on a white background"], 20, 512,
                            thresholds)
        else:
            p.error(f"unknown config {name}")
    lines = ["# Step caching", "", f"`python -m benchmarks.cache {' '.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}, {os.cpu_count()} threads, float32, "
             "OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "(unset)"), "",
             "`cache_threshold` (CLI `--cache`): the blocks after the first are skipped on steps whose first-block "
             "residual changed, in all since the last full step, by less than the threshold (relative mean "
             "absolute change). PSNR is against the same images without the cache (pixels in [0, 1]).", "",
             "| model | steps | threshold | s/image | speed-up | PSNR (dB) | full steps per image |",
             "|---|---|---|---|---|---|---|", *rows]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
