"""rectiflux against diffusers on this machine: load time, transformer step time, image time, peak memory.

    python -m benchmarks.bench [--configs shapes,medium,large] [--repeats 3] [--threads N] [--out docs/benchmarks.md]
                               [--sides rectiflux,rectiflux-int8,rectiflux-stream,diffusers]
    python -m benchmarks.bench --smoke            # tiny model, 1 repeat, table to a temp file (CI)
    python -m benchmarks.bench --device cuda --dtype bfloat16 --configs medium,dev   # on a GPU: docs/bench-gpu.md

Sides: `rectiflux` (blocks read at first use), `rectiflux-int8` (int8 weights and activations on the blocks'
linear layers, quantised while loading; bfloat16 attention where the CPU has bf16 kernels), `rectiflux-bf16`
(the whole pipeline in bfloat16), `rectiflux-stream` (each block read from disk before each use and freed after
it), `rectiflux-auto` (dtype="auto": per model the fastest arithmetic this machine has, rectiflux.runtime.kernels),
`rectiflux-compile` and `rectiflux-auto-compile` (regional torch.compile of the blocks), `rectiflux-auto-int8` and
`rectiflux-auto-int8-compile` (int8-dynamic in an "auto" pipeline, eager and compiled), `rectiflux-fp8` (float8
weights and activations through torch._scaled_mm, compiled: the GPU's fp8 path), `diffusers` and
`diffusers-compile` (its compile_repeated_blocks), all in float32 unless --dtype (or the side itself) says
otherwise. A compiled side's warm-up call (in 'load + first step') includes the compilation. Every ratio is
against diffusers; the other rectiflux sides' images are also compared with rectiflux's plain one.

Each config's random weights are written once (diffusers layout); then every repeat runs one fresh subprocess per
side, alternating which side goes first, with the same thread settings. A child imports only its own library,
loads the pipeline, times transformer calls on identical inputs, times one image end to end and reports its peak
resident memory (VmHWM: ru_maxrss would include the parent's peak, which it inherits across exec) and, on a GPU,
the peak of device memory allocated through torch. On a GPU every timing waits for the device to finish.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("rectiflux", "rectiflux-auto", "rectiflux-auto-compile", "rectiflux-compile", "rectiflux-int8",
         "rectiflux-auto-int8", "rectiflux-auto-int8-compile",
         "rectiflux-fp8", "rectiflux-bf16", "rectiflux-stream", "diffusers", "diffusers-compile")
DEFAULT_SIDES = ("rectiflux", "rectiflux-int8", "rectiflux-bf16", "rectiflux-stream", "diffusers")
LOAD_OPTIONS = {"rectiflux": {}, "rectiflux-int8": {"quantize": "int8-dynamic"},
                "rectiflux-bf16": {"dtype": "bfloat16"}, "rectiflux-stream": {"blocks": "stream"},
                "rectiflux-auto": {"dtype": "auto"}, "rectiflux-auto-compile": {"dtype": "auto", "compile": True},
                "rectiflux-compile": {"compile": True},
                "rectiflux-auto-int8": {"dtype": "auto", "quantize": "int8-dynamic"},
                "rectiflux-auto-int8-compile": {"dtype": "auto", "quantize": "int8-dynamic", "compile": True},
                "rectiflux-fp8": {"quantize": "float8-dynamic", "compile": True}}
PROMPT = "a large red circle on the left on a white background"
CHILD_TIMEOUT_S = 3 * 3600
TEXT = {"joint_attention_dim": 4096, "pooled_projection_dim": 768}  # FLUX.1's widths; the text encoders stay tiny


@dataclass
class Config:
    size: int  # image side in pixels
    seq_len: int | None  # T5 tokens (None: the model's default)
    steps: int | None  # denoising steps of the end-to-end image (None: the model's default)
    calls: int  # timed transformer calls per measurement (after one warm-up call)
    model: dict | None = None  # transformer/VAE sizes to build; None: the embedded shapes model


CONFIGS = {
    "smoke": Config(32, 16, 2, 2, dict(num_layers=1, num_single_layers=2, num_attention_heads=2,
                                       attention_head_dim=16, axes_dims_rope=(4, 6, 6), joint_attention_dim=32,
                                       pooled_projection_dim=32, vae_block_out_channels=(16, 32))),
    "shapes": Config(64, None, None, 5),
    "medium": Config(512, 256, 4, 2, dict(num_layers=8, num_single_layers=16, num_attention_heads=12,
                                          attention_head_dim=128, axes_dims_rope=(16, 56, 56), **TEXT,
                                          vae_block_out_channels=(32, 64, 64, 64))),
    # 1.9 G parameters (7.5 GiB float32): fits 24 GB even where diffusers holds the weights twice while loading
    "large": Config(512, 256, 2, 2, dict(num_layers=3, num_single_layers=6, num_attention_heads=24,
                                         attention_head_dim=128, axes_dims_rope=(16, 56, 56), **TEXT,
                                         vae_block_out_channels=(32, 64, 64, 64))),
    # FLUX.1-dev's transformer (11.9 G parameters) and VAE at 1024x1024 with its 512 T5 tokens: for a GPU
    "dev": Config(1024, 512, 8, 5, dict(num_layers=19, num_single_layers=38, num_attention_heads=24,
                                        attention_head_dim=128, axes_dims_rope=(16, 56, 56), **TEXT,
                                        vae_block_out_channels=(128, 256, 512, 512), vae_layers_per_block=2)),
}


# ---------------------------------------------------------------------------------------------------------------
# children: each runs in its own process, started by `run_child`

def build_folder(folder: Path, model: dict, device: str = "cpu", dtype: str = "float32") -> None:
    """Seeded random FLUX pipeline in the diffusers layout (tiny CLIP and T5, real tokenizer formats).

    The transformer is initialised on `device` directly in `dtype` and stored so: a dev-sized one would take
    48 GB in float32.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from rectiflux.shapes.tokenizers import CLIP_MAX_LENGTH, build_t5_tokenizer, write_clip_tokenizer

    m = dict(model)
    vae_blocks, joint, pooled = m.pop("vae_block_out_channels"), m["joint_attention_dim"], m["pooled_projection_dim"]
    vae_layers = m.pop("vae_layers_per_block", 1)
    clip_vocab = write_clip_tokenizer(folder / "tokenizer")
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **m)
    finally:
        torch.set_default_dtype(default_dtype)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks), block_out_channels=vae_blocks,
                        layers_per_block=vae_layers, latent_channels=16, norm_num_groups=8, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=pooled, intermediate_size=2 * pooled, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=joint, d_kv=8, d_ff=256, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=clip.eval(), tokenizer=clip_tokenizer,
                 text_encoder_2=t5.eval(), tokenizer_2=t5_tokenizer,
                 transformer=transformer.eval()).save_pretrained(folder, safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer")  # vocab.json + merges.txt, as a real FLUX folder ships them


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB: since it started, or since `reset_peak_rss`."""
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" sets VmHWM to the current resident size
        f.write("5")


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_rates(threads: int, repeats: int, device: str = "cpu", dtype: str = "float32") -> dict:
    """torch.mm rates in GFLOP/s; the first is the one a step is compared with."""
    import torch

    torch.set_num_threads(threads)
    shapes = {"2048^3": (2048, 2048, 2048), "576x768 @ 768x3072": (576, 768, 3072)}
    if device != "cpu":  # a GPU needs a larger product to reach its rate
        shapes = {"8192^3": (8192, 8192, 8192), "4608x3072 @ 3072x12288": (4608, 3072, 12288)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(k, n, device=device, dtype=getattr(torch, dtype))
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            times.append(time.perf_counter() - start)
        rates[name] = 2 * m * k * n / statistics.median(times) / 1e9
    return rates


def attention_kernels(device: str, dtype: str, repeats: int = 20) -> dict[str, float]:
    """Milliseconds of one FLUX.1-dev attention (24 heads x 128, 4096 + 512 tokens) per SDPA backend on a GPU."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q, k, v = (torch.randn(1, 24, 4608, 128, device=device, dtype=getattr(torch, dtype)) for _ in range(3))
    times = {}
    for name in ("default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with nullcontext() if name == "default" else sdpa_kernel([getattr(SDPBackend, name)]):
                sdpa(q, k, v)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(repeats):
                    sdpa(q, k, v)
                synchronize(device)
        except (RuntimeError, AttributeError):  # backend not built in or not usable for these inputs
            continue
        times[name] = (time.perf_counter() - start) / repeats * 1e3
    return times


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return device


def geometry(folder: Path, cfg: dict) -> dict:
    """Token counts and latent size of one image, from the folder's configs."""
    t = json.loads((folder / "transformer" / "config.json").read_text())
    scale = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    side = 2 * (cfg["size"] // (2 * scale))  # latent side (even)
    return {"transformer": t, "latent": side, "l_img": (side // 2) ** 2, "l_txt": cfg["seq_len"]}


def measure(side: str, folder: Path, cfg: dict, threads: int, out: Path) -> dict:
    start = time.perf_counter()
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    device, dtype = cfg.get("device", "cpu"), getattr(torch, cfg.get("dtype", "float32"))
    ours = not side.startswith("diffusers")
    if ours:
        from rectiflux.pipelines.load import load
    else:
        from diffusers import FluxPipeline
        from diffusers.utils import logging

        logging.disable_progress_bar()
    import_s = time.perf_counter() - start

    start = time.perf_counter()
    if ours:
        pipe = load(folder, **{"dtype": dtype, "device": device, **LOAD_OPTIONS[side]})
    else:
        pipe = FluxPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device)
        pipe.set_progress_bar_config(disable=True)
        if side == "diffusers-compile":  # diffusers' own regional compilation
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
    synchronize(device)
    load_s = time.perf_counter() - start

    g = geometry(folder, cfg)
    t, half = g["transformer"], g["latent"] // 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, g["l_img"], t["in_channels"], generator=gen).to(device, dtype)
    txt = torch.randn(1, g["l_txt"], t["joint_attention_dim"], generator=gen).to(device, dtype)
    pooled = torch.randn(1, t["pooled_projection_dim"], generator=gen).to(device, dtype)
    timestep = torch.tensor([0.5], device=device, dtype=dtype)
    guidance = torch.tensor([cfg["guidance"]], device=device) if t["guidance_embeds"] else None
    rows, cols = torch.meshgrid(torch.arange(half), torch.arange(half), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)
    txt_ids = torch.zeros(g["l_txt"], 3, device=device)
    if ours:
        from rectiflux import runtime

        runtime.heap.keep_freed_memory(device)  # the CPU policy a pipeline's generation starts
        work = pipe.transformer.work(1, g["l_img"] + g["l_txt"])

        def step():
            with runtime.threads_for(work, device):
                return pipe.transformer(img=x, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timestep,
                                        y=pooled, guidance=guidance)
    else:
        def step():
            return pipe.transformer(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                                    timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                                    return_dict=False)[0]
    step_s = []
    with torch.no_grad():
        start = time.perf_counter()
        velocity = step()  # warm-up; a lazy loader reads the weights here, so this is timed too
        synchronize(device)
        first_s = time.perf_counter() - start
        for _ in range(cfg["calls"]):
            start = time.perf_counter()
            step()
            synchronize(device)
            step_s.append(time.perf_counter() - start)

    def image(steps: int):
        return pipe(PROMPT, height=cfg["size"], width=cfg["size"], num_inference_steps=steps,
                    guidance_scale=cfg["guidance"], max_sequence_length=cfg["seq_len"],
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    image(1)  # warm-up: text encoders and VAE decoder
    synchronize(device)
    start = time.perf_counter()
    pixels = image(cfg["steps"])  # returned as numpy: the device has finished
    e2e_s = time.perf_counter() - start
    np.save(out / f"{side}-velocity.npy", velocity.float().cpu().numpy())
    np.save(out / f"{side}-image.npy", np.asarray(pixels))
    result = {"import": [import_s], "load": [load_s], "first": [load_s + first_s], "step": step_s, "e2e": [e2e_s],
              "rss": [peak_rss_mib()]}
    if device.startswith("cuda"):
        result["gpu"] = [torch.cuda.max_memory_allocated() / 2**20]
    return result


def child_main(kind: str, payload: dict) -> None:
    if kind == "build":
        build_folder(Path(payload["folder"]), payload["model"], payload["device"], payload["dtype"])
        result = {}
    elif kind == "gemm":
        result = {"rates": gemm_rates(payload["threads"], payload["repeats"], payload["device"], payload["dtype"]),
                  "device": device_name(payload["device"])}
        if payload["device"] != "cpu":
            try:
                result["attention"] = attention_kernels(payload["device"], payload["dtype"])
            except Exception as e:  # informative only: the GEMM rate is what the tables need
                print(f"attention kernels not measured: {e!r}", file=sys.stderr)
    else:
        result = measure(kind, Path(payload["folder"]), payload["cfg"], payload["threads"], Path(payload["out"]))
    Path(payload["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# parent

class ChildFailed(RuntimeError):
    pass


def run_child(kind: str, payload: dict, threads: int, work: Path, seen: set[str]) -> dict:
    result = work / f"result-{kind}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, "-m", "benchmarks.bench", "--child", kind, json.dumps({**payload, "result": str(result)})]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{kind} child ran past {CHILD_TIMEOUT_S} s") from None
    for line in proc.stderr.splitlines():  # each distinct warning once, so both sides' noise is visible
        if line.strip() and line not in seen:
            seen.add(line)
            print(f"  [{kind} stderr] {line}", file=sys.stderr)
    if proc.returncode != 0 or not result.exists():
        raise ChildFailed(f"{kind} child exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.read_text())


def step_flops(t: dict, l_img: int, l_txt: int) -> float:
    """FLOPs of one transformer call: 2 x (linear weights x the tokens they see) + 4 L^2 hidden per block."""
    h, n2, n1 = t["num_attention_heads"] * t["attention_head_dim"], t["num_layers"], t["num_single_layers"]
    mlp, seq, c = 4 * h, l_img + l_txt, t["in_channels"]
    macs = 2 * c * h * l_img + t["joint_attention_dim"] * h * l_txt  # img_in, final linear; txt_in
    macs += n2 * (4 * h * h + 2 * h * mlp) * seq  # per stream: qkv, proj, MLP, each on that stream's tokens
    macs += n1 * (h * (3 * h + mlp) + (h + mlp) * h) * seq  # single blocks: linear1, linear2
    embedders = (2 if t["guidance_embeds"] else 1) * (256 + h) * h + (t["pooled_projection_dim"] + h) * h
    macs += embedders + (12 * n2 + 3 * n1 + 2) * h * h  # one token each: embedders and modulations
    return 2 * macs + 4 * seq * seq * h * (n2 + n1)


def model_defaults(folder: Path) -> dict:
    path = folder / "rectiflux.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stats(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.3g}" if len(values) == 1 else f"{med:.3g} ({min(values):.3g}-{max(values):.3g})"


def run_config(name: str, args, gemm: float, work: Path, seen: set[str]) -> list[str]:
    from rectiflux.weights.checkpoint import read_keys_and_shapes
    from rectiflux.weights.sources import model_path

    cfg = CONFIGS[name]
    ours = [s for s in args.sides if s != "diffusers"]
    if cfg.model is None:

        try:
            folder = model_path(name)
        except FileNotFoundError as e:
            return [f"### {name}", "", f"Skipped: {e}. Train it first (`rectiflux train --preset shapes`).", ""]
    else:
        folder = work / name
        print(f"{name}: writing random weights to {folder}", flush=True)
        run_child("build", {"folder": str(folder), "model": cfg.model, "device": args.device, "dtype": args.dtype},
                  args.threads, work, seen)
    d = model_defaults(folder)
    c = {"size": cfg.size, "seq_len": cfg.seq_len or d.get("max_sequence_length", 512), "calls": cfg.calls,
         "steps": cfg.steps or d.get("steps", 28), "guidance": float(d.get("guidance", 3.5)),
         "device": args.device, "dtype": args.dtype}
    g = geometry(folder, c)
    t, flops = g["transformer"], step_flops(g["transformer"], g["l_img"], g["l_txt"])
    params = sum(math.prod(shape) for shape in read_keys_and_shapes(folder / "transformer").values())
    sides = args.sides
    results: dict[str, dict[str, list]] = {side: {} for side in sides}
    for r in range(args.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            print(f"{name}: repeat {r + 1}/{args.repeats}, {side}", flush=True)
            out = run_child(side, {"folder": str(folder), "cfg": c, "threads": args.threads, "out": str(work)},
                            args.threads, work, seen)
            for key, values in out.items():
                results[side].setdefault(key, []).extend(values)
    for side in sides:
        results[side]["gflops"] = [flops / s / 1e9 for s in results[side]["step"]]
        results[side]["gemm"] = [100 * v / gemm for v in results[side]["gflops"]]

    import numpy as np

    def load(side: str, kind: str):
        return np.load(work / f"{side}-{kind}.npy")

    diff = {k: float(np.abs(load("rectiflux", k) - load("diffusers", k)).max()) for k in ("velocity", "image")}
    rows = [("import (s)", "import"), ("load (s)", "load"), ("load + first step (s)", "first"),
            ("transformer step (s)", "step"),
            ("transformer GFLOP/s", "gflops"), ("% of GEMM rate", "gemm"),
            (f"end-to-end, {c['steps']} steps (s/image)", "e2e"), ("peak RSS (MiB)", "rss")]
    if args.device != "cpu":
        rows.append(("peak GPU memory allocated (MiB)", "gpu"))
    lines = [f"### {name}", "",
             f"{t['num_layers']} double + {t['num_single_layers']} single blocks, hidden "
             f"{t['num_attention_heads'] * t['attention_head_dim']} ({t['num_attention_heads']} x "
             f"{t['attention_head_dim']}), {params / 1e6:.1f} M transformer parameters; {c['size']}x{c['size']} "
             f"image = {g['l_img']} image + {g['l_txt']} text tokens; {flops / 1e9:.3g} GFLOP per transformer step; "
             f"{args.repeats} repeat(s) x {c['calls']} timed step(s).", "",
             "| metric | " + " | ".join(sides) + " | " + " | ".join(f"{s} / diffusers" for s in ours) + " |",
             "|---" * (len(sides) + len(ours) + 1) + "|"]
    for label, key in rows:
        d_ = statistics.median(results["diffusers"][key])
        cells = [stats(results[s][key]) for s in sides]
        cells += [f"{statistics.median(results[s][key]) / d_:.2f}" for s in ours]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Same work: max |difference| between rectiflux and diffusers of one transformer output "
              f"{diff['velocity']:.2g}, of the image {diff['image']:.2g} (pixels in [0, 1])."]
    for side in ours[1:]:
        mse = float(((load(side, "image") - load("rectiflux", "image")) ** 2).mean())
        rel = float(np.linalg.norm(load(side, "velocity") - load("rectiflux", "velocity"))
                    / np.linalg.norm(load("rectiflux", "velocity")))
        quality = "identical image" if mse == 0 else f"image PSNR {10 * math.log10(1 / mse):.1f} dB"
        lines.append(f"{side} against rectiflux {args.dtype}: {quality}, transformer output relative error {rel:.2g}.")
    return lines + [""]


def write_report(out: Path, lines: list[str]) -> None:
    """Write a benchmark's markdown page (creating its folder) and echo it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))


# the variables that cap the instruction sets torch's libraries use (set to emulate an AVX2-only CPU)
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_features() -> tuple[str, str]:
    """This CPU's model, and its instruction sets that decide int8 and bfloat16 speed (python -m benchmarks.kernels)
    with any cap set on those torch may use."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in cpuinfo if ln.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
           if f in flags]
    caps = [f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name)]
    return cpu, (' '.join(isa) or 'no AVX2') + (f" (capped: {' '.join(caps)})" if caps else "")


def machine(threads: int, device: str, dtype: str) -> list[str]:
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal"))
    load = Path("/proc/loadavg").read_text().split()[0]
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "diffusers", "transformers"))
    try:
        accelerate = f"accelerate {metadata.version('accelerate')} (diffusers loads on the meta device)"
    except metadata.PackageNotFoundError:
        accelerate = "no accelerate (diffusers initialises random weights, then loads: slower, twice the memory)"
    cpu, isa = cpu_features()
    return [f"- CPU: {cpu}, {os.cpu_count()} logical cores, {mem_kb / 2**20:.1f} GiB RAM; "
            f"load average at start {load}; {isa}",
            f"- {versions}, Python {sys.version.split()[0]}; {accelerate}"
            + (f"; GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}" if os.environ.get("GLIBC_TUNABLES") else ""),
            f"- threads: {threads} (torch.set_num_threads and OMP_NUM_THREADS), OMP_WAIT_POLICY=PASSIVE; "
            f"{dtype} on {device}, both sides"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", help=f"comma-separated, of {', '.join(CONFIGS)} (default shapes,medium,large)")
    p.add_argument("--repeats", type=int, help="fresh-process measurements per side (default 3; 1 with --smoke)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every child")
    p.add_argument("--out", type=Path, help="markdown file (default docs/benchmarks.md; a temp file with --smoke)")
    p.add_argument("--workdir", type=Path, help="where the random weights go (default: the system temp dir)")
    p.add_argument("--smoke", action="store_true", help="the tiny config, 1 repeat: checks the harness, not speed")
    p.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                   help=f"comma-separated, of {', '.join(SIDES)} (default {','.join(DEFAULT_SIDES)}; diffusers and "
                        "rectiflux are always run)")
    p.add_argument("--device", default="cpu", help="torch device of both sides (cuda: a GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute dtype of both sides (and of the random weights written)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return 0
    default = "smoke" if args.smoke else ("shapes,medium,large" if args.device == "cpu" else "medium,dev")
    names = (args.configs or default).split(",")
    if unknown := [n for n in names if n not in CONFIGS]:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.sides = [s for s in SIDES if s in set(args.sides.split(",")) | {"rectiflux", "diffusers"}]
    out = args.out or (Path(tempfile.gettempdir()) / "rectiflux-bench-smoke.md" if args.smoke
                       else ROOT / "docs" / ("benchmarks.md" if args.device == "cpu" else "bench-gpu.md"))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    failed = False
    with tempfile.TemporaryDirectory(prefix="rectiflux-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        print(f"measuring {args.dtype} GEMM throughput on {args.device}", flush=True)
        gemm = run_child("gemm", {"threads": args.threads, "repeats": 3 if args.smoke else 10, "device": args.device,
                                  "dtype": args.dtype}, args.threads, work, seen)
        rates = ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gemm["rates"].items())
        print(f"GEMM: {rates}", flush=True)
        where = "CPU" if args.device == "cpu" else f"GPU ({gemm['device']})"
        lines = [f"# rectiflux vs diffusers on {where}", "",
                 f"`python -m benchmarks.bench {shlex.join(sys.argv[1:] if argv is None else argv)}`, "
                 f"{datetime.now().astimezone().isoformat(timespec='seconds')}", "",
                 *machine(args.threads, args.device, args.dtype),
                 f"- {args.dtype} GEMM (torch.mm, median): {rates}",
                 *([("- one FLUX.1-dev attention (SDPA, 24 x 128 heads, 4608 tokens), ms by backend: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in gemm["attention"].items()))] if "attention" in gemm
                   else []),
                 "", "Every cell: median (min-max) over fresh processes (steps: over all timed calls). Ratios below 1 "
                 "favour rectiflux, except GFLOP/s and % of GEMM (the first GEMM rate), where above 1 does. A step is "
                 "one transformer call on identical random inputs, after one warm-up call; 'load + first step' adds "
                 "that warm-up call to the load (a lazy loader, and diffusers' memory map, read the weights there); "
                 "end-to-end is one image (text encoders, sampling, VAE decode) after a 1-step warm-up image; peak "
                 "RSS is the child's VmHWM over import, load, steps and images.", ""]
        for name in names:
            try:
                table = run_config(name, args, next(iter(gemm["rates"].values())), work, seen)
            except ChildFailed as e:
                failed, table = True, [f"### {name}", "", f"Failed: {e}", ""]
            print("\n" + "\n".join(table), flush=True)
            lines += table
            shutil.rmtree(work / name, ignore_errors=True)  # a large config's weights go before the next one's
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(lines).rstrip() + "\n")  # after each config: a cut-off run keeps its tables
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
