"""GGUF (and bitsandbytes NF4) transformers of FLUX.1-dev's size on this machine: peak memory and time of one
256x256 denoising step.

    python -m benchmarks.gguf [--types Q8_0,Q4_K] [--dtypes float32,auto,auto+compile,auto+int8-dynamic]
                              [--compiled-chunk N]
                              [--workdir DIR] [--keep] [--out docs/bench-gguf.md]

Writes a random transformer with FLUX.1-dev's config (19 double + 38 single blocks, hidden 3072, guidance
embedder) as a GGUF file in city96's layout for each type: the blocks' linear weights in that type (random blocks
with small scales: the arithmetic does not care what the weights are), the rest F32, streamed tensor by tensor so
the writer never holds more than one; `--types NF4` writes Forge's bitsandbytes NF4 layout instead (a safetensors
file; 4-bit codes with a float32 scale per 64 weights, kept so in memory). Then, in a fresh process per file,
`rectiflux.weights.load_transformer` (blocks read at first use, quantised weights kept as the file's mapped bytes
and dequantised per product) runs
one warm-up call and then two timed transformer calls on a 256x256 image (256 image tokens) with 64 T5 tokens,
each part as one generation (the heap's free memory handed back at its end, as a pipeline's images do), and
reports its peak resident memory (VmHWM) against the file's size: over the whole process, and over the second
generation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS_IMG, TOKENS_TXT = 256, 64


def write_random_gguf(file: Path, qtype_name: str, seed: int = 0) -> int:
    import gguf
    import numpy as np
    import torch

    from benchmarks.dev8bit import dev_config
    from rectiflux.flux.transformer import Flux
    from rectiflux.quantize.gguf import BLOCKS, F16_FIELDS, GGMLType, byte_shape
    from rectiflux.weights.layout import unit_of

    qtype = GGMLType[qtype_name]
    block_size, type_size = BLOCKS[qtype]
    with torch.device("meta"):
        model = Flux(dev_config())
    specs = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}

    def quantised(key: str, shape: tuple[int, ...]) -> bool:
        return key.endswith(".weight") and len(shape) == 2 and unit_of(key).startswith(("double_", "single_"))

    g = torch.Generator().manual_seed(seed)
    tmp = file.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, "flux")
    for key, shape in specs.items():
        if quantised(key, shape):
            nbytes = int(np.prod(shape)) // block_size * type_size
            writer.add_tensor_info(key, byte_shape(shape, qtype), np.dtype(np.uint8), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(qtype))
        else:
            writer.add_tensor_info(key, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, shape in specs.items():
        if quantised(key, shape):
            blocks = torch.randint(0, 256, (int(np.prod(shape)) // block_size, type_size), generator=g,
                                   dtype=torch.uint8)
            for offset in F16_FIELDS[qtype]:
                d = torch.full((blocks.shape[0],), 2e-4 if qtype_name.endswith("_K") else 2e-3).half()
                blocks[:, offset:offset + 2] = d.view(torch.uint8).reshape(-1, 2)
            writer.write_tensor_data(blocks.numpy().reshape(byte_shape(shape, qtype)))
        else:
            writer.write_tensor_data((torch.randn(shape, generator=g) * 0.02).numpy())
    writer.close()
    os.sync()
    tmp.rename(file)
    return file.stat().st_size


def write_random_nf4(file: Path, seed: int = 0) -> int:
    """Forge's NF4 v2 layout as a safetensors file, streamed tensor by tensor: the blocks' linear weights as
    bitsandbytes stores them (random codes two a byte, a float32 scale per 64 weights, 16 code values, the JSON
    state), the rest F32, under `model.diffusion_model.`."""
    import json

    import numpy as np
    import torch

    from benchmarks.dev8bit import dev_config
    from rectiflux.flux.transformer import Flux
    from rectiflux.weights.layout import unit_of

    with torch.device("meta"):
        model = Flux(dev_config())
    entries = []  # (name, safetensors dtype, shape, what to write)
    for key, t in model.state_dict(keep_vars=True).items():
        name, shape = "model.diffusion_model." + key, tuple(t.shape)
        if key.endswith(".weight") and len(shape) == 2 and unit_of(key).startswith(("double_", "single_")):
            n = shape[0] * shape[1]
            state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(shape)})
            entries += [(name, "U8", (n // 2, 1), "codes"), (name + ".absmax", "F32", (n // 64,), "scales"),
                        (name + ".quant_map", "F32", (16,), "map"),
                        (name + ".quant_state.bitsandbytes__nf4", "U8", (len(state),), state.encode())]
        else:
            entries.append((name, "F32", shape, "normal"))
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        size = int(np.prod(shape)) * (1 if dtype == "U8" else 4)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = file.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for _, _, shape, what in entries:
            if what == "codes":
                data = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            elif what == "scales":
                data = torch.rand(shape, generator=g) * 0.02
            elif what == "map":
                data = torch.linspace(-1, 1, 16)
            elif isinstance(what, bytes):
                data = torch.frombuffer(bytearray(what), dtype=torch.uint8)
            else:
                data = torch.randn(shape, generator=g) * 0.02
            out.write(data.numpy().tobytes())
    os.sync()
    tmp.rename(file)
    return file.stat().st_size


def measure(file: Path, dtype_name: str, compiled_chunk: int | None = None) -> dict:
    import torch

    from rectiflux.quantize import gguf

    if compiled_chunk is not None:  # weights per dequantised chunk in a compiled block, instead of the default
        gguf.COMPILED_CHUNK_ELEMENTS = compiled_chunk

    from benchmarks.bench import peak_rss_mib, reset_peak_rss
    from benchmarks.dev8bit import dev_config
    from rectiflux.runtime import generation
    from rectiflux.weights.transformer import load_transformer

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    from rectiflux.runtime.kernels import fastest_dtypes

    dtype_name, *options = dtype_name.split("+")
    dtype = fastest_dtypes("cpu", 3072)["transformer"] if dtype_name == "auto" else getattr(torch, dtype_name)
    prepare = None
    if "int8-dynamic" in options:  # the blocks quantised again as load(quantize="int8-dynamic") does
        from rectiflux.pipelines.load import QUANTIZE_MODES
        from rectiflux.quantize.linear import block_quantizer

        prepare = block_quantizer(*QUANTIZE_MODES["int8-dynamic"])
    model = load_transformer(file, blocks="lazy", dtype=dtype, prepare=prepare)
    if prepare is not None:
        from rectiflux.quantize.linear import use_int8_dynamic_attention

        use_int8_dynamic_attention(model)
    if "compile" in options:  # the blocks compiled as load(compile=True) does; the first call compiles
        from rectiflux.runtime.compile import compile_blocks

        compile_blocks(model)
    load_s = time.perf_counter() - start
    cfg = dev_config()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, TOKENS_IMG, cfg.in_channels, generator=g), torch.zeros(TOKENS_IMG, 3),
              torch.randn(1, TOKENS_TXT, cfg.joint_attention_dim, generator=g), torch.zeros(TOKENS_TXT, 3),
              torch.tensor([0.5]), torch.randn(1, cfg.pooled_projection_dim, generator=g), torch.tensor([3.5]))
    # as a pipeline's images: the first generation reads the blocks (and compiles), the next one only steps
    times, peaks = [], []
    with torch.no_grad():
        for calls in (1, 2):
            with generation("cpu"):
                for _ in range(calls):
                    start = time.perf_counter()
                    out = model(*inputs)
                    times.append(time.perf_counter() - start)
            peaks.append(peak_rss_mib())
            reset_peak_rss()
    assert torch.isfinite(out).all()
    return {"load": load_s, "first": times[0], "steps": times[1:], "rss_mib": max(peaks), "later_rss_mib": peaks[-1],
            "dtype": str(dtype).removeprefix("torch.")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="Q8_0,Q4_K")
    p.add_argument("--workdir")
    p.add_argument("--keep", action="store_true", help="keep the files (reused by the next run in --workdir)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench-gguf.md"))
    p.add_argument("--dtypes", default="float32,auto", help="compute dtypes, each in its own process; "
                   "DTYPE+compile compiles the blocks (auto+compile), DTYPE+int8-dynamic quantises them again "
                   "(auto+int8-dynamic)")
    p.add_argument("--compiled-chunk", type=int, help="weights per dequantised chunk in a compiled block "
                   "(rectiflux.quantize.gguf.COMPILED_CHUNK_ELEMENTS)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-dtype", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child), args.child_dtype, args.compiled_chunk)))
        return 0
    from benchmarks.bench import machine

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rectiflux-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.types.split(","):
        file = work / (f"flux1-dev-random-{name}.gguf" if name != "NF4" else "flux1-dev-random-bnb-nf4.safetensors")
        if not file.exists():
            print(f"writing {file}", flush=True)
            write_random_gguf(file, name) if name != "NF4" else write_random_nf4(file)
        size_mib = file.stat().st_size / 2**20
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        for dtype in args.dtypes.split(","):
            with tempfile.TemporaryDirectory(prefix="inductor-", dir=work) as cache:
                # compiled from nothing, as a user's first run is: torch caches compiled graphs across processes
                chunk = [] if args.compiled_chunk is None else ["--compiled-chunk", str(args.compiled_chunk)]
                out = subprocess.run([sys.executable, "-m", "benchmarks.gguf", "--child", str(file), "--child-dtype",
                                      dtype, *chunk], cwd=ROOT, env={**env, "TORCHINDUCTOR_CACHE_DIR": cache},
                                     capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(name, r, flush=True)
            steps = sorted(r["steps"])
            compute = dtype.replace("auto", f"auto ({r['dtype']})").replace("+compile", ", compiled").replace(
                "+int8-dynamic", ", int8-dynamic")
            rows.append(f"| {name} | {compute} | {size_mib / 1024:.2f} | {r['rss_mib'] / 1024:.2f} | "
                        f"{r['rss_mib'] / size_mib:.3f} | {r['later_rss_mib'] / size_mib:.3f} | {r['load']:.2f} | "
                        f"{r['first']:.1f} | {steps[0]:.1f}-{steps[-1]:.1f} |")
        if not args.keep:
            file.unlink()
    when = datetime.now().astimezone().isoformat(timespec="seconds")
    lines = ["# GGUF transformers of FLUX.1-dev's size", "",
             "`" + ("" if not os.environ.get("GLIBC_TUNABLES") else f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']} ")
             + f"python -m benchmarks.gguf --types {args.types} --dtypes {args.dtypes}"
             + ("" if args.compiled_chunk is None else f" --compiled-chunk {args.compiled_chunk}") + f"`, {when}",
             "", *machine(os.cpu_count() or 1, "cpu", "float32")[:2],
             f"- one transformer call: {TOKENS_IMG} image tokens (256x256) + {TOKENS_TXT} T5 tokens, blocks read at "
             "first use, the weights dequantised to the compute dtype per product; peak RSS is the child's VmHWM "
             "over import, load, a first generation of one call (which reads the blocks, and compiles) and a "
             "second of two calls; then over the second alone; compiled ones start from an empty compile cache", "",
             "| type | compute | file (GiB) | peak RSS (GiB) | RSS / file | 2nd generation's RSS / file | load (s) "
             "| first call (s) | next calls (s) |",
             "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
