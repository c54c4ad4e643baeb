"""LoRA training: low-rank adapters on a frozen FLUX transformer, learned from a folder of captioned images.

The folder holds images with a `.txt` caption beside each (`cat.png` + `cat.txt`, as kohya and ai-toolkit read
them). Images are encoded once (their posterior mean and std kept, a fresh sample drawn each step) and captions
once; the objective is the rectified flow's velocity at logit-normal (or size-shifted) noise levels, with a fixed
distilled-guidance value. Runs under torchrun / accelerate like the main trainer (the adapters' gradients are
averaged), resumes from its checkpoint, and writes the adapters in the diffusers/peft layout (diffusers'
`load_lora_weights` reads it) or kohya's.

With `fsdp` (and more than one process) the frozen transformer is sharded too: a sharded copy of it trains (each
block a unit; the adapters, their AdamW state and the layers outside the blocks in the root's unit) while the
pipeline's own transformer gives up its weights, which come back, gathered from the shards, once training ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn

from .. import images as im
from ..progress import progress_bar
from ..sampling.latents import latent_image_ids, pack_latents, text_ids
from ..sampling.schedule import compute_mu, time_shift
from ..weights.checkpoint import save_state_dict
from ..weights.layout import SWAPPED, transformer_parts
from . import DEFAULT_TARGETS, sharding
from .sharding import full
from .trainer import check_split, flow_pair, init_distributed, sample_t

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LoraTrainConfig:
    data: str = "data"
    out: str = "runs/lora"
    rank: int = 16
    alpha: float | None = None  # None: the rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 500
    batch_size: int = 8  # global, split over processes
    lr: float = 1e-3
    warmup: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    timesteps: str = "logit-normal"  # or "shifted": the sampler's resolution shift applied to them
    guidance: float = 1.0
    caption_dropout: float = 0.0
    resolution: int | None = None  # None: the model's default width
    max_sequence_length: int | None = None  # None: the model's default
    bf16: bool = False
    grad_checkpointing: bool = False
    grad_accumulation: int = 1  # micro-batches per process and step (the random stream is drawn per micro-batch)
    fsdp: bool = False  # shard the frozen transformer and the adapters over the processes (FSDP2) instead of DDP
    save_every: int = 100
    log_every: int = 10
    format: str = "peft"  # or "kohya"

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.timesteps not in ("logit-normal", "shifted"):
            raise ValueError(f"timesteps must be 'logit-normal' or 'shifted', got {self.timesteps!r}")
        if self.format not in ("peft", "kohya"):
            raise ValueError(f"format must be 'peft' or 'kohya', got {self.format!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoraNetwork(nn.Module):
    """Trainable factors `down` (rank x in) and `up` (out x rank) beside chosen linear layers of a frozen transformer,
    added to their outputs by forward hooks; `up` starts at zero, so training starts from the base model."""

    def __init__(self, transformer: nn.Module, rank: int, scale: float, targets: tuple[str, ...], seed: int = 0):
        super().__init__()
        self.transformer, self.scale = transformer.requires_grad_(False), scale
        self.names = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and n.endswith(targets)
                      and n.startswith(("double_blocks.", "single_blocks."))]
        if not self.names:
            raise ValueError(f"no linear layer of the transformer ends in {', '.join(targets)}")
        g = torch.Generator().manual_seed(seed)
        self.downs, self.ups = nn.ParameterDict(), nn.ParameterDict()
        self.handles = []
        for name in self.names:
            linear = transformer.get_submodule(name)
            key = name.replace(".", "__")
            bound = 1 / math.sqrt(linear.in_features)  # nn.Linear's own init for the down projection
            self.downs[key] = nn.Parameter((torch.rand(rank, linear.in_features, generator=g) * 2 - 1) * bound)
            self.ups[key] = nn.Parameter(torch.zeros(linear.out_features, rank))
            self.handles.append(linear.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def add(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            x = args[0]
            down, up = self.downs[key], self.ups[key]
            return out + self.scale * F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
        return add

    def forward(self, **inputs) -> Tensor:
        return self.transformer(**inputs)

    def detach_hooks(self) -> None:
        """Leave the transformer as it was (the trained adapters live on in the saved file)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Our module name -> (down, up), detached float32, whole (sharded ones gathered: every rank calls this)."""
        return {n: (full(self.downs[n.replace(".", "__")].detach()).float().cpu(),
                    full(self.ups[n.replace(".", "__")].detach()).float().cpu()) for n in self.names}


def lora_state_dict(factors: dict[str, tuple[Tensor, Tensor]], config, rank: int, alpha: float,
                    fmt: str = "peft") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Trained factors as a LoRA file's (tensors, metadata): diffusers/peft names (a fused projection becomes one
    adapter per diffusers module, sharing the down projection: the same change) or kohya's."""
    tensors: dict[str, Tensor] = {}
    if fmt == "kohya":
        for name, (down, up) in factors.items():
            key = "lora_unet_" + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(),
                        f"{key}.alpha": torch.tensor(float(alpha))}
        return tensors, {"format": "pt", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    parts = transformer_parts(config)
    h = config.hidden_size
    targets = []
    for name, (down, up) in factors.items():
        theirs = parts[name]
        sizes = [h, h, h, config.mlp_hidden][: len(theirs)] if len(theirs) > 1 else [up.shape[0]]
        if name == SWAPPED:
            up = torch.cat(up.chunk(2)[::-1])
        for module, piece in zip(theirs, up.split(sizes), strict=True):
            tensors[f"transformer.{module}.lora_A.weight"] = down.clone()  # safetensors stores no shared memory
            tensors[f"transformer.{module}.lora_B.weight"] = piece.contiguous()
            targets.append(module)
    metadata = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": sorted(targets)}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}


# ----------------------------------------------------------------------------------------------------------------
# data

def read_dataset(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a folder; an image without its caption file is refused by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no training folder at {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise ValueError(f"{image.name} has no caption: write it to {caption.name} beside it")
        pairs.append((image, caption.read_text(encoding="utf-8").strip()))
    return pairs


class CachedData:
    """The images' posterior mean and std and the captions' embeddings, computed once with the frozen models."""

    def __init__(self, pipe, pairs: list[tuple[Path, str]], resolution: int, max_sequence_length: int):
        ae = pipe.autoencoder
        means, stds = [], []
        with torch.no_grad():
            for path, _ in pairs:
                with Image.open(path) as image:
                    pixels = im.preprocess_image(im.fit_crop(im.to_8bit(image).convert("RGB"), resolution,
                                                             resolution), resolution, resolution)
                posterior = ae.encode(pixels.to(pipe.device, ae.encoder.conv_in.weight.dtype))
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
            self.mean, self.std = torch.cat(means), torch.cat(stds)
            captions = sorted({c for _, c in pairs} | {""})
            embeds, pooled = pipe.text_encoders.encode(captions, max_sequence_length=max_sequence_length)
        self.text = {c: (e.float().cpu(), p.float().cpu()) for c, e, p in zip(captions, embeds, pooled, strict=True)}
        self.captions = [c for _, c in pairs]
        self.scale, self.shift = ae.config.scaling_factor, ae.config.shift_factor

    def __len__(self) -> int:
        return len(self.captions)


# ----------------------------------------------------------------------------------------------------------------
# the loop

class LoraTrainer:
    def __init__(self, cfg: LoraTrainConfig, pipe):
        self.cfg, self.pipe = cfg, pipe
        self.rank, self.world = init_distributed()
        check_split(cfg.batch_size, self.world, cfg.grad_accumulation)
        self.sharded = cfg.fsdp and self.world > 1  # one process has nothing to shard: it runs as without fsdp
        self.out = Path(cfg.out)
        self.device = pipe.device
        self.resolution = cfg.resolution or pipe.defaults.width
        self.seq_len = cfg.max_sequence_length or pipe.defaults.max_sequence_length
        self.data = CachedData(pipe, read_dataset(cfg.data), self.resolution, self.seq_len)
        self.base = transformer = pipe.transformer.materialize()
        if self.sharded:
            wrong = next((p.dtype for p in transformer.parameters() if not p.is_floating_point()), None)
            if wrong is not None:
                raise ValueError(f"--fsdp shards floating-point weights; this transformer holds {wrong} ones")
            self.mesh = sharding.device_mesh(self.device)
            transformer = sharding.sharded_copy(sharding.meta_copy(transformer), transformer, self.mesh, self.device,
                                                shard_root=False)
            sharding.release(self.base)  # back from the shards in restore_transformer()
        transformer.gradient_checkpointing = cfg.grad_checkpointing
        self.network = LoraNetwork(transformer, cfg.rank, cfg.scale, cfg.targets, cfg.seed)
        if self.sharded:
            self.network.downs.to(self.device)
            self.network.ups.to(self.device)
            sharding.shard(self.network, [], self.mesh)  # the root: adapters and the layers outside the blocks
        else:
            self.network.to(self.device)
        params = [*self.network.downs.values(), *self.network.ups.values()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.ddp = (nn.parallel.DistributedDataParallel(self.network, device_ids=None if self.device.type == "cpu"
                                                        else [self.device.index])
                    if self.world > 1 and not self.sharded else self.network)
        self.generator = torch.Generator()
        self.step = 0

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(self.cfg.warmup, 1))

    def train_step(self) -> float:
        cfg, micro = self.cfg, self.cfg.grad_accumulation
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for m in range(micro):
            # the random stream is a function of (seed, step, slice of the global batch), the slice the rank's
            # with one micro-batch: one process with N micro-batches draws what N processes draw
            part = self.rank * micro + m
            loss = self.slice_loss(part, cfg.batch_size // (self.world * micro))
            sync = self.ddp.no_sync() if m < micro - 1 and isinstance(self.ddp, nn.parallel.DistributedDataParallel) \
                else contextlib.nullcontext()
            with sync:
                (loss / micro if micro > 1 else loss).backward()
            losses.append(loss.item())
        nn.utils.clip_grad_norm_([*self.network.downs.values(), *self.network.ups.values()], cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return sum(losses) / micro

    def slice_loss(self, part: int, per_rank: int) -> Tensor:
        """The loss of slice `part` (of `per_rank` samples) of this step's global batch."""
        cfg = self.cfg
        self.generator.manual_seed(cfg.seed * 1_000_003 + self.step * 1009 + part)
        rng = random.Random(cfg.seed * 7919 + self.step * self.world * cfg.grad_accumulation + part)
        index = [rng.randrange(len(self.data)) for _ in range(per_rank)]
        d = self.data
        z = d.mean[index] + d.std[index] * torch.randn(d.mean[index].shape, generator=self.generator)
        x0 = pack_latents((z - d.shift) * d.scale).to(self.device)
        h, w = z.shape[-2:]
        t = sample_t(per_rank, self.generator)
        if cfg.timesteps == "shifted":
            s = self.pipe.scheduler
            t = time_shift(compute_mu((h // 2) * (w // 2), s.base_image_seq_len, s.max_image_seq_len, s.base_shift,
                                      s.max_shift), t)
        noise = torch.randn(x0.shape, generator=self.generator).to(x0)
        x_t, target = flow_pair(x0, noise, t.to(self.device))
        captions = ["" if rng.random() < cfg.caption_dropout else d.captions[i] for i in index]
        embeds = torch.stack([d.text[c][0] for c in captions]).to(self.device)
        pooled = torch.stack([d.text[c][1] for c in captions]).to(self.device)
        guidance = torch.full((per_rank,), cfg.guidance, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = self.ddp(img=x_t, img_ids=latent_image_ids(h, w, self.device), txt=embeds,
                            txt_ids=text_ids(embeds.shape[1], self.device), timesteps=t.to(self.device), y=pooled,
                            guidance=guidance if self.network.transformer.config.guidance_embed else None)
            return F.mse_loss(pred.float(), target.float())

    def fit(self) -> Path:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        start, losses = time.perf_counter(), []
        with progress_bar(cfg.steps, desc="lora", initial=self.step, disable=None if self.rank == 0 else True,
                          leave=True) as bar:
            while self.step < cfg.steps:
                losses.append(self.train_step())
                bar.update(1)
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    with (self.out / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps({"step": self.step, "loss": float(np.mean(losses)),
                                            "lr": self.lr_at(self.step - 1),
                                            "elapsed_s": time.perf_counter() - start}) + "\n")
                    bar.set_postfix({"loss": f"{np.mean(losses):.4g}"}, refresh=False)
                    losses = []
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
        return self.lora_path()

    # -- files ------------------------------------------------------------------------------------------------
    def lora_path(self) -> Path:
        return self.out / ("pytorch_lora_weights.safetensors" if self.cfg.format == "peft" else "lora.safetensors")

    def checkpoint_path(self) -> Path:
        """`checkpoint.json` (a sharded run's manifest) or `checkpoint.safetensors` (see Trainer.checkpoint_path)."""
        return sharding.checkpoint_path(self.out, self.sharded)

    def _lora_state(self) -> dict[str, Tensor]:
        return {f"lora.{k}": v for k, v in self.network.state_dict().items() if k.startswith(("downs.", "ups."))}

    def save(self) -> None:
        if self.rank != 0 and not self.sharded:
            return
        cfg = self.cfg
        factors = self.network.factors()  # gathered on every rank when sharded
        if self.rank == 0:
            tensors, metadata = lora_state_dict(factors, self.network.transformer.config, cfg.rank,
                                                cfg.alpha if cfg.alpha is not None else cfg.rank, cfg.format)
            save_state_dict(tensors, self.lora_path(), metadata)
        state = self._lora_state()
        params = [*self.network.downs.values(), *self.network.ups.values()]
        for i, p in enumerate(params):
            s = self.optimizer.state.get(p)
            if s:
                state |= {f"optim.{i}.exp_avg": s["exp_avg"], f"optim.{i}.exp_avg_sq": s["exp_avg_sq"],
                          f"optim.{i}.step": torch.as_tensor(s["step"]).reshape(1).float()}
        if self.sharded:
            sharding.save_sharded(self.out, self.step, state, {"config": json.dumps(asdict(cfg))})
        else:
            save_state_dict(state, self.checkpoint_path(), {"step": str(self.step), "config": json.dumps(asdict(cfg))})

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path()
        sharding.check_kind(path, self.sharded, self.world)
        if self.sharded:
            self._load_sharded(path)
            return
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
        self.network.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lora.")}, strict=False)
        for i, p in enumerate([*self.network.downs.values(), *self.network.ups.values()]):
            if f"optim.{i}.exp_avg" in state:
                self.optimizer.state[p] = {"exp_avg": state[f"optim.{i}.exp_avg"].to(p),
                                           "exp_avg_sq": state[f"optim.{i}.exp_avg_sq"].to(p),
                                           "step": state[f"optim.{i}.step"].reshape(()).clone()}
        self.step = int(meta["step"])

    def _load_sharded(self, path: Path) -> None:
        manifest = sharding.read_manifest(path, self.world)
        targets = self._lora_state()
        required = list(targets)
        params = [*self.network.downs.values(), *self.network.ups.values()]
        for i, p in enumerate(params):
            if f"optim.{i}.exp_avg" in manifest["shapes"]:
                targets |= {f"optim.{i}.exp_avg": torch.zeros_like(p.detach()),
                            f"optim.{i}.exp_avg_sq": torch.zeros_like(p.detach()), f"optim.{i}.step": torch.zeros(1)}
        sharding.check_shapes(path, manifest, {k: tuple(v.shape) for k, v in targets.items()}, required)
        sharding.load_sharded(path, manifest, targets)
        for i, p in enumerate(params):
            if f"optim.{i}.exp_avg" in manifest["shapes"]:
                self.optimizer.state[p] = {"exp_avg": targets[f"optim.{i}.exp_avg"],
                                           "exp_avg_sq": targets[f"optim.{i}.exp_avg_sq"],
                                           "step": targets[f"optim.{i}.step"].reshape(()).clone()}
        self.step = int(manifest["step"])

    def restore_transformer(self) -> None:
        """Give the pipeline's transformer back its weights, gathered from the sharded copy that trained (every
        rank calls this); nothing to do when the run was not sharded."""
        if not self.sharded:
            return
        prefix = "transformer."
        state = {k[len(prefix):]: v for k, v in self.network.state_dict().items() if k.startswith(prefix)}
        sharding.restore(self.base, state)


def train_lora(pipe, resume: bool = False, **settings) -> Path:
    """Train LoRA adapters for `pipe`'s transformer (the Python entry point of `rectiflux train-lora`); returns the
    LoRA file. `settings` are LoraTrainConfig's fields."""
    names = {f.name for f in fields(LoraTrainConfig)}
    unknown = set(settings) - names
    if unknown:
        raise TypeError(f"train_lora() got unknown settings {', '.join(sorted(unknown))}")
    trainer = LoraTrainer(LoraTrainConfig(**settings), pipe)
    if resume and trainer.checkpoint_path().exists():
        trainer.load_checkpoint()
    try:
        path = trainer.fit()
    finally:
        trainer.network.detach_hooks()
        trainer.network.transformer.gradient_checkpointing = False
    trainer.restore_transformer()
    if dist.is_initialized():
        dist.barrier()
    return path
