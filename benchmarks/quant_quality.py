"""Image quality of the 8-bit transformer modes against float32 on the shipped shapes model.

    python -m benchmarks.quant_quality

Renders the 24 one-per-pair evaluation prompts with fixed seeds in float32 and in each 8-bit mode and prints
the PSNR of each mode's images against float32's; then the same for the model's transformer written as a Q8_0 GGUF
file (its blocks' linears in Q8_0, the rest F32), as stored and quantised again for int8 products.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

import rectiflux
from rectiflux.shapes.world import eval_scenes


def render(pipe) -> np.ndarray:
    prompts = [s.caption() for s in eval_scenes(1)]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, output_type="np").images


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    mse = float(((images - reference) ** 2).mean())
    return 10 * np.log10(1 / max(mse, 1e-12))


def write_q8_0(folder: Path, file: Path) -> None:
    from rectiflux.quantize.gguf import GGMLType, quantize_to_raw, write_gguf
    from rectiflux.weights.layout import unit_of
    from rectiflux.weights.transformer import load_transformer

    tensors = {}
    for key, w in load_transformer(folder, blocks="memory").state_dict().items():
        linear = key.endswith(".weight") and w.ndim == 2 and unit_of(key).startswith(("double_", "single_"))
        qtype = GGMLType.Q8_0 if linear and w.shape[1] % 32 == 0 else GGMLType.F32
        tensors[key] = (int(qtype), tuple(w.shape), quantize_to_raw(w, qtype))
    write_gguf(file, tensors)


def main() -> None:
    from rectiflux.pipelines.load import QUANTIZE_MODES
    from rectiflux.quantize.linear import block_quantizer, use_int8_dynamic_attention
    from rectiflux.weights.transformer import load_transformer

    reference = render(rectiflux.load("shapes"))
    for mode in ("int8", "int8-dynamic", "float8"):
        pipe = rectiflux.load("shapes", quantize=mode)
        print(f"{mode:>13}: PSNR {psnr(render(pipe), reference):.1f} dB against float32 "
              f"(attention: {pipe.transformer.attention.__name__})")
    pipe = rectiflux.load("shapes")
    axes = pipe.transformer.config.axes_dim  # a GGUF file does not record them, nor the shapes model's head width
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "shapes-Q8_0.gguf"
        write_q8_0(pipe.source, file)
        for mode in (None, "int8-dynamic"):
            prepare = block_quantizer(*QUANTIZE_MODES[mode]) if mode else None
            pipe.transformer = load_transformer(file, axes_dim=axes, blocks="memory", prepare=prepare)
            if mode == "int8-dynamic":
                use_int8_dynamic_attention(pipe.transformer)
            name = "Q8_0" + (f" + {mode}" if mode else "")
            print(f"{name:>13}: PSNR {psnr(render(pipe), reference):.1f} dB against float32 "
                  f"(attention: {pipe.transformer.attention.__name__})")


if __name__ == "__main__":
    main()
