"""Training: rectified flow for the transformer, reconstruction + KL for the autoencoder, guidance distillation.

One process or many (torchrun / `accelerate launch` set RANK and WORLD_SIZE; gloo on CPU, NCCL on GPUs) with
no code change: the global batch is the same whatever the number of processes, each taking a slice of it.
Runs are seeded and resumable: a checkpoint holds the weights, the EMA, the optimizer, the data position and
the random state, so a killed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from .autoencoder import AutoEncoder, AutoEncoderConfig, load_autoencoder, save_autoencoder
from .checkpoint import save_state_dict, write_json
from .sampler import SchedulerConfig, compute_mu, latent_image_ids, pack_latents, text_ids, time_shift
from .shapes import Scene, random_caption, random_scene, render
from .text_encoders import TextEncoders
from .transformer import Flux, FluxConfig, save_transformer


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
    foreground_weight: float = 0.0
    preview_weight: float = 0.0
    gradient_weight: float = 0.0  # optional edge term (L1 on image gradients), a cheap perceptual loss
    # machinery
    bf16: bool = False
    grad_checkpointing: bool = False
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


class LatentBank:
    """A fixed set of shapes images encoded once by the frozen autoencoder.

    Encoding costs more than a step of the small transformer, so the flux stage draws from this bank (sample i
    uses image i mod size) and only the caption wording and the posterior sample are drawn afresh each time.
    """

    def __init__(self, autoencoder: AutoEncoder, seed: int, size: int, chunk: int = 256):
        means, stds, self.scenes = [], [], []
        with torch.no_grad():
            for start in range(0, size, chunk):
                pixels, scenes, _ = shapes_batch(seed + 1, start, min(chunk, size - start))
                posterior = autoencoder.encode(pixels.to(next(autoencoder.parameters()).device))
                means.append(posterior.mean.cpu())
                stds.append(posterior.std.cpu())
                self.scenes += scenes
        self.mean, self.std = torch.cat(means), torch.cat(stds)

    def batch(self, seed: int, start: int, count: int) -> tuple[Tensor, Tensor, list[str]]:
        index = [(start + k) % len(self.scenes) for k in range(count)]
        captions = [random_caption(self.scenes[j], random.Random(seed * 1_000_003 + start + k))
                    for k, j in enumerate(index)]
        return self.mean[index], self.std[index], captions


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


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


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
        self.rank, self.world = _init_distributed()
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over {self.world} processes")
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
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
        forward = Reconstruct(self.model) if isinstance(model, AutoEncoder) else self.model
        self.ddp = (nn.parallel.DistributedDataParallel(forward, device_ids=None if self.device.type == "cpu"
                                                        else [self.device.index]) if self.world > 1 else forward)
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
        # the random stream is a function of (seed, step, rank): a resumed run draws what the killed one would have
        self.generator.manual_seed(self.cfg.seed * 1_000_003 + self.step * 1009 + self.rank)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        per_rank = self.cfg.batch_size // self.world
        start = self.step * self.cfg.batch_size + self.rank * per_rank
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)
        with autocast:
            if self.cfg.stage == "ae":
                pixels, _, _ = shapes_batch(self.cfg.seed, start, per_rank)
                loss, extra = self.ae_loss(pixels.to(self.device))
            else:
                loss, extra = self.flux_loss(*self.bank.batch(self.cfg.seed, start, per_rank))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p.detach(), 1 - decay)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": self.lr_at(self.step - 1), **extra}

    def ae_loss(self, pixels: Tensor) -> tuple[Tensor, dict]:
        recon, mean, logvar = self.ddp(pixels, self.generator)
        # weight the shape's pixels up: the flat background is learned in a few steps, and then its thousands
        # of easy pixels would drown the few hundred that carry the shape's color and edges
        border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0], pixels[..., :, -1]], dim=-1)
        background = border.median(dim=-1).values[..., None, None]
        weight = 1 + self.cfg.foreground_weight * ((pixels - background).abs().amax(1, keepdim=True) > 0.05)
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
        return loss, {"psnr": psnr(recon.detach().float(), pixels)}

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:  # the text encoders are frozen: every caption is encoded once
            embeds, pooled = self.text_encoders.encode(missing, max_sequence_length=self.cfg.max_sequence_length)
            for c, e, p in zip(missing, embeds, pooled, strict=True):
                self._text_cache[c] = (e.float(), p.float())
        embeds = torch.stack([self._text_cache[c][0] for c in captions]).to(self.device)
        pooled = torch.stack([self._text_cache[c][1] for c in captions]).to(self.device)
        return embeds, pooled

    def flux_loss(self, mean: Tensor, std: Tensor, captions: list[str]) -> tuple[Tensor, dict]:
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
        return F.mse_loss(pred.float(), target.float()), {}

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self, sample_fn=None, until: int | None = None) -> None:
        """Train to cfg.steps (or stop early at `until`, as a killed run would, checkpoint included)."""
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.jsonl"
        start, seen, last_log = time.perf_counter(), 0, time.perf_counter()
        while self.step < until:
            if cfg.distill_steps and self.teacher is None and self.step >= cfg.steps - cfg.distill_steps:
                self.teacher = copy.deepcopy(self.ema).eval().requires_grad_(False)
            stats = self.train_step()
            seen += cfg.batch_size
            if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                now = time.perf_counter()
                stats.update(step=self.step, samples_per_s=seen / (now - last_log), elapsed_s=now - start)
                seen, last_log = 0, now
                with metrics.open("a") as f:
                    f.write(json.dumps(stats) + "\n")
                _progress(self.step, cfg.steps, stats)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 or self.step == until:
                self.save_checkpoint()
            if sample_fn is not None and cfg.sample_every and self.step % cfg.sample_every == 0 and self.rank == 0:
                sample_fn(self, self.out / "samples" / f"step-{self.step:06d}.png")
        if self.rank == 0:
            sys.stderr.write("\n")

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"

    def save_checkpoint(self) -> None:
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
        path = path or self.checkpoint_path()
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


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def _progress(step: int, total: int, stats: dict) -> None:
    width = 30
    done = int(width * step / total)
    extra = "  ".join(f"{k} {stats[k]:.4g}" for k in ("loss", "psnr", "samples_per_s") if k in stats)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total}  {extra}   ")
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------------------------
# the shapes preset: the embedded model's exact recipe

SHAPES_AE = AutoEncoderConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8)
SHAPES_FLUX = FluxConfig(in_channels=64, num_heads=2, head_dim=64, depth=2, depth_single=4,
                         joint_attention_dim=64, pooled_projection_dim=64, axes_dim=(8, 28, 28), guidance_embed=True)
SHAPES_TEXT = {"hidden": 64, "layers": 2, "heads": 2}
SHAPES_DEFAULTS = {"steps": 8, "guidance": 5.0, "width": 64, "height": 64, "max_sequence_length": 20,
                   "strength": 0.7}
SHAPES_SCHEDULER = SchedulerConfig(shift=1.0, use_dynamic_shifting=False)
SHAPES_STAGES = {
    "ae": TrainConfig(stage="ae", steps=5000, batch_size=8, lr=1e-3, warmup=100, ema_decay=0.995,
                      kl_weight=1e-6, foreground_weight=10.0, preview_weight=1.0, checkpoint_every=500,
                      log_every=50),
    "flux": TrainConfig(stage="flux", steps=5000, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.998,
                        distill_steps=1000, guidance_max=7.0, checkpoint_every=250, sample_every=1000),
}


def build_text_encoders(folder: Path, seed: int = 0) -> TextEncoders:
    """Frozen random CLIP and T5 encoders with the shapes vocabulary, saved in the diffusers layout under folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tokenizers import CLIP_MAX_LENGTH, build_t5_tokenizer, write_clip_tokenizer

    h, layers, heads = SHAPES_TEXT["hidden"], SHAPES_TEXT["layers"], SHAPES_TEXT["heads"]
    vocab = write_clip_tokenizer(folder / "tokenizer")
    t5_tokenizer = build_t5_tokenizer()
    t5_tokenizer.save_pretrained(folder / "tokenizer_2")
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=h, intermediate_size=2 * h,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        max_position_embeddings=CLIP_MAX_LENGTH, eos_token_id=vocab - 1,
                                        bos_token_id=vocab - 2, pad_token_id=vocab - 1, projection_dim=h))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=h, d_kv=h // heads, d_ff=2 * h,
                                 num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, tie_word_embeddings=False))
    clip.save_pretrained(folder / "text_encoder", safe_serialization=True)
    t5.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    return TextEncoders.from_folder(folder, dtype=torch.float32)


def export_shapes(out: Path, flux: Flux, autoencoder: AutoEncoder, text_dir: Path, half: bool = True) -> Path:
    """Write the trained model as a diffusers-layout folder: what `rectiflux.load` and diffusers both read."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    save_transformer(copy.deepcopy(flux).to(dtype), out / "transformer")
    save_autoencoder(copy.deepcopy(autoencoder).to(dtype), out / "vae")
    for sub in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        shutil.copytree(text_dir / sub, out / sub)
    if half:  # store the text encoders in half precision too
        from safetensors.torch import load_file, save_file
        for sub in ("text_encoder", "text_encoder_2"):
            for file in (out / sub).glob("*.safetensors"):
                save_file({k: v.half() for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
            cfg_file = out / sub / "config.json"
            cfg = json.loads(cfg_file.read_text())
            cfg["dtype"] = cfg["torch_dtype"] = "float16"
            cfg_file.write_text(json.dumps(cfg, indent=2))
    write_json({**SHAPES_SCHEDULER.to_diffusers()}, out / "scheduler" / "scheduler_config.json")
    write_json({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, out / "model_index.json")
    write_json(SHAPES_DEFAULTS, out / "rectiflux.json")
    return out


def train_shapes(out: str | os.PathLike, ae_overrides: dict | None = None, flux_overrides: dict | None = None,
                 resume: bool = False, stages: tuple[str, ...] = ("ae", "flux"),
                 export_to: str | os.PathLike | None = None) -> Path:
    """The whole recipe of the embedded model: autoencoder, then transformer (with guidance distillation), then
    export. The overrides change TrainConfig fields of each stage (e.g. fewer steps for a smoke run)."""
    out = Path(out)
    text_dir = out / "text"
    rank, _ = _init_distributed()
    if rank == 0 and not (text_dir / "text_encoder_2").exists():  # one process writes, the others wait and read
        build_text_encoders(text_dir)
    _barrier()
    encoders = TextEncoders.from_folder(text_dir, dtype=torch.float32)
    ae_dir = out / "ae"
    if "ae" in stages:
        cfg = TrainConfig.from_dict({**asdict(SHAPES_STAGES["ae"]), **(ae_overrides or {}), "stage": "ae",
                                     "out": str(ae_dir)})
        trainer = Trainer(cfg, AutoEncoder(SHAPES_AE))
        if resume and trainer.checkpoint_path().exists():
            trainer.load_checkpoint()
        trainer.fit()
        if trainer.rank == 0:
            save_autoencoder(trainer.ema, ae_dir / "final")
        _barrier()
    autoencoder = load_autoencoder(ae_dir / "final", dtype=torch.float32).eval().requires_grad_(False)
    flux_dir = out / "flux"
    if "flux" in stages:
        cfg = TrainConfig.from_dict({**asdict(SHAPES_STAGES["flux"]), **(flux_overrides or {}), "stage": "flux",
                                     "out": str(flux_dir)})
        trainer = Trainer(cfg, Flux(SHAPES_FLUX), autoencoder, encoders, SHAPES_SCHEDULER)
        if resume and trainer.checkpoint_path().exists():
            trainer.load_checkpoint()
        trainer.fit(sample_fn=_sample_grid)
        if trainer.rank == 0:
            save_transformer(trainer.ema, flux_dir / "final")
        _barrier()
    if not (flux_dir / "final").exists():  # only the autoencoder so far
        return ae_dir / "final"
    from .transformer import load_transformer
    flux = load_transformer(flux_dir / "final")
    target = Path(export_to) if export_to else out / "model"
    if rank == 0:
        export_shapes(target, flux, autoencoder, text_dir)
    _barrier()
    return target


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


SAMPLE_PROMPTS = ["a large red circle on the left on a white background",
                  "a small blue square at the top on a black background",
                  "a large yellow triangle in the center on a gray background",
                  "a small green cross on the right on a white background",
                  "a large purple triangle at the bottom on a white background",
                  "a large orange circle in the center on a black background"]


@torch.no_grad()
def _sample_grid(trainer: Trainer, path: Path) -> None:
    """A row of images from the EMA weights, so a person can watch the model learn."""
    from PIL import Image

    from .pipeline import Defaults, FluxPipeline
    pipe = FluxPipeline(trainer.ema, trainer.autoencoder, trainer.text_encoders, SHAPES_SCHEDULER,
                        Defaults(**{k: v for k, v in SHAPES_DEFAULTS.items()}))
    images = pipe(SAMPLE_PROMPTS, generator=torch.Generator().manual_seed(0)).images
    grid = Image.new("RGB", (64 * len(images), 64))
    for i, image in enumerate(images):
        grid.paste(image, (64 * i, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
