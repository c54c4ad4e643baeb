"""rectiflux on a GPU: the same images as diffusers on the same GPU, and every rectiflux path working there.

    python -m benchmarks.cuda_check [--device cuda]     # exits 1 if any check fails

The tests run on the CPU (CI has no GPU); this is what to run where one is lent. On a tiny random pipeline
(the harness's smoke config, float32, TF32 off so float32 means float32) it compares, on the device:
text-to-image, img2img and inpainting against diffusers; the device's images against the CPU's; the
"memory", "lazy" and "stream" block modes with each other; int8 / int8-dynamic / float8 transformers and the
step cache against the float32 model; bfloat16 against float32. Each line says what was compared and the number.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.bench import CONFIGS, build_folder

PARITY_ATOL = 1e-3  # float32 on both sides; the CPU parity tests hold 2e-4, GPU kernels reorder sums
PROMPT = "a large red circle on the left on a white background"
COMMON = {"height": 32, "width": 48, "num_inference_steps": 3, "guidance_scale": 3.5, "max_sequence_length": 16,
          "output_type": "np"}




def picture(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 5 + y / 7)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def box_mask(width: int, height: int) -> Image.Image:
    m = np.zeros((height, width), dtype=np.uint8)
    m[height // 4:height * 3 // 4, width // 3:width * 3 // 4] = 255
    return Image.fromarray(m, mode="L")


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, what: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}", flush=True)
        if not ok:
            self.failed.append(what)


def main(argv: list[str] | None = None) -> int:
    from rectiflux.images import psnr

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
    from diffusers.utils import logging
    from transformers.utils import logging as transformers_logging

    from rectiflux.pipelines.load import load
    from rectiflux.quantize.linear import QuantizedLinear

    logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    c = Checks()
    with tempfile.TemporaryDirectory(prefix="rectiflux-cuda-check-") as tmp:
        folder = Path(tmp) / "tiny"
        build_folder(folder, CONFIGS["smoke"].model)
        ref = FluxPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True).to(device)
        refs = {"t2i": ref, "i2i": FluxImg2ImgPipeline.from_pipe(ref), "inpaint": FluxInpaintPipeline.from_pipe(ref)}
        for r in refs.values():
            r.set_progress_bar_config(disable=True)
        ours = load(folder, dtype=torch.float32, device=device)
        source, mask = picture(48, 32), box_mask(48, 32)
        calls = {"t2i": {}, "i2i": {"image": source, "strength": 0.6},
                 "inpaint": {"image": source, "mask_image": mask, "strength": 0.8}}
        images = {}
        for mode, extra in calls.items():
            kwargs = {"prompt": PROMPT, **COMMON, **extra}
            got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
            want = refs[mode](generator=torch.Generator().manual_seed(0), **kwargs).images
            diff = float(np.abs(got - want).max())
            c.check(f"{mode} on {device} vs diffusers on {device}", diff <= PARITY_ATOL, f"max |diff| {diff:.2g}")
            images[mode] = got
        del ref, refs

        cpu = load(folder, dtype=torch.float32)(PROMPT, generator=torch.Generator().manual_seed(0), **COMMON).images
        diff = float(np.abs(cpu - images["t2i"]).max())
        c.check(f"t2i on {device} vs on cpu", diff <= PARITY_ATOL, f"max |diff| {diff:.2g}")

        # one transformer call on fixed inputs, for the paths that must give (nearly) the same numbers
        t = ours.transformer
        gen = torch.Generator().manual_seed(1)
        cfg = t.config
        n_img, n_txt = 64, 16
        inputs = {"img": torch.randn(1, n_img, cfg.in_channels, generator=gen),
                  "txt": torch.randn(1, n_txt, cfg.joint_attention_dim, generator=gen),
                  "y": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
                  "img_ids": torch.stack([torch.zeros(n_img), torch.arange(n_img) // 8, torch.arange(n_img) % 8], -1),
                  "txt_ids": torch.zeros(n_txt, 3), "timesteps": torch.tensor([0.5]),
                  "guidance": torch.tensor([3.5])}

        def velocity(model, dtype=torch.float32) -> torch.Tensor:
            kw = {k: v.to(device, dtype if v.is_floating_point() and k not in ("guidance",) else v.dtype)
                  for k, v in inputs.items()}
            with torch.no_grad():
                return model(**kw).float().cpu()

        base = velocity(t)
        for blocks in ("memory", "stream"):
            v = velocity(load(folder, dtype=torch.float32, device=device, blocks=blocks).transformer)
            diff = float((v - base).abs().max())
            c.check(f"blocks={blocks} vs the default (lazy)", diff <= 1e-5, f"max |diff| {diff:.2g}")
        for quantize in ("int8", "int8-dynamic", "float8"):
            model = load(folder, dtype=torch.float32, device=device, quantize=quantize).transformer
            v = velocity(model)
            rel = float((v - base).norm() / base.norm())
            linear = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
            rows = torch.zeros(n_img + n_txt, linear.in_features, device=device)
            c.check(f"quantize={quantize} transformer vs float32", rel < 0.05,
                    f"relative error {rel:.2g}; a {n_img + n_txt}-token linear runs {linear.kernel_for(rows)}")
        cached = ours(PROMPT, generator=torch.Generator().manual_seed(0), cache_threshold=0.5,
                      **{**COMMON, "num_inference_steps": 8})
        full = ours(PROMPT, generator=torch.Generator().manual_seed(0), **{**COMMON, "num_inference_steps": 8})
        c.check("step cache 0.5 over 8 steps", cached.images.shape == full.images.shape,
                f"{cached.cached_steps} step(s) skipped, PSNR {psnr(cached.images, full.images):.1f} dB vs uncached")
        # bfloat16: against diffusers in bfloat16 (same work), then how far both are from float32
        bf16 = load(folder, dtype=torch.bfloat16, device=device)
        got = bf16(PROMPT, generator=torch.Generator().manual_seed(0), **COMMON).images
        ref16 = FluxPipeline.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True).to(device)
        ref16.set_progress_bar_config(disable=True)
        want = ref16(PROMPT, generator=torch.Generator().manual_seed(0), **COMMON).images
        db = psnr(got, want)
        c.check("bfloat16 image vs diffusers bfloat16", db >= 30,
                f"PSNR {db:.1f} dB; against float32: rectiflux {psnr(got, images['t2i']):.1f} dB, "
                f"diffusers {psnr(want, images['t2i']):.1f} dB")
        e32, p32 = ours.text_encoders.encode(PROMPT, None, 1, 16)
        e16, p16 = bf16.text_encoders.encode(PROMPT, None, 1, 16)
        rel = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in ((e16, e32), (p16, p32))]
        v16 = velocity(bf16.transformer, torch.bfloat16)
        rel.append(float((v16 - base).norm() / base.norm()))
        c.check("bfloat16 parts vs float32", max(rel) < 0.05,
                "relative error of T5 {:.2g}, CLIP pooled {:.2g}, transformer {:.2g}".format(*rel))
    print(f"{len(c.failed)} check(s) failed" + (f": {', '.join(c.failed)}" if c.failed else ""))
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
