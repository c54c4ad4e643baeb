"""The GPU benchmark, prepared to fit about 8 minutes of a lent device: docs/bench-gpu.md.

    python -m benchmarks.gpu [--configs medium,dev] [--out docs/bench-gpu.md]

One command around benchmarks.bench: bfloat16 on CUDA, one repeat, the sides that matter there: rectiflux eager,
regionally compiled, and fp8 (float8 weights and activations through torch._scaled_mm, compiled) against diffusers
eager and diffusers compiled (compile_repeated_blocks), with step time, end to end, peak memory and % of the bf16
GEMM rate, the card named in the header. The random weights are written on the device in bfloat16.
"""

from __future__ import annotations

import sys

from benchmarks import bench

SIDES = "rectiflux,rectiflux-compile,rectiflux-fp8,diffusers,diffusers-compile"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = ["--device", "cuda", "--dtype", "bfloat16", "--repeats", "1", "--sides", SIDES,
                "--configs", "medium,dev", "--out", str(bench.ROOT / "docs" / "bench-gpu.md")]
    given = {a for a in argv if a.startswith("--")}
    for flag, value in zip(defaults[::2], defaults[1::2], strict=True):
        if flag not in given:
            argv += [flag, value]
    return bench.main(argv)


if __name__ == "__main__":
    sys.exit(main())
