"""One rank of tests/test_parallel.py's launch: every case generated whole and then sequence-parallel.

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel_worker.py OUT TINY KONTEXT

Each rank makes each case's image three times, first with the transformer whole (no collective runs: the
single-process image), then split over the ranks with each backend; rank 0 writes them as OUT/<case>-single.npy,
OUT/<case>-parallel.npy (Ulysses) and OUT/<case>-ring.npy, and OUT/facts.json with what else the test checks (the
other rank's image against rank 0's, the step cache's skipped steps, the head-count refusal, the bytes sent).
Last, a random 3-head transformer (which 2 does not divide) is called directly, whole and with ring attention,
at token counts that leave a shard of the text, or every row of a shard, empty: OUT/heads3-<n>-{single,ring}.npy.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import rectiflux
from rectiflux.flux.config import FluxConfig
from rectiflux.flux.layers import attention
from rectiflux.flux.transformer import Flux
from rectiflux.parallel import sequence_parallel
from rectiflux.parallel.sequence import remove_sequence_parallel

H, W = 36, 44  # the tiny models' 2x autoencoder: 18 x 22 latents, 9 x 11 = 99 image tokens
TINY = {"height": H, "width": W, "num_inference_steps": 3, "max_sequence_length": 11, "guidance_scale": 3.0,
        "output_type": "np"}


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def mask(width: int, height: int) -> Image.Image:
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, : width // 2] = 255
    return Image.fromarray(pixels)


def as_array(images) -> np.ndarray:
    return images.numpy() if isinstance(images, torch.Tensor) else np.ascontiguousarray(images)


def cases(tiny: Path, kontext: Path):
    """(name, pipeline, call arguments, whether a seed fixes the noise)."""
    shapes, flux, edit = rectiflux.load("shapes"), rectiflux.load(tiny), rectiflux.load(kontext)
    for pipe in (shapes, flux, edit):
        pipe.set_progress_bar_config(disable=True)
    prompt = "a large red circle on the left"
    yield "shapes", shapes, {"prompt": prompt, "seed": 0, "output_type": "np"}, True
    yield "t2i", flux, {"prompt": prompt, "seed": 1, **TINY}, True
    yield "latents", flux, {"prompt": prompt, "seed": 7, **TINY, "output_type": "latent"}, True
    yield "cfg-batch", flux, {"prompt": prompt, "negative_prompt": "blue", "true_cfg_scale": 2.0,
                              "num_images_per_prompt": 2, "seed": 2, **TINY}, True
    yield "cache", flux, {"prompt": prompt, "seed": 3, "cache_threshold": 0.5, **TINY, "num_inference_steps": 8}, True
    yield "img2img", flux, {"prompt": prompt, "image": picture(W, H, 4), "strength": 0.7, "seed": 4,
                            **TINY, "num_inference_steps": 4}, True
    yield "inpaint", flux, {"prompt": prompt, "image": picture(W, H, 5), "mask_image": mask(W, H), "strength": 0.8,
                            "seed": 5, **TINY, "num_inference_steps": 4}, True
    # the reference is 40 x 36: 90 more image tokens, 189 in all
    yield "kontext", edit, {"prompt": "make it blue", "image": picture(40, 36, 6), "_auto_resize": False,
                            "seed": 6, **TINY}, True
    yield "no-seed", flux, {"prompt": prompt, **TINY}, False  # the first rank's seed, sent to the other


def ranks_max_abs(x: torch.Tensor) -> float:
    """How far the other ranks' x is from rank 0's."""
    xs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(xs, x.contiguous())
    return max(float((other - xs[0]).abs().max()) for other in xs)


def three_heads(n_txt: int, n_img: int) -> tuple[Flux, dict]:
    """A random transformer with 3 heads of 8, and a batch of 2 inputs, the same in every process."""
    torch.manual_seed(0)
    model = Flux(FluxConfig(in_channels=16, num_heads=3, head_dim=8, axes_dim=(2, 2, 4), depth=1, depth_single=2,
                            joint_attention_dim=32, pooled_projection_dim=32)).eval()
    gen = torch.Generator().manual_seed(1)
    img_ids = torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4, torch.arange(n_img) % 4], -1).float()
    return model, {"img": torch.randn(2, n_img, 16, generator=gen), "img_ids": img_ids,
                   "txt": torch.randn(2, n_txt, 32, generator=gen), "txt_ids": torch.zeros(n_txt, 3),
                   "timesteps": torch.tensor([0.5, 0.25]), "y": torch.randn(2, 32, generator=gen),
                   "guidance": torch.tensor([3.5, 3.5])}


def main(out: Path, tiny: Path, kontext: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    facts: dict = {"world": dist.get_world_size(), "cases": {}, "ring": {}}
    for name, pipe, kwargs, seeded in cases(tiny, kontext):
        single = pipe(**kwargs) if seeded else None
        if rank == 0 and seeded:
            np.save(out / f"{name}-single.npy", as_array(single.images))
        for backend, key, suffix in (("ulysses", "cases", "parallel"), ("ring", "ring", "ring")):
            pipe.enable_sequence_parallel(backend=backend)
            assert pipe.transformer.attention.backend == backend
            parallel = pipe(**kwargs)
            sent = pipe.transformer.attention.sent
            pipe.disable_sequence_parallel()
            assert pipe.transformer.attention is attention and "forward" not in vars(pipe.transformer), name
            facts[key][name] = {
                "ranks_max_abs": ranks_max_abs(torch.from_numpy(as_array(parallel.images))),
                "cached_steps": [parallel.cached_steps] + ([single.cached_steps] if seeded else []),
                "bytes_sent": sent}
            if rank == 0:
                np.save(out / f"{name}-{suffix}.npy", as_array(parallel.images))
    try:
        sequence_parallel(types.SimpleNamespace(config=types.SimpleNamespace(num_heads=3)))
    except ValueError as e:
        facts["refusal"] = str(e)
    # 3 heads: ring attention works, Ulysses refuses the real model too; 1 text token leaves rank 1's text shard
    # empty, and 1 + 1 tokens leave rank 1 no real row at all
    facts["heads3"] = {}
    for n_txt, n_img in ((1, 13), (1, 1)):
        model, inputs = three_heads(n_txt, n_img)
        with torch.no_grad():
            single = model(**inputs)
            try:
                sequence_parallel(model)
            except ValueError as e:
                refused = str(e)
            sequence_parallel(model, backend="ring")
            ring = model(**inputs)
            remove_sequence_parallel(model)
        assert model.attention is attention and "forward" not in vars(model)
        facts["heads3"][f"{n_txt}-{n_img}"] = {"refusal": refused, "ranks_max_abs": ranks_max_abs(ring)}
        if rank == 0:
            np.save(out / f"heads3-{n_txt}-{n_img}-single.npy", single.numpy())
            np.save(out / f"heads3-{n_txt}-{n_img}-ring.npy", ring.numpy())
    if rank == 0:
        (out / "facts.json").write_text(json.dumps(facts, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:4]))
