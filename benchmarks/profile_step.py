"""Where a transformer step's time goes: torch's profiler over a medium-width FLUX (random weights).

    python -m benchmarks.profile_step [--double 1] [--single 2] [--heads 12] [--dtype bfloat16]
                                      [--quantize int8-dynamic] [--attention sdpa]

Hidden heads x 128 (1536 by default; 24 heads is FLUX.1's 3072), 1024 image + 256 text tokens, float32 unless
--dtype; --quantize quantises the blocks as rectiflux.load does, and with int8-dynamic picks the attention as it does
unless --attention names one. Prints the median time of five calls, then the ops by self time over two more.
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rectiflux.flux.config import FluxConfig
from rectiflux.flux.layers import ATTENTIONS
from rectiflux.flux.transformer import Flux
from rectiflux.pipelines.load import QUANTIZE_MODES
from rectiflux.quantize.linear import block_quantizer, use_int8_dynamic_attention
from rectiflux.runtime import heap


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quantize", choices=list(QUANTIZE_MODES))
    parser.add_argument("--attention", choices=list(ATTENTIONS), help="instead of the one load would choose")
    args = parser.parse_args()
    cfg = FluxConfig(in_channels=64, num_heads=args.heads, head_dim=128, depth=args.double, depth_single=args.single,
                     joint_attention_dim=4096, pooled_projection_dim=768, guidance_embed=True)
    model = Flux(cfg).eval().to(getattr(torch, args.dtype))
    if args.quantize:
        prepare = block_quantizer(*QUANTIZE_MODES[args.quantize])
        for block in [*model.double_blocks, *model.single_blocks]:
            prepare(block)
        if args.quantize == "int8-dynamic":
            use_int8_dynamic_attention(model)
    if args.attention:
        model.attention = ATTENTIONS[args.attention]
    ids = torch.zeros(1024, 3)
    ids[:, 1], ids[:, 2] = torch.arange(1024) // 32, torch.arange(1024) % 32
    inputs = dict(img=torch.randn(1, 1024, 64), img_ids=ids, txt=torch.randn(1, 256, 4096),
                  txt_ids=torch.zeros(256, 3), timesteps=torch.rand(1), y=torch.randn(1, 768), guidance=torch.ones(1))
    heap.keep_freed_memory("cpu")  # as a pipeline's generation does
    with torch.no_grad():
        model(**inputs)  # warm-up: the first call pays one-time costs
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            model(**inputs)
            seconds.append(time.perf_counter() - start)
        print(f"attention: {model.attention.__name__}; a call takes {statistics.median(seconds):.3f} s "
              f"(median of 5, {min(seconds):.3f}-{max(seconds):.3f})")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                model(**inputs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
