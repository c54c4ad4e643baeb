"""Training: rectified flow for the transformer, reconstruction + KL for the autoencoder, guidance distillation.

One process or many (torchrun / `accelerate launch` set RANK and WORLD_SIZE; gloo on CPU, NCCL on GPUs) with
no code change: the global batch is the same whatever the number of processes, each taking a slice of it (and
with `grad_accumulation`, a process takes its slice in micro-batches). The model is replicated (DDP), or with
`fsdp` sharded (FSDP2, `training.sharding`): the model, its EMA, the teacher, the gradients and AdamW's state each
kept as one shard per process.
Runs are seeded and resumable: a checkpoint holds the weights, the EMA, the optimizer, the data position and
the random state, so a killed run continues exactly where it stopped. Sharded runs write one file per process and
a manifest (`sharding.save_sharded`) and resume under the same number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from ..flux.autoencoder import AutoEncoder
from ..flux.text_encoders import TextEncoders
from ..flux.transformer import Flux
from ..images import psnr
from ..progress import progress_bar
from ..sampling.latents import latent_image_ids, pack_latents, text_ids
from ..sampling.schedule import SchedulerConfig, compute_mu, time_shift
from ..shapes.world import Scene, random_caption, random_scene, render
from ..weights.checkpoint import save_state_dict
from . import sharding
from .sharding import full, local


@dataclass
class TrainConfig:
    out: str = "runs/shapes"
    stage: str = "flux"  # "ae" trains the autoencoder, "flux" the transformer on the frozen autoencoder
    steps: int = 6000
    batch_size: int = 64  # global, split over processes
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    # rectified flow
    logit_mean: float = 0.0
    logit_std: float = 1.0
    resolution_shift: bool = False  # shift t like the sampler does for this image size
    text_dropout: float = 0.1
    max_sequence_length: int = 20
    bank_size: int = 20_000  # images encoded once for the flux stage
    distill_steps: int = 0  # the last steps distil classifier-free guidance into the guidance embedder
    guidance_max: float = 6.0
    # autoencoder
    kl_weight: float = 1e-6
    initial_logvar: float = -8.0
    foreground_weight: float = 0.0  # the shape's pixels (autoencoder) or image tokens (transformer) weigh 1 + this
    preview_weight: float = 0.0
    gradient_weight: float = 0.0  # optional edge term (L1 on image gradients), a cheap perceptual loss
    # machinery
    bf16: bool = False
    grad_checkpointing: bool = False
    grad_accumulation: int = 1  # micro-batches per process and step (the random stream is drawn per micro-batch)
    fsdp: bool = False  # shard the model over the processes (FSDP2) instead of replicating it (DDP)
    checkpoint_every: int = 500
    sample_every: int = 0
    log_every: int = 20

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------------------------
# data: the shapes world, rendered on the fly; sample i is a pure function of (seed, i), so the loader's
# whole state is the index of the next sample

def shapes_batch(seed: int, start: int, count: int) -> tuple[Tensor, list[Scene], list[str]]:
    images, scenes, captions = [], [], []
    for i in range(start, start + count):
        rng = random.Random(seed * 1_000_003 + i)
        scene = random_scene(rng)
        images.append(np.asarray(render(scene, rng), dtype=np.float32))
        scenes.append(scene)
        captions.append(random_caption(scene, rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, scenes, captions


def foreground(pixels: Tensor) -> Tensor:
    """(B, 1, H, W) mask of the pixels that differ from the background (the median of the border)."""
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0], pixels[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    return (pixels - background).abs().amax(1, keepdim=True) > 0.05


def foreground_tokens(pixels: Tensor, tokens_per_side: int) -> Tensor:
    """(B, tokens) mask of the packed image tokens whose patch holds any of the shape, in `pack_latents`' order."""
    patch = pixels.shape[-1] // tokens_per_side
    return F.max_pool2d(foreground(pixels).float(), patch).flatten(1) > 0


class LatentBank:
    """A fixed set of shapes images encoded once by the frozen autoencoder.

    Encoding costs more than a step of the small transformer, so the flux stage draws from this bank (sample i
    uses image i mod size) and only the caption wording and the posterior sample are drawn afresh each time.
    Each image also keeps which of its tokens hold the shape, for the loss weighting.
    """

    def __init__(self, autoencoder: AutoEncoder, seed: int, size: int, chunk: int = 256):
        means, stds, masks, self.scenes = [], [], [], []
        with torch.no_grad():
            for start in range(0, size, chunk):
                pixels, scenes, _ = shapes_batch(seed + 1, start, min(chunk, size - start))
                posterior = autoencoder.encode(pixels.to(next(autoencoder.parameters()).device))
                means.append(posterior.mean.cpu())
                stds.append(posterior.std.cpu())
                masks.append(foreground_tokens(pixels, posterior.mean.shape[-1] // 2))
                self.scenes += scenes
        self.mean, self.std, self.shape_tokens = torch.cat(means), torch.cat(stds), torch.cat(masks)

    def batch(self, seed: int, start: int, count: int) -> tuple[Tensor, Tensor, list[str], Tensor]:
        index = [(start + k) % len(self.scenes) for k in range(count)]
        captions = [random_caption(self.scenes[j], random.Random(seed * 1_000_003 + start + k))
                    for k, j in enumerate(index)]
        return self.mean[index], self.std[index], captions, self.shape_tokens[index]


# ----------------------------------------------------------------------------------------------------------------
# pure pieces of the objectives

def sample_t(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Logit-normal noise levels: most samples in the middle of the path, where the velocity is hardest."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_pair(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x_t = (1 - t) x0 + t noise and its velocity target noise - x0."""
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tb) * x0 + tb * noise, noise - x0


def guided_target(v_cond: Tensor, v_uncond: Tensor, guidance: Tensor) -> Tensor:
    return v_uncond + guidance.view(-1, 1, 1) * (v_cond - v_uncond)


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()


# ----------------------------------------------------------------------------------------------------------------

class Reconstruct(nn.Module):
    """The autoencoder's training forward (encode, sample, decode) as one call, so DDP can sync its gradients."""

    def __init__(self, autoencoder: AutoEncoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, pixels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        posterior = self.autoencoder.encode(pixels)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(pixels)
        return self.autoencoder.decode(z), posterior.mean, posterior.logvar


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, autoencoder: AutoEncoder | None = None,
                 text_encoders: TextEncoders | None = None, scheduler: SchedulerConfig | None = None):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
        check_split(cfg.batch_size, self.world, cfg.grad_accumulation)
        self.sharded = cfg.fsdp and self.world > 1  # one process has nothing to shard: it runs as without fsdp
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device).train()
        self.autoencoder, self.text_encoders = autoencoder, text_encoders
        self.scheduler = scheduler or SchedulerConfig()
        if isinstance(model, Flux):
            model.gradient_checkpointing = cfg.grad_checkpointing
        if isinstance(model, AutoEncoder):
            # start with a small posterior std: at logvar 0 the sampling noise swamps the latents and the
            # reconstruction crawls until the tiny KL weight lets the encoder shrink it
            with torch.no_grad():
                model.encoder.conv_out.bias[model.config.latent_channels:].fill_(cfg.initial_logvar)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.teacher: nn.Module | None = None
        forward = Reconstruct(self.model) if isinstance(model, AutoEncoder) else self.model
        if self.sharded:
            # the EMA and the teacher are sharded like the model: each rank holds the same rows of every tensor
            self.mesh = sharding.device_mesh(self.device)
            self.skeleton = sharding.meta_copy(self.ema)  # whole and sharded copies are built from it
            sharding.shard(forward, sharding.units_of(self.model), self.mesh)
            sharding.shard(self.ema, sharding.units_of(self.ema), self.mesh, frozen=True)
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
        self.ddp = (nn.parallel.DistributedDataParallel(forward, device_ids=None if self.device.type == "cpu"
                                                        else [self.device.index])
                    if self.world > 1 and not self.sharded else forward)
        self.generator = torch.Generator()
        self.step = 0
        self.out = Path(cfg.out)
        self.bank = LatentBank(autoencoder, cfg.seed, cfg.bank_size) if cfg.stage == "flux" else None
        self._text_cache: dict[str, tuple[Tensor, Tensor]] = {}

    # -- one step ---------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(self.cfg.warmup, 1))
        progress = step / max(self.cfg.steps, 1)
        return self.cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self) -> dict[str, float]:
        cfg, micro = self.cfg, self.cfg.grad_accumulation
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        per_slice = cfg.batch_size // (self.world * micro)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        self.optimizer.zero_grad(set_to_none=True)
        losses, extras = [], []
        for m in range(micro):
            # the global batch is split in world x micro slices, and the random stream is a function of (seed,
            # step, slice): a resumed run draws what the killed one would have, and one process with N
            # micro-batches what N processes draw (with one micro-batch the slice is the rank)
            part = self.rank * micro + m
            self.generator.manual_seed(cfg.seed * 1_000_003 + self.step * 1009 + part)
            start = self.step * cfg.batch_size + part * per_slice
            with autocast:
                if cfg.stage == "ae":
                    pixels, _, _ = shapes_batch(cfg.seed, start, per_slice)
                    loss, extra = self.ae_loss(pixels.to(self.device))
                else:
                    loss, extra = self.flux_loss(*self.bank.batch(cfg.seed, start, per_slice))
            last = m == micro - 1
            # DDP averages the gradients of the last micro-batch's backward only (they accumulate locally before);
            # FSDP reduces each backward into the sharded gradients, which keeps them sharded in between
            sync = self.ddp.no_sync() if not last and isinstance(self.ddp, nn.parallel.DistributedDataParallel) \
                else contextlib.nullcontext()
            with sync:
                (loss / micro if micro > 1 else loss).backward()
            losses.append(loss.item())
            extras.append(extra)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)  # DTensors when sharded
        self.optimizer.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                local(e).lerp_(local(p.detach()), 1 - decay)  # the same rows of both on each rank
        self.step += 1
        extra = {k: sum(x[k] for x in extras) / micro for k in extras[0]}
        return {"loss": sum(losses) / micro, "grad_norm": float(full(grad_norm)), "lr": self.lr_at(self.step - 1),
                **extra}

    def ae_loss(self, pixels: Tensor) -> tuple[Tensor, dict]:
        recon, mean, logvar = self.ddp(pixels, self.generator)
        # weight the shape's pixels up: the flat background is learned in a few steps, and then its thousands
        # of easy pixels would drown the few hundred that carry the shape's color and edges
        weight = 1 + self.cfg.foreground_weight * foreground(pixels)
        err = recon - pixels
        rec = (weight * (err.abs() + err.pow(2))).mean() / weight.mean()
        loss = rec + self.cfg.kl_weight * kl_divergence(mean, logvar)
        if self.cfg.preview_weight:
            # the first three latent channels are asked to hold the image at 1/8 scale: an easy path for color
            # that the decoder can use from the first steps, and a latent space whose colors are readable
            factor = pixels.shape[-1] // mean.shape[-1]
            loss = loss + self.cfg.preview_weight * F.mse_loss(mean[:, :3], F.avg_pool2d(pixels, factor))
        if self.cfg.gradient_weight:
            def grads(x: Tensor) -> tuple[Tensor, Tensor]:
                return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]
            (ry, rx), (py, px) = grads(recon), grads(pixels)
            loss = loss + self.cfg.gradient_weight * (F.l1_loss(ry, py) + F.l1_loss(rx, px))
        return loss, {"psnr": psnr(recon.detach().float().clamp(-1, 1), pixels.clamp(-1, 1), data_range=2.0)}

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:  # the text encoders are frozen: every caption is encoded once
            embeds, pooled = self.text_encoders.encode(missing, max_sequence_length=self.cfg.max_sequence_length)
            for c, e, p in zip(missing, embeds, pooled, strict=True):
                self._text_cache[c] = (e.float(), p.float())
        embeds = torch.stack([self._text_cache[c][0] for c in captions]).to(self.device)
        pooled = torch.stack([self._text_cache[c][1] for c in captions]).to(self.device)
        return embeds, pooled

    def flux_loss(self, mean: Tensor, std: Tensor, captions: list[str], shape_tokens: Tensor | None = None
                  ) -> tuple[Tensor, dict]:
        z = mean + std * torch.randn(mean.shape, generator=self.generator)
        x0 = pack_latents(self.autoencoder.scale_latents(z)).to(self.device)
        n, (h, w) = x0.shape[0], mean.shape[-2:]
        t = sample_t(n, self.generator, self.cfg.logit_mean, self.cfg.logit_std)
        if self.cfg.resolution_shift:
            s = self.scheduler
            t = time_shift(compute_mu((h // 2) * (w // 2), s.base_image_seq_len, s.max_image_seq_len,
                                      s.base_shift, s.max_shift), t)
        t = t.to(self.device)
        noise = torch.randn(x0.shape, generator=self.generator).to(x0)
        x_t, target = flow_pair(x0, noise, t)
        distilling = self.teacher is not None
        drop = torch.rand(n, generator=self.generator) < (0.0 if distilling else self.cfg.text_dropout)
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        embeds, pooled = self.encode_text(captions)
        img_ids, txt_ids = latent_image_ids(h, w, self.device), text_ids(embeds.shape[1], self.device)
        guidance = torch.ones(n, device=self.device)
        if distilling:
            guidance = 1 + (self.cfg.guidance_max - 1) * torch.rand(n, generator=self.generator).to(self.device)
            with torch.no_grad():
                empty, empty_pooled = self.encode_text([""] * n)
                ones = torch.ones(n, device=self.device)
                v_cond = self.teacher(x_t, img_ids, embeds, txt_ids, t, pooled, ones)
                v_uncond = self.teacher(x_t, img_ids, empty, txt_ids, t, empty_pooled, ones)
                target = guided_target(v_cond, v_uncond, guidance)
        pred = self.ddp(img=x_t, img_ids=img_ids, txt=embeds, txt_ids=txt_ids, timesteps=t, y=pooled,
                        guidance=guidance if self.model.config.guidance_embed else None)
        if not self.cfg.foreground_weight or shape_tokens is None:
            return F.mse_loss(pred.float(), target.float()), {}
        # a small shape is one to four of the 16 tokens: weighted up, its outline is not drowned by the easy
        # background tokens (the autoencoder's loss does the same for pixels)
        weight = (1 + self.cfg.foreground_weight * shape_tokens.float()).to(pred.device)[..., None]
        return (weight * (pred.float() - target.float()).pow(2)).mean() / weight.mean(), {}

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self, sample_fn=None, until: int | None = None) -> None:
        """Train to cfg.steps (or stop early at `until`, as a killed run would, checkpoint included)."""
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.jsonl"
        start, seen, last_log = time.perf_counter(), 0, time.perf_counter()
        label = {"ae": "autoencoder", "flux": "transformer"}.get(cfg.stage, cfg.stage)
        with progress_bar(cfg.steps, desc=label, initial=self.step, disable=None if self.rank == 0 else True,
                          leave=True) as bar:
            while self.step < until:
                if cfg.distill_steps and self.teacher is None and self.step >= cfg.steps - cfg.distill_steps:
                    self.teacher = self.frozen_copy(self.ema)
                stats = self.train_step()
                seen += cfg.batch_size
                bar.update(1)
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    now = time.perf_counter()
                    stats.update(step=self.step, samples_per_s=seen / (now - last_log), elapsed_s=now - start)
                    seen, last_log = 0, now
                    with metrics.open("a") as f:
                        f.write(json.dumps(stats) + "\n")
                    bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("loss", "psnr") if k in stats}, refresh=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 or self.step == until:
                    self.save_checkpoint()
                if sample_fn is not None and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self._sample(sample_fn, self.out / "samples" / f"step-{self.step:06d}.png")

    def _sample(self, sample_fn, path: Path) -> None:
        """sample_fn(trainer, path) on rank 0, with `trainer.ema` whole for the call when the run is sharded."""
        if not self.sharded:
            if self.rank == 0:
                sample_fn(self, path)
            return
        whole = self.whole_ema()  # every rank takes part in the gathering
        if self.rank == 0:
            sharded, self.ema = self.ema, whole
            try:
                sample_fn(self, path)
            finally:
                self.ema = sharded

    # -- copies -----------------------------------------------------------------------------------------------
    def frozen_copy(self, source: nn.Module) -> nn.Module:
        """A frozen copy of the EMA (the distillation teacher), sharded like it when the run is."""
        if not self.sharded:
            return copy.deepcopy(source).eval().requires_grad_(False)
        return sharding.sharded_copy(self.skeleton, source, self.mesh, self.device).eval().requires_grad_(False)

    def whole_ema(self) -> nn.Module | None:
        """The EMA as one plain module (what is exported). Sharded runs gather it (every rank calls this) and
        rank 0 gets it, the others None; otherwise it is `self.ema` itself."""
        if not self.sharded:
            return self.ema
        return sharding.whole_copy(self.skeleton, self.ema, keep=self.rank == 0)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        """The run's checkpoint: `checkpoint.json` (a sharded run's manifest) or `checkpoint.safetensors`, the one
        this run writes unless only the other kind is there (then load_checkpoint says why it cannot resume)."""
        return sharding.checkpoint_path(self.out, self.sharded)

    def _state(self, with_optimizer: bool = True) -> dict[str, Tensor]:
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        if self.teacher is not None:
            state |= {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        return state

    def save_checkpoint(self) -> None:
        if self.sharded:
            state = self._state()
            for i, p in enumerate(self.model.parameters()):
                s = self.optimizer.state.get(p)
                if s:
                    state |= {f"optim.{i}.exp_avg": s["exp_avg"], f"optim.{i}.exp_avg_sq": s["exp_avg_sq"],
                              f"optim.{i}.step": torch.as_tensor(s["step"]).reshape(1).float()}
            sharding.save_sharded(self.out, self.step, state, {"config": json.dumps(asdict(self.cfg)),
                                                               "model_config": json.dumps(asdict(self.model.config))})
            return
        if self.rank != 0:
            return
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        if self.teacher is not None:
            state |= {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        for i, p in enumerate(self.model.parameters()):
            s = self.optimizer.state.get(p)
            if s:
                state |= {f"optim.{i}.exp_avg": s["exp_avg"], f"optim.{i}.exp_avg_sq": s["exp_avg_sq"],
                          f"optim.{i}.step": torch.as_tensor(s["step"]).reshape(1).float()}
        meta = {"step": str(self.step), "config": json.dumps(asdict(self.cfg)),
                "model_config": json.dumps(asdict(self.model.config))}
        save_state_dict(state, self.checkpoint_path(), meta)

    def load_checkpoint(self, path: Path | None = None) -> None:
        path = Path(path or self.checkpoint_path())
        sharding.check_kind(path, self.sharded, self.world)
        if self.sharded:
            self._load_sharded(path)
            return
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
        self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
        teacher = {k[8:]: v for k, v in state.items() if k.startswith("teacher.")}
        if teacher:
            self.teacher = copy.deepcopy(self.ema)
            self.teacher.load_state_dict(teacher)
        for i, p in enumerate(self.model.parameters()):
            if f"optim.{i}.exp_avg" in state:
                self.optimizer.state[p] = {"exp_avg": state[f"optim.{i}.exp_avg"].to(p),
                                           "exp_avg_sq": state[f"optim.{i}.exp_avg_sq"].to(p),
                                           "step": state[f"optim.{i}.step"].reshape(()).clone()}
        self.step = int(meta["step"])

    def _load_sharded(self, path: Path) -> None:
        manifest = sharding.read_manifest(path, self.world)
        saved = manifest["shapes"]
        if any(k.startswith("teacher.") for k in saved) and self.teacher is None:
            self.teacher = self.frozen_copy(self.ema)
        targets = self._state()
        params = list(self.model.parameters())
        for i, p in enumerate(params):
            if f"optim.{i}.exp_avg" in saved:
                targets |= {f"optim.{i}.exp_avg": torch.zeros_like(p.detach()),
                            f"optim.{i}.exp_avg_sq": torch.zeros_like(p.detach()), f"optim.{i}.step": torch.zeros(1)}
        sharding.check_shapes(path, manifest, {k: tuple(v.shape) for k, v in targets.items()},
                              [k for k in targets if not k.startswith(("optim.", "teacher."))])
        sharding.load_sharded(path, manifest, targets)
        for i, p in enumerate(params):
            if f"optim.{i}.exp_avg" in saved:
                self.optimizer.state[p] = {"exp_avg": targets[f"optim.{i}.exp_avg"],
                                           "exp_avg_sq": targets[f"optim.{i}.exp_avg_sq"],
                                           "step": targets[f"optim.{i}.step"].reshape(()).clone()}
        self.step = int(manifest["step"])


def check_split(batch_size: int, world: int, micro: int) -> None:
    if micro < 1:
        raise ValueError(f"grad_accumulation must be at least 1, got {micro}")
    if batch_size % (world * micro):
        raise ValueError(f"batch_size {batch_size} does not split over {world} processes" +
                         (f" x {micro} micro-batches" if micro > 1 else ""))


def init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)
