"""The benchmark harness runs end to end (tiny model, one repeat) and counts transformer FLOPs right.

Timings are not checked here: a timing is a benchmark, not a test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rectiflux.flux.config import FluxConfig
from rectiflux.flux.transformer import Flux

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

from benchmarks.bench import cpu_features, step_flops  # noqa: E402

METRICS = ("import (s)", "load (s)", "load + first step (s)", "transformer step (s)", "transformer GFLOP/s",
           "% of GEMM rate", "end-to-end, 2 steps (s/image)", "peak RSS (MiB)")
SIDES = ("rectiflux", "rectiflux-int8", "rectiflux-bf16", "rectiflux-stream", "diffusers")


def test_smoke_run_writes_the_table(tmp_path):
    out = tmp_path / "bench.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--smoke", "--threads", "1", "--out", str(out),
                           "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert "--smoke --threads 1" in text and "float32 GEMM" in text and "CPU:" in text
    ratios = [f"{side} / diffusers" for side in SIDES[:4]]
    assert "| metric | " + " | ".join(SIDES + tuple(ratios)) + " |" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for metric in METRICS:
        cells = [c.strip() for c in rows[metric].strip("|").split("|")]
        assert len(cells) == 10 and all(cells), rows[metric]  # every side and every ratio is filled in
        [float(c) for c in cells[6:]]
    assert "max |difference| between rectiflux and diffusers of one transformer output" in text
    for side in SIDES[1:4]:
        assert f"{side} against rectiflux float32: " in text
    assert "rectiflux-stream against rectiflux float32: identical image" in text  # the same blocks, read later
    assert list(tmp_path.iterdir()) == [out]  # the random weights were cleaned up


def test_step_flops_match_the_counted_matmuls():
    t = dict(num_attention_heads=4, attention_head_dim=16, num_layers=2, num_single_layers=3, in_channels=64,
             joint_attention_dim=48, pooled_projection_dim=40, guidance_embeds=True)
    model = Flux(FluxConfig(in_channels=64, num_heads=4, head_dim=16, depth=2, depth_single=3, joint_attention_dim=48,
                            pooled_projection_dim=40, axes_dim=(4, 6, 6))).eval()
    l_img, l_txt = 64, 16
    # with autograd on, so the single blocks' output linear runs as one matmul (at inference it is split in two
    # in-place products, which the counter does not see)
    with FlopCounterMode(display=False) as counter:
        model(img=torch.randn(1, l_img, 64), img_ids=torch.zeros(l_img, 3), txt=torch.randn(1, l_txt, 48),
              txt_ids=torch.zeros(l_txt, 3), timesteps=torch.tensor([0.5]), y=torch.randn(1, 40),
              guidance=torch.tensor([3.5]))
    counted = counter.get_total_flops()
    # the counter sees every linear; it may or may not see CPU attention (4 L^2 hidden per block)
    attention = 4 * (l_img + l_txt) ** 2 * 64 * 5
    assert step_flops(t, l_img, l_txt) in (counted, counted + attention)


def test_server_benchmark_smoke_run_writes_its_page(tmp_path):
    out = tmp_path / "bench-server.md"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", XDG_CACHE_HOME=str(tmp_path / "cache"))
    args = ["--images", "2", "--clients", "2", "--rounds", "2", "--steps", "2,3", "--out", str(out), "--workdir",
            str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.server", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert f"`python -m benchmarks.server {' '.join(args)}`" in text and "CPU:" in text
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith(("| 2 |", "| 3 |"))]
    assert [(r[0], r[1].split(",")[0]) for r in rows] == [
        (steps, side) for steps in ("2", "3") for side in ("one process (make_image + write_png)", "server", "server")]
    for row in rows:
        assert len(row) == 7 and float(row[2].split()[0]) > 0  # images per minute
        if row[1].startswith("server"):
            assert row[3].endswith("%") and row[4].endswith("%") and row[5].endswith("ms") and row[6].endswith("ms")
            # the overhead (median, best rounds), the time it is per image, the clients' CPU time per image
            [float(cell.split()[0]) for cell in row[3:]]
        else:
            assert row[3:] == ["", "", "", ""]
    # per step count, 2 images x 2 rounds and a warm-up image through each of the 2 routes
    assert "20 identical pixel for pixel, 0 different" in text
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == [out.name]  # the work folder went


def test_an_instruction_set_cap_is_reported_beside_the_cpu(monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    assert "capped" not in cpu_features()[1]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_features()[1].endswith("(capped: ONEDNN_MAX_CPU_ISA=AVX2)")
