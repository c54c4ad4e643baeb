"""One thread or two for the embedded model's small calls, under each OpenMP wait policy (threads.threads_for).

    python -m benchmarks.threads [--out docs/bench-threads.md]

A fresh process per policy (libgomp reads OMP_WAIT_POLICY when torch loads): PASSIVE, where idle OpenMP threads
sleep and every parallel region wakes them, and the default, where they spin. In each, on 2 and on 1 thread with
the one-thread rule switched off (SMALL_WORK = 0): one small op (layer norm over 36 x 128, about the cost of
waking the threads), the shapes transformer's step at growing image sizes, its VAE decode, and its whole
8-step image; then the image with the rule on, as users get it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = (64, 128, 256, 512)  # pixels per side; the shapes model has 16 pixels per image token


def per_call_ms(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):  # best of three runs of `calls` calls: this machine is shared
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1000)
    return best


def measure() -> dict:
    import torch

    import rectiflux
    from rectiflux.runtime import threads

    pipe = rectiflux.load()
    tr, cfg = pipe.transformer, pipe.transformer.config
    rule_on = threads.SMALL_WORK
    threads.SMALL_WORK = 0  # the rule off: every call on torch's thread count
    rows: dict[str, dict[int, float]] = {}

    def timed(label: str, fn, calls: int) -> None:
        rows[label] = {}
        for n in (2, 1):
            torch.set_num_threads(n)
            rows[label][n] = per_call_ms(fn, calls)
        torch.set_num_threads(2)

    x = torch.randn(36, 128)
    timed("layer norm, 36 x 128", lambda: torch.nn.functional.layer_norm(x, (128,)), 200)
    with torch.inference_mode():
        for size in SIZES:
            side = size // 16
            ids = torch.zeros(side * side, 3)
            ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
            inputs = dict(img=torch.randn(1, side * side, cfg.in_channels), img_ids=ids,
                          txt=torch.randn(1, 20, cfg.joint_attention_dim), txt_ids=torch.zeros(20, 3),
                          timesteps=torch.rand(1), y=torch.randn(1, cfg.pooled_projection_dim), guidance=torch.ones(1))
            label = f"transformer step, {size}x{size} ({side * side + 20} tokens)"
            timed(label, lambda inputs=inputs: tr(**inputs), 10)
        for size in SIZES[:3]:
            z = torch.randn(1, 16, size // 8, size // 8)
            timed(f"VAE decode, {size}x{size}", lambda z=z: pipe.autoencoder.decode(z), 5)
    timed("8-step image, 64x64 (rule off)", lambda: pipe("a red circle", seed=1), 3)
    threads.SMALL_WORK = rule_on
    torch.set_num_threads(2)
    rows["8-step image, 64x64 (rule on, 2 threads asked)"] = {2: per_call_ms(lambda: pipe("a red circle", seed=1), 3)}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-threads.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure()))
        return 0
    results = {}
    for policy in ("PASSIVE", None):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        proc = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--child"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[policy or "default (spinning)"] = json.loads(proc.stdout.strip().splitlines()[-1])
    from benchmarks.bench import write_report

    lines = ["# One thread or two for small calls", "",
             f"`python -m benchmarks.threads {' '.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}, {os.cpu_count()} cores, float32, "
             "the embedded shapes model (hidden 128). Milliseconds per call, best of three runs.", "",
             "| OMP_WAIT_POLICY | call | 2 threads | 1 thread | 1 / 2 |", "|---|---|---|---|---|"]
    for policy, rows in results.items():
        for label, ms in rows.items():
            one = f"{ms['1']:.3g}" if "1" in ms else "-"
            ratio = f"{ms['1'] / ms['2']:.2f}" if "1" in ms else "-"
            lines.append(f"| {policy} | {label} | {ms['2']:.3g} | {one} | {ratio} |")
    lines += ["", "`threads.threads_for` runs a transformer, VAE or text-encoder call on one thread when "
              "OMP_WAIT_POLICY is PASSIVE and the call's work (multiply-adds of one layer: tokens x width^2, "
              "pixels x channels^2 x 9) is under 2^24; the last row of each policy is the image as users get it."]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
