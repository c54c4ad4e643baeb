"""How often a two-process gloo run aborts at exit after torch.distributed's functional collectives, against the
in-place ones rectiflux.parallel exchanges with: the figures of docs/scale-out.md.

    python -m benchmarks.collectives_exit [--launches 25]

Each launch is `torchrun --standalone --nproc-per-node 2` of this file: its ranks make the exchanges of sequence
parallelism (all_to_all_single, then all_gather) 50 times and destroy their process group. A launch that exits
non-zero counts as an abort; the first line torch printed is shown once per kind.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

KINDS = ("functional", "in-place")


def exchange(kind: str) -> None:
    """One rank's run: 50 rounds of both exchanges, then the group destroyed."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    x = torch.ones(1000)
    for _ in range(50):
        if kind == "functional":
            import torch.distributed._functional_collectives as fc

            group = dist.group.WORLD
            for y in (fc.all_to_all_single(x, None, None, group), fc.all_gather_single(x, 0, group)):
                if isinstance(y, fc.AsyncCollectiveTensor):
                    y.wait()
        else:
            dist.all_to_all_single(torch.empty_like(x), x)
            (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(x.new_empty(2 * 1000), x)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=25, help="two-process launches per kind of collective")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kind in KINDS:
        aborts, said = 0, ""
        for _ in range(args.launches):
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                   "2", __file__, kind], env=env, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                aborts += 1
                said = said or proc.stderr.strip().splitlines()[0]
        said = f" ({said})" if said else ""
        print(f"{kind} collectives: {aborts} of {args.launches} launches exited non-zero{said}", flush=True)


if __name__ == "__main__":
    if "LOCAL_RANK" in os.environ:  # a rank started by torchrun
        exchange(sys.argv[1])
    else:
        main()
