"""Runs for tests/test_fsdp.py under torchrun: `python -m torch.distributed.run ... fsdp_run.py SPEC.json`.

SPEC is a list of runs done one after another in the same processes, each {"kind": "flux" | "lora", "fsdp": bool,
"out": folder, "dump": file, ...}: it trains and rank 0 writes the final weights (gathered whole) to "dump".
"kill_at": [step, rank] makes that rank kill itself with SIGKILL once its shard of that step is on disk, before
the manifest commits it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import zlib

import torch
from safetensors.torch import save_file

from rectiflux.flux.autoencoder import AutoEncoder, AutoEncoderConfig
from rectiflux.flux.config import FluxConfig
from rectiflux.flux.transformer import Flux
from rectiflux.training import sharding
from rectiflux.training.sharding import full
from rectiflux.training.trainer import TrainConfig, Trainer

TINY_AE = AutoEncoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
TINY_FLUX = FluxConfig(in_channels=64, num_heads=2, head_dim=16, depth=1, depth_single=1, joint_attention_dim=16,
                       pooled_projection_dim=16, axes_dim=(4, 6, 6), guidance_embed=True)
FLUX_SETTINGS = {"stage": "flux", "batch_size": 8, "lr": 2e-3, "warmup": 2, "log_every": 1, "bank_size": 16,
                 "max_sequence_length": 8, "distill_steps": 3, "ema_decay": 0.9,
                 "grad_clip": 0.3}  # clips the first steps: the norm is taken over DTensor gradients
LORA_SETTINGS = {"rank": 4, "batch_size": 4, "lr": 1e-2, "resolution": 32, "max_sequence_length": 16, "log_every": 1,
                 "grad_clip": 0.01}


class StubText:
    """Text encoders stand-in: a fixed random embedding per caption, the same in every process."""

    def encode(self, captions, max_sequence_length=8):
        gens = [torch.Generator().manual_seed(zlib.crc32(c.encode())) for c in captions]
        embeds = torch.stack([torch.randn(max_sequence_length, 16, generator=g) for g in gens])
        return embeds, embeds.mean(1)


def flux_trainer(out: str, steps: int, **settings) -> Trainer:
    torch.manual_seed(0)
    ae = AutoEncoder(TINY_AE).eval().requires_grad_(False)
    flux = Flux(TINY_FLUX)
    cfg = TrainConfig(out=out, steps=steps, **{**FLUX_SETTINGS, **settings})
    return Trainer(cfg, flux, ae, StubText())


def kill_once_written(step: int, rank: int) -> None:
    """Make `rank` die by SIGKILL right after its shard of `step` is written (the others are then at the barrier
    before the manifest, or writing their own shard)."""
    save = sharding.save_state_dict

    def save_then_die(state, file, metadata=None):
        save(state, file, metadata)
        if metadata and metadata.get("step") == str(step) and metadata.get("rank") == str(rank):
            os.kill(os.getpid(), signal.SIGKILL)

    sharding.save_state_dict = save_then_die


def run_flux(spec: dict) -> None:
    trainer = flux_trainer(spec["out"], spec["steps"], fsdp=spec["fsdp"], checkpoint_every=spec.get("every", 0),
                           grad_accumulation=spec.get("micro", 1))
    if spec.get("kill_at"):
        kill_once_written(*spec["kill_at"])
    if spec.get("resume"):
        trainer.load_checkpoint()
        assert trainer.step == spec["resume"], (trainer.step, spec["resume"])
    trainer.fit()
    model = {f"model.{k}": full(v.detach()) for k, v in trainer.model.state_dict().items()}
    ema = trainer.whole_ema()  # gathered by every rank, kept by rank 0
    if trainer.rank == 0:
        model |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
        save_file({k: v.contiguous() for k, v in model.items()}, spec["dump"],
                  {"sharded": str(trainer.sharded), "world": str(trainer.world),
                   "teacher": str(trainer.teacher is not None)})


def run_lora(spec: dict) -> None:
    from rectiflux.pipelines.load import load
    from rectiflux.training.lora import train_lora

    pipe = load(spec["model"])
    before = {k: v.clone() for k, v in pipe.transformer.materialize().state_dict().items()}
    path = train_lora(pipe, resume=spec.get("resume", False), data=spec["data"], out=spec["out"], steps=spec["steps"],
                      fsdp=spec["fsdp"], save_every=spec.get("every", spec["steps"]), **LORA_SETTINGS)
    after = pipe.transformer.state_dict()  # the pipeline's transformer has all its weights back, unchanged
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if int(os.environ.get("RANK", "0")) == 0 and spec.get("dump"):
        shutil.copyfile(path, spec["dump"])


def main() -> None:
    for spec in json.loads(open(sys.argv[1]).read()):
        (run_flux if spec["kind"] == "flux" else run_lora)(spec)


if __name__ == "__main__":
    main()
