"""Image quality of the 8-bit transformer modes against float32 on the shipped shapes model.

    python -m benchmarks.quant_quality

Renders the 24 one-per-pair evaluation prompts with fixed seeds in float32 and in each 8-bit mode and prints
the PSNR of each mode's images against float32's.
"""

import numpy as np
import torch

import rectiflux
from rectiflux.shapes.world import eval_scenes


def render(pipe) -> np.ndarray:
    prompts = [s.caption() for s in eval_scenes(1)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, output_type="np").images


def main() -> None:
    reference = render(rectiflux.load("shapes"))
    for mode in ("int8", "int8-dynamic", "float8"):
        pipe = rectiflux.load("shapes", quantize=mode)
        mse = float(((render(pipe) - reference) ** 2).mean())
        print(f"{mode:>13}: PSNR {10 * np.log10(1 / max(mse, 1e-12)):.1f} dB against float32 "
              f"(attention: {pipe.transformer.attention.__name__})")


if __name__ == "__main__":
    main()
