"""The trainer: objectives, a smoke run that learns, resume == uninterrupted, and two processes in sync."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from safetensors.torch import load_file

from rectiflux.flux.autoencoder import AutoEncoder, AutoEncoderConfig
from rectiflux.flux.config import FluxConfig
from rectiflux.flux.transformer import Flux
from rectiflux.shapes.world import POSITIONS, SIZES, Scene, all_scenes, render
from rectiflux.training.trainer import (
    LatentBank,
    TrainConfig,
    Trainer,
    flow_pair,
    foreground_tokens,
    guided_target,
    kl_divergence,
    sample_t,
    shapes_batch,
)

TINY_AE = AutoEncoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
TINY_FLUX = FluxConfig(in_channels=64, num_heads=2, head_dim=16, depth=1, depth_single=1, joint_attention_dim=16,
                       pooled_projection_dim=16, axes_dim=(4, 6, 6), guidance_embed=True)


def test_flow_pair_is_the_straight_path():
    x0, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    x_t, v = flow_pair(x0, noise, t)
    assert torch.allclose(x_t[0], x0[0]) and torch.allclose(x_t[2], noise[2])
    assert torch.allclose(x_t[1], (x0[1] + noise[1]) / 2)
    # moving along v from any t lands on the noise at t = 1
    assert torch.allclose(x_t + (1 - t).view(-1, 1, 1) * v, noise, atol=1e-6)


def test_guided_target_and_kl():
    c, u = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    g = torch.tensor([1.0, 3.0])
    out = guided_target(c, u, g)
    assert torch.allclose(out[0], c[0]) and torch.allclose(out[1], u[1] + 3 * (c[1] - u[1]))
    assert kl_divergence(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)).item() == 0
    assert kl_divergence(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)).item() == 8.0


def test_logit_normal_t_is_seeded_and_inside_0_1():
    a = sample_t(1000, torch.Generator().manual_seed(0))
    b = sample_t(1000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and 0 < a.min() and a.max() < 1
    assert abs(a.median().item() - 0.5) < 0.05


def test_shapes_data_is_a_function_of_the_index():
    a, scenes_a, caps_a = shapes_batch(3, 10, 4)
    b, scenes_b, caps_b = shapes_batch(3, 12, 2)
    assert torch.equal(a[2:], b) and caps_a[2:] == caps_b and scenes_a[2:] == scenes_b
    assert a.shape == (4, 3, 64, 64) and -1 <= a.min() and a.max() <= 1


def ae_trainer(tmp_path, steps, **kw):
    cfg = TrainConfig(out=str(tmp_path), stage="ae", steps=steps, batch_size=4, lr=3e-3, warmup=2, log_every=1,
                      checkpoint_every=0, **kw)
    torch.manual_seed(0)
    return Trainer(cfg, AutoEncoder(TINY_AE))


def test_autoencoder_smoke_run_learns(tmp_path):
    trainer = ae_trainer(tmp_path, 40)
    trainer.cfg.lr, trainer.cfg.batch_size = 1e-2, 8
    pixels, _, _ = shapes_batch(99, 0, 16)  # images the run never sees

    def error() -> float:
        with torch.no_grad():
            return (trainer.model.decode(trainer.model.encode(pixels).mean) - pixels).pow(2).mean().item()

    before = error()
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and rows[-1]["step"] == 40 and "psnr" in rows[-1]
    assert error() < 0.5 * before
    assert (tmp_path / "checkpoint.safetensors").exists()


class _StubText:
    """Text encoders stand-in: a fixed random embedding per caption (the trainer caches them anyway)."""

    def encode(self, captions, max_sequence_length=8):
        out = [torch.Generator().manual_seed(abs(hash(c)) % 2**31) for c in captions]
        embeds = torch.stack([torch.randn(max_sequence_length, 16, generator=g) for g in out])
        return embeds, embeds.mean(1)


def flux_trainer(tmp_path, steps, distill_steps=0):
    torch.manual_seed(0)
    ae = AutoEncoder(TINY_AE).eval().requires_grad_(False)
    cfg = TrainConfig(out=str(tmp_path), stage="flux", steps=steps, batch_size=8, lr=2e-3, warmup=2, log_every=1,
                      checkpoint_every=0, bank_size=64, max_sequence_length=8, distill_steps=distill_steps)
    return Trainer(cfg, Flux(TINY_FLUX), ae, _StubText())


def test_flux_smoke_run_learns_and_distils(tmp_path):
    trainer = flux_trainer(tmp_path, 40, distill_steps=5)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-10:-5]) / 5
    assert last < 0.8 * first
    assert trainer.teacher is not None  # the last 5 steps distilled guidance from a frozen teacher


def test_latent_bank_matches_the_autoencoder():
    torch.manual_seed(0)
    ae = AutoEncoder(TINY_AE).eval()
    bank = LatentBank(ae, seed=1, size=6, chunk=4)
    pixels, scenes, _ = shapes_batch(2, 0, 6)
    assert bank.scenes == scenes
    with torch.no_grad():
        assert torch.allclose(bank.mean, ae.encode(pixels).mean, atol=1e-6)


def test_shape_tokens_are_the_patches_under_the_shape():
    # a 64x64 image is 4x4 tokens of 16x16 pixels; the tokens marked are those the shape's box overlaps (a
    # circle's or cross's box corners are background, so a box corner may leave a token unmarked)
    for scene in all_scenes()[::7]:
        pixels = torch.from_numpy(np.asarray(render(scene), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        marked = set(foreground_tokens(pixels, 4)[0].nonzero()[:, 0].tolist())
        (cx, cy), half = POSITIONS[scene.position], SIZES[scene.size] / 2
        boxed = {row * 4 + col for row in range(4) for col in range(4)
                 if col * 16 < cx + half and cx - half < col * 16 + 16
                 and row * 16 < cy + half and cy - half < row * 16 + 16}
        centre = int(cy // 16) * 4 + int(cx // 16)
        assert centre in marked and marked <= boxed, (scene, marked, boxed)
    small_left = torch.from_numpy(np.asarray(render(Scene("gray", "red", "square", "small", "left")),
                                             dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    assert foreground_tokens(small_left, 4)[0].nonzero()[:, 0].tolist() == [4, 5, 8, 9]  # x 12..28, y 24..40


def test_flux_loss_weights_the_shape_tokens(tmp_path):
    trainer = flux_trainer(tmp_path, 1)
    mean, std, captions, shape_tokens = trainer.bank.batch(0, 0, 4)
    assert shape_tokens.shape == (4, 16) and shape_tokens.any(1).all() and not shape_tokens.all(1).any()
    state = trainer.generator.get_state()
    plain, _ = trainer.flux_loss(mean, std, captions, shape_tokens)
    trainer.cfg.foreground_weight = 9.0
    trainer.generator.set_state(state)
    weighted, _ = trainer.flux_loss(mean, std, captions, shape_tokens)
    assert not torch.isclose(plain, weighted)
    # the weighted loss is the mean of per-token errors with weight 10 on the shape's tokens, 1 elsewhere: it
    # lies between the plain mean and the shape tokens' own mean
    trainer.cfg.foreground_weight = 1e6
    trainer.generator.set_state(state)
    shape_mean, _ = trainer.flux_loss(mean, std, captions, shape_tokens)
    assert min(plain, shape_mean) < weighted < max(plain, shape_mean)


def test_resume_equals_uninterrupted(tmp_path):
    full = flux_trainer(tmp_path / "full", 6, distill_steps=2)
    full.fit()
    first = flux_trainer(tmp_path / "resumed", 6, distill_steps=2)
    first.fit(until=3)  # killed after step 3, with the checkpoint it had written
    resumed = flux_trainer(tmp_path / "resumed", 6, distill_steps=2)
    resumed.load_checkpoint()
    assert resumed.step == 3
    resumed.fit()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_two_processes_keep_the_same_weights(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch
        from safetensors.torch import save_file
        from rectiflux.flux.autoencoder import AutoEncoder, AutoEncoderConfig
        from rectiflux.training.trainer import TrainConfig, Trainer
        torch.manual_seed(0)
        ae = AutoEncoder(AutoEncoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4))
        cfg = TrainConfig(out=r"{tmp_path}", stage="ae", steps=4, batch_size=4, warmup=1, log_every=1,
                          checkpoint_every=0)
        trainer = Trainer(cfg, ae)
        trainer.fit()
        save_file(trainer.model.state_dict(), r"{tmp_path}/rank" + os.environ["RANK"] + ".safetensors")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                             str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    torch.manual_seed(0)
    start = AutoEncoder(TINY_AE).state_dict()
    moved = 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        moved += not torch.equal(rank0[key], start[key])
    assert moved > 0  # they trained, and stayed identical


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Flux(TINY_FLUX).train()
    g = torch.Generator().manual_seed(1)
    inputs = dict(img=torch.randn(2, 4, 64, generator=g), img_ids=torch.zeros(4, 3),
                  txt=torch.randn(2, 3, 16, generator=g), txt_ids=torch.zeros(3, 3),
                  timesteps=torch.rand(2, generator=g), y=torch.randn(2, 16, generator=g),
                  guidance=torch.ones(2))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(**inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_step_runs(tmp_path):
    trainer = flux_trainer(tmp_path, 2)
    trainer.cfg.bf16 = True
    stats = trainer.train_step()
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_train_command_runs_under_torchrun_and_exports_a_loadable_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "rectiflux", "train", "--preset", "shapes", "--out", str(tmp_path / "run"), "--ae-steps", "2",
               "--flux-steps", "3", "--distill-steps", "1", "--batch-size", "4", "--bank-size", "8",
               "--checkpoint-every", "2", "--sample-every", "0"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "flux" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3
    from rectiflux.pipelines.load import load

    pipe = load(tmp_path / "run" / "model")
    assert pipe.defaults.width == 64 and pipe("a red circle", seed=0, num_inference_steps=2).images[0].size == (64, 64)
