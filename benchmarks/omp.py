"""What OpenMP's wait policy costs the command line: `rectiflux generate` with OMP_WAIT_POLICY=PASSIVE (what the CLI
sets when the user has not) against the policy left unset (libgomp's default: idle threads spin), on an idle machine
and beside another process that keeps the cores busy.

    python -m benchmarks.omp [--repeats 5] [--out docs/bench-omp.md]

Each run is a fresh process (libgomp reads the policy when torch loads), the two policies alternating; the figure
is the whole command as a user waits for it (imports, load, the image, the PNG).
"""

from __future__ import annotations

import argparse
import os
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

# the command line without main()'s default, so the child's policy is exactly the environment's
CHILD = "import sys; from rectiflux import cli; sys.exit(cli.run(cli.build_parser().parse_args(sys.argv[1:])))"
BUSY = "import torch\nx = torch.randn(1024, 1024)\nwhile True:\n    x @ x\n"
CASES = {"64x64, 8 steps (the README's command)": ["--steps", "8"],
         "256x256, 40 steps": ["--width", "256", "--height", "256", "--steps", "40"]}


def one_run(policy: str | None, extra: list[str], folder: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    argv = ["generate", "a large red circle on the left on a white background", "--seed", "1", "-o",
            str(folder / "x.png"), "--overwrite", *extra]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-omp.md")
    args = p.parse_args(argv)
    from benchmarks.bench import machine, write_report

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for beside in (False, True):
            unset = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # a busy neighbour spins
            busy = subprocess.Popen([sys.executable, "-c", BUSY], env=unset) if beside else None
            try:
                for label, extra in CASES.items():
                    times: dict[str, list[float]] = {"PASSIVE": [], "unset": []}
                    one_run("PASSIVE", extra, Path(tmp))  # warm the page cache
                    for _ in range(args.repeats):
                        for policy in ("PASSIVE", "unset"):
                            times[policy].append(one_run(policy if policy != "unset" else None, extra, Path(tmp)))
                    passive, unset = statistics.median(times["PASSIVE"]), statistics.median(times["unset"])
                    where = "beside a busy process" if beside else "idle"
                    rows.append(f"| {where} | {label} | {passive:.2f} | {unset:.2f} | {passive / unset:.2f} |")
                    print(rows[-1], flush=True)
            finally:
                if busy is not None:
                    busy.kill()
    lines = ["# OpenMP's wait policy and the command line", "",
             f"`python -m benchmarks.omp {' '.join(sys.argv[1:] if argv is None else argv)}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}", "", *machine(os.cpu_count(), "cpu",
                                                                                      "float32")[:2], "",
             f"Seconds for the whole `rectiflux generate` command, median of {args.repeats} fresh processes per "
             "policy, alternating; the embedded shapes model. The busy process multiplies 1024x1024 float32 "
             "matrices on every core, as a training run beside it would.", "",
             "| machine | image | PASSIVE (s) | unset (s) | PASSIVE / unset |", "|---|---|---|---|---|", *rows, "",
             "`rectiflux` sets OMP_WAIT_POLICY=PASSIVE before torch loads unless the environment sets it; Python "
             "programs using the library choose their own (the README says how). Idle, the README's command costs "
             "the same either way; the larger image, four times the size the embedded model knows, pays for waking "
             "sleeping threads on its hundreds of tiny ops per step (docs/bench-threads.md); beside other work, "
             "spinning threads fight it for the cores."]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
