"""Freed activations kept in the heap (rectiflux.heap) or left to glibc: page faults, step time and peak memory.

    python -m benchmarks.heap [--repeats 3] [--out docs/bench-heap.md]

A medium-width random FLUX (hidden 1536, 2 double + 4 single blocks, 1024 image + 256 text tokens, float32) and
bench.py's medium VAE decoding 512x512. Each setting runs in fresh processes (the thresholds are process-wide),
alternating repeat by repeat; "glibc" is RECTIFLUX_KEEP_FREED_MEMORY=0. A process times 3 calls after a warm-up
and counts the minor page faults (fresh zero-filled pages) of the last one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS = {"kept (default)": "1", "glibc": "0"}


def measure(vae_folder: Path) -> dict:
    import torch

    from rectiflux.flux.config import FluxConfig
    from rectiflux.flux.transformer import Flux
    from rectiflux.runtime import heap
    from rectiflux.weights.autoencoder import load_autoencoder

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = FluxConfig(num_heads=12, depth=2, depth_single=4)
    model = Flux(cfg).eval()
    ids = torch.zeros(1024, 3)
    ids[:, 1], ids[:, 2] = torch.arange(1024) // 32, torch.arange(1024) % 32
    inputs = dict(img=torch.randn(1, 1024, 64), img_ids=ids, txt=torch.randn(1, 256, 4096),
                  txt_ids=torch.zeros(256, 3), timesteps=torch.rand(1), y=torch.randn(1, 768), guidance=torch.ones(1))
    vae, z = load_autoencoder(vae_folder), torch.randn(1, 16, 64, 64)
    result = {}
    heap.keep_freed_memory("cpu")  # what a pipeline does when a generation starts (nothing with the switch at 0)
    with torch.no_grad():
        for name, fn in (("transformer step", lambda: model(**inputs)), ("VAE decode", lambda: vae.decode(z))):
            fn()
            times = []
            for _ in range(3):
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            result[name] = [statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults]
    result["peak RSS (MiB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-heap.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child))))
        return 0
    from benchmarks.bench import machine, write_report
    from benchmarks.vae import VAES, build

    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), VAES["medium VAE, 512x512"][0])
        for _ in range(args.repeats):
            for setting, switch in SETTINGS.items():
                env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2",
                       "RECTIFLUX_KEEP_FREED_MEMORY": switch}
                proc = subprocess.run([sys.executable, "-m", "benchmarks.heap", "--child", tmp], cwd=ROOT, env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[setting].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(setting, runs[setting][-1], flush=True)

    def cell(setting: str, key: str, i: int | None) -> float:
        return statistics.median(r[key] if i is None else r[key][i] for r in runs[setting])

    kept, glibc = SETTINGS
    lines = ["# Freed activations: kept in the heap or left to glibc", "",
             f"`python -m benchmarks.heap {' '.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}", "", *machine(2, "cpu", "float32"), "",
             f"Medians over {args.repeats} processes per setting (each: median of 3 calls after a warm-up; page "
             "faults of its last call).", "",
             f"| call | {kept}: s | glibc: s | kept / glibc | {kept}: page faults | glibc: page faults |",
             "|---|---|---|---|---|---|"]
    for key in ("transformer step", "VAE decode"):
        lines.append(f"| {key} | {cell(kept, key, 0):.3g} | {cell(glibc, key, 0):.3g} | "
                     f"{cell(kept, key, 0) / cell(glibc, key, 0):.3f} | {cell(kept, key, 1):.0f} | "
                     f"{cell(glibc, key, 1):.0f} |")
    lines.append(f"| peak RSS (MiB) | {cell(kept, 'peak RSS (MiB)', None):.0f} | "
                 f"{cell(glibc, 'peak RSS (MiB)', None):.0f} | "
                 f"{cell(kept, 'peak RSS (MiB)', None) / cell(glibc, 'peak RSS (MiB)', None):.3f} | | |")
    lines += ["", "A page fault here is a fresh 4 KiB page the kernel zero-fills on first touch: with glibc's own "
              "thresholds every activation over its mmap threshold (at most 32 MiB) is a fresh mapping, and the heap "
              "top is trimmed as soon as it is freed. rectiflux.runtime.heap raises both thresholds when a pipeline "
              "generation starts and trims the heap at its end."]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
