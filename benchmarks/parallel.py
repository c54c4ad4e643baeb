"""Ulysses sequence parallelism (rectiflux.parallel) on this machine: one transformer step in one process against
the same step split over processes on gloo, and the bytes the all-to-alls move.

    python -m benchmarks.parallel [--config medium-width] [--world 2] [--calls 3] [--backend ulysses|ring]
                                  [--out docs/bench-parallel.md]
    python -m benchmarks.parallel --config smoke --out /tmp/bench-parallel.md     # checks the harness only

Configs: `medium` is benchmarks.bench's medium transformer (8 double + 16 single blocks, hidden 1536 = 12 x 128,
1024 image + 256 text tokens of a 512x512 image); `medium-width` the same width, heads and tokens with 2 + 4
blocks (per block the same work and the same traffic, in a quarter of the time: what fits a few minutes on 2
cores); `smoke` a tiny one. Weights are random (seeded, so every process builds the same model) and made in
memory: no folder is written, and only the transformer runs.

Each setting is a fresh set of processes: one process on all `--threads` threads, one process on
threads / world threads (the same per-process share as a rank's), `--world` processes launched by torchrun on
threads / world threads each that each run the model whole on their shard of the tokens (no exchange: the same
linear-layer arithmetic at once, and attention over its own tokens only, 1 / world of the split step's: what the
machine gives concurrent processes), and `--world` such processes with the model split over them. A step is
one transformer call on identical seeded inputs, timed after a warm-up call (the ranks wait for each other
before each call). Bytes are those one rank sends to the others, computed from the shapes
(rectiflux.parallel.sequence.bytes_per_attention) and checked against what the attention slot counted; time in
collectives is rank 0's wall time inside the all-to-alls and the final gather, which includes waiting for the
slower rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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

from benchmarks.bench import machine, step_flops, write_report  # noqa: E402

MODEL = dict(in_channels=64, num_heads=12, head_dim=128, joint_attention_dim=4096, pooled_projection_dim=768,
             axes_dim=(16, 56, 56), guidance_embed=True)
CONFIGS = {  # FluxConfig fields, image and text tokens
    "smoke": ({**MODEL, "num_heads": 2, "head_dim": 16, "axes_dim": (4, 6, 6), "joint_attention_dim": 32,
               "pooled_projection_dim": 32, "depth": 1, "depth_single": 2}, 63, 15),
    "medium-width": ({**MODEL, "depth": 2, "depth_single": 4}, 1024, 256),
    "medium": ({**MODEL, "depth": 8, "depth_single": 16}, 1024, 256),
}
CHILD_TIMEOUT_S = 1800


# ---------------------------------------------------------------------------------------------------------------
# children


def build(name: str):
    """The seeded random model and inputs of a config, the same in every process."""
    import torch

    from rectiflux.flux.config import FluxConfig
    from rectiflux.flux.transformer import Flux

    fields, l_img, l_txt = CONFIGS[name]
    cfg = FluxConfig(**fields)
    torch.manual_seed(0)
    model = Flux(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    side = int(l_img ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(side + 1), torch.arange(side + 1), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)[:l_img].float()
    inputs = {"img": torch.randn(1, l_img, cfg.in_channels, generator=gen), "img_ids": img_ids,
              "txt": torch.randn(1, l_txt, cfg.joint_attention_dim, generator=gen), "txt_ids": torch.zeros(l_txt, 3),
              "timesteps": torch.tensor([0.5]), "y": torch.randn(1, cfg.pooled_projection_dim, generator=gen),
              "guidance": torch.tensor([3.5])}
    return model, inputs


def child(kind: str, payload: dict) -> None:
    import numpy as np
    import torch

    from rectiflux import runtime

    torch.set_num_threads(payload["threads"])
    model, inputs = build(payload["config"])
    runtime.heap.keep_freed_memory("cpu")  # the CPU policy a pipeline's generation starts
    rank, barrier, comm = 0, (lambda: None), {"s": 0.0}
    if kind in ("parallel", "pair"):
        import torch.distributed as dist

        from rectiflux.parallel import Plan, sequence, sequence_parallel

        dist.init_process_group("gloo")
        rank, barrier = dist.get_rank(), dist.barrier
    if kind == "pair":  # each rank its shard of the tokens, whole: the same arithmetic, no exchange
        plan = Plan(dist.get_world_size(), rank, inputs["txt"].shape[1], inputs["img"].shape[1])
        for key, bounds, dim in (("img", plan.img_bounds, 1), ("img_ids", plan.img_bounds, 0),
                                 ("txt", plan.txt_bounds, 1), ("txt_ids", plan.txt_bounds, 0)):
            start, end = bounds[rank]
            inputs[key] = inputs[key].narrow(dim, start, end - start)
    if kind == "parallel":
        sequence_parallel(model, backend=payload.get("backend", "ulysses"))
        def timing(fn):
            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    comm["s"] += time.perf_counter() - start
            return timed

        # the attention slot and the sharded forward look these up at each call
        sequence.all_to_all, sequence.gather_rows = timing(sequence.all_to_all), timing(sequence.gather_rows)
    steps = []
    with torch.no_grad():
        barrier()
        velocity = model(**inputs)  # warm-up
        comm["s"], sent = 0.0, getattr(model.attention, "sent", 0)
        waited = getattr(model.attention, "waited", 0.0)  # ring attention's waits for its transfers
        for _ in range(payload["calls"]):
            barrier()
            start = time.perf_counter()
            model(**inputs)
            steps.append(time.perf_counter() - start)
    comm["s"] += getattr(model.attention, "waited", 0.0) - waited
    result = {"step": steps, "comm": comm["s"] / payload["calls"],
              "sent": (getattr(model.attention, "sent", 0) - sent) / payload["calls"]}
    if rank == 0:
        np.save(Path(payload["out"]) / f"{kind}-{payload['threads']}-velocity.npy", velocity.numpy())
        Path(payload["result"]).write_text(json.dumps(result))
    if kind != "single":
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# parent


def run(kind: str, payload: dict, threads: int, world: int, work: Path) -> dict:
    result = work / f"result-{kind}-{threads}.json"
    payload = {**payload, "threads": threads, "result": str(result), "out": str(work)}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    module = ["-m", "benchmarks.parallel", "--child", kind, json.dumps(payload)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    cmd = [sys.executable] + module if kind == "single" else launch + module
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{kind} child exited with {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def traffic(fields: dict, l_img: int, l_txt: int, world: int, element_size: int,
            backend: str = "ulysses") -> tuple[int, int]:
    """Bytes one rank sends per transformer step: in attention (the all-to-alls, or the ring's k/v transfers), and
    in the final gather of the velocity."""
    from rectiflux.parallel import Plan
    from rectiflux.parallel.ring import bytes_per_ring_attention
    from rectiflux.parallel.sequence import bytes_per_attention

    plan = Plan(world, 0, l_txt, l_img)
    blocks = fields["depth"] + fields["depth_single"]
    per_call = bytes_per_ring_attention if backend == "ring" else bytes_per_attention
    a2a = blocks * per_call(plan, 1, fields["num_heads"], fields["head_dim"], element_size)
    return a2a, plan.img_local * fields["in_channels"] * element_size * (world - 1)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="medium-width", choices=list(CONFIGS))
    p.add_argument("--world", type=int, default=2, help="processes the model is split over (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the one-process run; each "
                   "rank gets threads / world")
    p.add_argument("--calls", type=int, default=3, help="timed transformer calls per setting, after a warm-up")
    p.add_argument("--backend", default="ulysses", choices=["ulysses", "ring"], help="sequence parallelism's "
                   "attention: Ulysses' all-to-alls (default) or ring attention")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-parallel.md")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return 0
    import numpy as np

    fields, l_img, l_txt = CONFIGS[args.config]
    if args.backend == "ulysses" and fields["num_heads"] % args.world:
        p.error(f"--world {args.world} does not divide the config's {fields['num_heads']} heads")
    per_rank = max(1, args.threads // args.world)
    started = machine(args.threads, "cpu", "float32")[0]
    payload = {"config": args.config, "calls": args.calls, "backend": args.backend}
    with tempfile.TemporaryDirectory(prefix="rectiflux-bench-parallel-") as tmp:
        work = Path(tmp)
        settings = [("1 process", "single", args.threads, 1), ("1 process", "single", per_rank, 1),
                    (f"{args.world} processes, each its shard alone (no exchange)", "pair", per_rank, args.world),
                    (f"{args.world} processes (sequence parallel)", "parallel", per_rank, args.world)]
        results = []
        for label, kind, threads, world in dict.fromkeys(settings):  # one setting when threads == per_rank
            print(f"{label}, {threads} thread(s) each", flush=True)
            results.append((label, kind, threads, world, run(kind, payload, threads, world, work)))
        single = np.load(work / f"single-{args.threads}-velocity.npy")
        split = np.load(work / f"parallel-{per_rank}-velocity.npy")
    diff = float(np.abs(split - single).max())
    rel = float(np.linalg.norm(split - single) / np.linalg.norm(single))

    t = {"num_attention_heads": fields["num_heads"], "attention_head_dim": fields["head_dim"],
         "num_layers": fields["depth"], "num_single_layers": fields["depth_single"],
         "in_channels": fields["in_channels"], "joint_attention_dim": fields["joint_attention_dim"],
         "pooled_projection_dim": fields["pooled_projection_dim"], "guidance_embeds": fields["guidance_embed"]}
    flops = step_flops(t, l_img, l_txt)
    a2a, gather = traffic(fields, l_img, l_txt, args.world, 4, args.backend)
    exchange = "the ring's k/v transfers send" if args.backend == "ring" else "the all-to-alls send"
    base = {threads: statistics.median(r["step"]) for _, kind, threads, _, r in results if kind == "single"}
    alone = statistics.median(next(r for _, kind, _, _, r in results if kind == "pair")["step"])
    parallel = next(r for _, kind, _, _, r in results if kind == "parallel")
    title = "ring attention" if args.backend == "ring" else "Ulysses"
    lines = [f"# Sequence parallelism ({title}) on the CPU, gloo", "",
             f"`python -m benchmarks.parallel {shlex.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}", "",
             started, f"- load average at the end {Path('/proc/loadavg').read_text().split()[0]}",
             f"- torch {__import__('torch').__version__}, Python {sys.version.split()[0]}; gloo on localhost; "
             "OMP_WAIT_POLICY=PASSIVE; float32", "",
             f"`{args.config}`: {fields['depth']} double + {fields['depth_single']} single blocks, hidden "
             f"{fields['num_heads'] * fields['head_dim']} ({fields['num_heads']} x {fields['head_dim']}), "
             f"{l_img} image + {l_txt} text tokens, {flops / 1e9:.3g} GFLOP per step; random weights; a step is one "
             f"transformer call, median (min-max) of {args.calls} after a warm-up.", "",
             "| setting | threads per process | step (s) | GFLOP/s | speed-up against 1 process on "
             f"{args.threads} thread(s) | against 1 process on {per_rank} thread(s) |", "|---|---|---|---|---|---|"]
    for label, _, threads, _, r in results:
        med = statistics.median(r["step"])
        lines.append(f"| {label} | {threads} | {stats(r['step'])} | {flops / med / 1e9:.3g} | "
                     f"{base[args.threads] / med:.2f} | {base[per_rank] / med:.2f} |")
    counted = parallel["sent"]
    lines += ["", f"Communication per step, one rank of {args.world}: {exchange} {mib(a2a)} (computed from "
              f"the shapes; the attention slot counted {mib(counted)}), the final gather of the velocity "
              f"{mib(gather)}; rank 0 spent {parallel['comm']:.3g} s per step in these collectives "
              f"({100 * parallel['comm'] / statistics.median(parallel['step']):.0f}% of its step, waiting for the "
              f"other rank included). Against {args.world} processes that each run their shard alone, with no "
              f"exchange (the same linear layers at once, attention over their own tokens only), the split step "
              f"takes {statistics.median(parallel['step']) / alone:.2f}x the time.",
              "", f"Same result: the split step's velocity against the one-process one, max |difference| {diff:.2g}, "
              f"relative error {rel:.2g}.", ""]
    dev = {**MODEL, "num_heads": 24, "depth": 19, "depth_single": 38}
    rows = [f"| {w} | " + " | ".join(mib(traffic(dev, tokens, 512, w, 2, args.backend)[0]) for tokens in (1024, 4096))
            + " |"
            for w in (2, 4, 8)]
    lines += ["Computed for FLUX.1-dev (19 + 38 blocks, 24 x 128 heads, 512 text tokens) in bfloat16: bytes one rank "
              f"sends in attention ({args.backend}) per step.", "",
              "| ranks | 512x512 (1024 image tokens) | 1024x1024 (4096 image tokens) |", "|---|---|---|", *rows, "",
              "On a CPU the processes share the same cores and memory bandwidth, so splitting one step over them "
              "cannot beat one process using every core: the same arithmetic is done (each rank's linear layers on its "
              "shard of the tokens, attention on its share of the heads), plus the all-to-alls (memory copies "
              "through gloo) and the small work every rank repeats (embedders, modulation vectors). The column "
              "against 1 process on the per-rank thread count is the scaling the split itself achieves; the "
              "speed-up sequence parallelism is for needs one accelerator per rank (NCCL)."]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
