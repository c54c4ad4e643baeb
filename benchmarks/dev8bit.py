"""A FLUX.1-dev-sized transformer in 8 bits on this 24 GB machine: one 256x256 denoising step and its peak memory.

    python -m benchmarks.dev8bit [--workdir DIR] [--keep] [--out docs/bench-dev8bit.md]

Writes a random transformer with FLUX.1-dev's real config (19 double + 38 single blocks, hidden 3072, T5 and CLIP
widths, guidance embedder) in rectiflux's int8 format (about 12 GB; the blocks' linear layers in int8 with a
float32 scale per output channel, the rest float32), one block at a time so the writer never holds more than a
block. Then, in a fresh process per mode, it loads the file and times transformer calls on a 256x256 image
(256 image tokens) with 512 T5 tokens, int8 activations, and reports the peak resident memory (VmHWM):

- stream: each block is mapped from the file before it runs and its pages given back after it (peak: about two
  blocks plus the activations);
- memory: the file is memory-mapped and every block stays resident once touched.

The modes run after the file is flushed to disk, so the kernel's write-back does not slow whichever runs first.

In bfloat16 the same transformer is 23.8 GB of weights, more than this machine's 23.5 GiB: diffusers cannot load
it here (not attempted; it would only exhaust the machine's memory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS_IMG, TOKENS_TXT = 256, 512  # 256x256 pixels -> 32x32 latents -> 16x16 packed tokens; dev's T5 length


def dev_config():
    from rectiflux.flux.config import FluxConfig

    return FluxConfig(in_channels=64, num_heads=24, head_dim=128, depth=19, depth_single=38,
                      joint_attention_dim=4096, pooled_projection_dim=768, guidance_embed=True)


def write_random_int8(file: Path, seed: int = 0) -> int:
    """A random int8 FLUX.1-dev file, written tensor by tensor in the safetensors format; returns its size."""
    import torch

    from rectiflux.flux.transformer import Flux
    from rectiflux.quantize.files import METADATA_CONFIG, METADATA_FORMAT, SCALE_SUFFIX
    from rectiflux.quantize.linear import quantize_transformer
    from rectiflux.weights.layout import unit_of

    cfg = dev_config()
    with torch.device("meta"):
        model = quantize_transformer(Flux(cfg), "int8")
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in model.state_dict(keep_vars=True).items()}
    names = {torch.int8: "I8", torch.float32: "F32"}
    header, offset = {}, 0
    for key, (dtype, shape) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", METADATA_FORMAT: "int8", METADATA_CONFIG: json.dumps(asdict(cfg))}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    gen = torch.Generator().manual_seed(seed)
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        unit = None
        for key, (dtype, shape) in specs.items():
            if unit_of(key) != unit:
                unit = unit_of(key)
                print(f"  writing {unit}", end="\r", flush=True)
            if dtype == torch.int8:
                t = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
            elif key.endswith(SCALE_SUFFIX):  # weights of std ~ 1 / sqrt(fan-in), like an initialised model
                fan_in = specs[key[: -len(SCALE_SUFFIX)] + ".weight"][1][1]
                t = torch.full(shape, 1.7 / (127 * math.sqrt(fan_in)))
            elif key.endswith("scale"):  # RMSNorm scales
                t = torch.ones(shape)
            else:
                fan_in = shape[1] if len(shape) == 2 else 1
                t = torch.randn(shape, generator=gen) / math.sqrt(fan_in) * (1.0 if len(shape) == 2 else 0.02)
            fh.write(t.numpy().tobytes())
    os.replace(tmp, file)
    print()
    return file.stat().st_size


def measure(file: Path, blocks: str, calls: int) -> dict:
    import torch

    from rectiflux.quantize.files import load_quantized

    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    model = load_quantized(file, activations="int8", blocks=blocks)
    load_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    side = int(math.isqrt(TOKENS_IMG))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    inputs = dict(img=torch.randn(1, TOKENS_IMG, 64, generator=gen),
                  img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
                  txt=torch.randn(1, TOKENS_TXT, 4096, generator=gen), txt_ids=torch.zeros(TOKENS_TXT, 3),
                  timesteps=torch.tensor([0.5]), y=torch.randn(1, 768, generator=gen), guidance=torch.tensor([3.5]))
    step_s = []
    from rectiflux.runtime import heap

    heap.keep_freed_memory("cpu")  # what a pipeline's generation starts (a streamed model pins the heap instead)
    with torch.no_grad():
        for _ in range(calls):
            start = time.perf_counter()
            out = model(**inputs)
            step_s.append(time.perf_counter() - start)
    from benchmarks.bench import peak_rss_mib

    return {"load": load_s, "steps": step_s, "rss_gib": peak_rss_mib() / 1024,
            "finite": bool(torch.isfinite(out).all())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, help="where the 12 GB file goes (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the file (and reuse one already there)")
    p.add_argument("--calls", type=int, default=2, help="transformer calls per mode (the first reads the weights)")
    p.add_argument("--modes", default="stream,memory")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-dev8bit.md")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], int(args.child[2]))))
        return 0
    workdir = args.workdir or Path(tempfile.gettempdir())
    file = workdir / "rectiflux-dev-int8.safetensors"
    try:
        if not (args.keep and file.exists()):
            start = time.perf_counter()
            print(f"writing a random FLUX.1-dev-sized int8 transformer to {file}", flush=True)
            size = write_random_int8(file)
            print(f"  {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        os.sync()
        size = file.stat().st_size
        results = {}
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        for mode in args.modes.split(","):
            print(f"measuring blocks={mode}", flush=True)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.dev8bit", "--child", str(file), mode,
                                   str(args.calls)], cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {results[mode]}", flush=True)
    finally:
        if not args.keep:
            file.unlink(missing_ok=True)
    from benchmarks.bench import write_report

    cfg = dev_config()
    lines = ["# A FLUX.1-dev-sized transformer in 8 bits", "",
             f"`python -m benchmarks.dev8bit {' '.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}", "",
             f"Random weights with FLUX.1-dev's config ({cfg.depth} double + {cfg.depth_single} single blocks, hidden "
             f"{cfg.hidden_size}, guidance embedder), the blocks' linear layers in int8 with per-channel float32 "
             f"scales: a {size / 1e9:.2f} GB file. One call = one denoising step of a 256x256 image "
             f"({TOKENS_IMG} image + {TOKENS_TXT} text tokens), int8 activations, {os.cpu_count()} threads. "
             "In bfloat16 the same weights are 23.8 GB: more than this machine's memory, so diffusers cannot load "
             "them here.", "",
             "| blocks | load (s) | first call (s) | later calls (s) | peak RSS (GiB) | output finite |",
             "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        later = ", ".join(f"{s:.1f}" for s in r["steps"][1:]) or "-"
        lines.append(f"| {mode} | {r['load']:.2f} | {r['steps'][0]:.1f} | {later} | {r['rss_gib']:.2f} | "
                     f"{r['finite']} |")
    lines += ["", "stream: every block's pages are mapped from the file (the page cache) by a background thread "
              "while the block before it runs, and given back after it ran; memory: the file is memory-mapped and "
              "stays resident once touched (the page cache is shared, not counted twice)."]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
