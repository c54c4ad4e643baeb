"""What a LoRA costs: the medium config's transformer step with no LoRA, a rank-16 LoRA on every linear layer of
its blocks unfused (side products) and fused, and the time to load a rank-64 LoRA onto a FLUX.1-dev-sized
transformer.

    python -m benchmarks.lora [--rounds 8] [--calls 1] [--out docs/bench-lora.md]

Random weights, float32, 2 threads; the three step modes alternate round by round in one process (the LoRA is the
only difference). The LoRA is in the diffusers/peft layout, so q, k and v (and a single block's MLP input) are
separate adapters on the rows of our fused weights, as ai-toolkit's LoRAs are.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEDIUM = dict(num_heads=12, head_dim=128, depth=8, depth_single=16)
DEV = dict(num_heads=24, head_dim=128, depth=19, depth_single=38)


def pipeline(transformer):
    """A pipeline around `transformer` (what the LoRA API needs: the models and their names)."""
    from rectiflux.flux.autoencoder import AutoEncoder
    from rectiflux.pipelines.flux import FluxPipeline
    from rectiflux.sampling.schedule import SchedulerConfig

    return FluxPipeline(transformer, AutoEncoder(), None, SchedulerConfig())


def peft_lora(transformer, rank: int, dtype) -> dict:
    """A random rank-`rank` LoRA on every linear layer of the blocks, in diffusers' module names."""
    import torch

    from rectiflux.weights.layout import diffusers_rows

    g = torch.Generator().manual_seed(0)
    sd = {}
    for theirs, (ours, start, stop) in diffusers_rows(transformer.config).items():
        if not ours.startswith(("double_blocks", "single_blocks")) or ours.endswith("_norm"):
            continue
        module = transformer.get_submodule(ours)
        rows = (stop - start) if stop >= 0 else module.out_features
        down = torch.randn(rank, module.in_features, generator=g) * 0.01
        sd[f"transformer.{theirs}.lora_A.weight"] = down.to(dtype)
        sd[f"transformer.{theirs}.lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).to(dtype)
    return sd


def step_times(rounds: int, calls: int) -> dict[str, list[float]]:
    import torch

    from rectiflux import runtime
    from rectiflux.flux.config import FluxConfig
    from rectiflux.flux.transformer import Flux

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = Flux(FluxConfig(**MEDIUM)).eval()
    pipe = pipeline(model)
    lora = peft_lora(model, 16, torch.float32)
    n_img, n_txt = 1024, 256
    ids = torch.zeros(n_img, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n_img) // 32, torch.arange(n_img) % 32
    inputs = dict(img=torch.randn(1, n_img, 64), img_ids=ids, txt=torch.randn(1, n_txt, 4096),
                  txt_ids=torch.zeros(n_txt, 3), timesteps=torch.rand(1), y=torch.randn(1, 768),
                  guidance=torch.ones(1))
    runtime.heap.keep_freed_memory("cpu")
    times: dict[str, list[float]] = {"no LoRA": [], "unfused": [], "fused": []}

    def timed(label: str) -> None:
        with torch.no_grad():
            for _ in range(calls):
                start = time.perf_counter()
                model(**inputs)
                times[label].append(time.perf_counter() - start)

    with torch.no_grad():
        model(**inputs)  # warm-up
    for _ in range(rounds):  # the modes back to back, so each round's ratios share the machine's speed
        timed("no LoRA")
        pipe.load_lora_weights(dict(lora), adapter_name="rank16")
        timed("unfused")
        pipe.fuse_lora()
        timed("fused")
        pipe.unload_lora_weights()
    return times


def load_time(workdir: Path) -> tuple[float, float]:
    """Seconds to load a rank-64 bfloat16 LoRA onto a FLUX.1-dev-sized transformer, and the file's size (MiB)."""
    import torch

    from rectiflux.flux.config import FluxConfig
    from rectiflux.flux.transformer import Flux
    from rectiflux.weights.checkpoint import save_state_dict

    with torch.device("meta"):
        model = Flux(FluxConfig(**DEV))  # the module shapes are all loading a LoRA reads
    file = workdir / "rank64.safetensors"
    save_state_dict(peft_lora(model, 64, torch.bfloat16), file)
    os.sync()
    pipe = pipeline(model)
    start = time.perf_counter()
    pipe.load_lora_weights(file)
    return time.perf_counter() - start, file.stat().st_size / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-lora.md")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the harness runs its children; torch is not loaded yet
    from benchmarks.bench import machine, write_report

    times = step_times(args.rounds, args.calls)
    base = times["no LoRA"]
    with tempfile.TemporaryDirectory() as tmp:
        load_s, size = load_time(Path(tmp))
    rows = []
    for label, t in times.items():
        ratios = [a / b for a, b in zip(t, base, strict=True)]
        rows.append(f"| {label} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | "
                    f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
    lines = ["# What a LoRA costs", "",
             f"`python -m benchmarks.lora {' '.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}", "", *machine(2, "cpu", "float32"), "",
             f"The medium config's transformer (8 double + 16 single blocks, hidden 1536), 1024 image + 256 text "
             f"tokens, random weights; a rank-16 LoRA on every linear layer of the blocks (diffusers names: q, k, v "
             f"separate). Median (min-max) seconds per step over {args.rounds} rounds x {args.calls} calls, the three "
             "modes back to back in each round; the ratio is taken call by call within a round, since this shared "
             "machine's speed drifts by more than the differences measured.", "",
             "| step | seconds | / no LoRA |", "|---|---|---|", *rows, "",
             f"Loading a rank-64 bfloat16 LoRA ({size:.0f} MiB, every linear layer of the blocks) onto a "
             f"FLUX.1-dev-sized transformer (19 + 38 blocks, hidden 3072): {load_s:.2f} s (reading the file, placing "
             "every tensor, checking its shape, attaching the side products)."]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
