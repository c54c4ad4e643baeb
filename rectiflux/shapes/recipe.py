"""The embedded shapes model's exact recipe: its configs, frozen random text encoders with the world's vocabulary,
the two training stages (autoencoder, then transformer with guidance distillation) and the export to a diffusers
folder (`rectiflux train --preset shapes`)."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..flux.autoencoder import AutoEncoder, AutoEncoderConfig
from ..flux.config import FluxConfig
from ..flux.text_encoders import TextEncoders
from ..flux.transformer import Flux
from ..sampling.schedule import SchedulerConfig
from ..training.trainer import TrainConfig, Trainer, init_distributed
from ..weights.autoencoder import load_autoencoder, save_autoencoder
from ..weights.checkpoint import read_json, read_state_dict, save_state_dict, write_json
from ..weights.text_encoders import load_text_encoders
from ..weights.transformer import load_transformer, save_transformer
from .world import SIZE, vocabulary

SHAPES_AE = AutoEncoderConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8)
SHAPES_FLUX = FluxConfig(in_channels=64, num_heads=2, head_dim=64, depth=2, depth_single=4,
                         joint_attention_dim=64, pooled_projection_dim=64, axes_dim=(8, 28, 28), guidance_embed=True)
SHAPES_TEXT = {"hidden": 64, "layers": 2, "heads": 2}
SHAPES_DEFAULTS = {"steps": 8, "guidance": 5.0, "width": 64, "height": 64, "max_sequence_length": 20,
                   "strength": 0.7}
# what the model knows, stored with it so that the pipeline can warn outside it
SHAPES_FACTS = {"known_sizes": [[SIZE, SIZE]], "known_words": vocabulary()}
SHAPES_SCHEDULER = SchedulerConfig(shift=1.0, use_dynamic_shifting=False)
SHAPES_STAGES = {
    "ae": TrainConfig(stage="ae", steps=5000, batch_size=8, lr=1e-3, warmup=100, ema_decay=0.995,
                      kl_weight=1e-6, foreground_weight=10.0, preview_weight=1.0, checkpoint_every=500,
                      log_every=50),
    "flux": TrainConfig(stage="flux", steps=10000, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.998,
                        distill_steps=1500, guidance_max=7.0, foreground_weight=4.0, checkpoint_every=250,
                        sample_every=1000),
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
    return load_text_encoders(folder, dtype=torch.float32)


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
        for sub in ("text_encoder", "text_encoder_2"):
            for file in (out / sub).glob("*.safetensors"):
                state = {k: v.half() for k, v in read_state_dict(file, mmap=False).items()}
                save_state_dict(state, file, {"format": "pt"})
            cfg = read_json(out / sub / "config.json")
            write_json({**cfg, "dtype": "float16", "torch_dtype": "float16"}, out / sub / "config.json")
    write_json({**SHAPES_SCHEDULER.to_diffusers()}, out / "scheduler" / "scheduler_config.json")
    write_json({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, out / "model_index.json")
    write_json({**SHAPES_DEFAULTS, **SHAPES_FACTS}, out / "rectiflux.json")
    return out


def train_shapes(out: str | os.PathLike, ae_overrides: dict | None = None, flux_overrides: dict | None = None,
                 resume: bool = False, stages: tuple[str, ...] = ("ae", "flux"),
                 export_to: str | os.PathLike | None = None) -> Path:
    """The whole recipe of the embedded model: autoencoder, then transformer (with guidance distillation), then
    export. The overrides change TrainConfig fields of each stage (e.g. fewer steps for a smoke run)."""
    out = Path(out)
    text_dir = out / "text"
    rank, _ = init_distributed()
    if rank == 0 and not (text_dir / "text_encoder_2").exists():  # one process writes, the others wait and read
        build_text_encoders(text_dir)
    _barrier()
    encoders = load_text_encoders(text_dir, dtype=torch.float32)
    ae_dir = out / "ae"
    if "ae" in stages:
        cfg = TrainConfig.from_dict({**asdict(SHAPES_STAGES["ae"]), **(ae_overrides or {}), "stage": "ae",
                                     "out": str(ae_dir)})
        trainer = Trainer(cfg, AutoEncoder(SHAPES_AE))
        if resume and trainer.checkpoint_path().exists():
            trainer.load_checkpoint()
        trainer.fit()
        ema = trainer.whole_ema()  # a sharded run gathers it (every process takes part) for rank 0
        if trainer.rank == 0:
            save_autoencoder(ema, ae_dir / "final")
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
        ema = trainer.whole_ema()
        if trainer.rank == 0:
            save_transformer(ema, flux_dir / "final")
        _barrier()
    if not (flux_dir / "final").exists():  # only the autoencoder so far
        return ae_dir / "final"
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

    from ..pipelines.flux import Defaults, FluxPipeline

    pipe = FluxPipeline(trainer.ema, trainer.autoencoder, trainer.text_encoders, SHAPES_SCHEDULER,
                        Defaults(**SHAPES_DEFAULTS))
    images = pipe(SAMPLE_PROMPTS, generator=torch.Generator().manual_seed(0)).images
    grid = Image.new("RGB", (64 * len(images), 64))
    for i, image in enumerate(images):
        grid.paste(image, (64 * i, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
