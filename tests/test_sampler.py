"""The sampler checked against diffusers 0.42.1, used as the oracle (rectiflux itself never imports it)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline

from rectiflux.sampling.denoise import euler_step
from rectiflux.sampling.latents import latent_image_ids, noise_latents, pack_latents, text_ids, unpack_latents
from rectiflux.sampling.schedule import (
    SchedulerConfig,
    compute_mu,
    get_sigmas,
    static_shift,
    strength_start,
    time_shift,
    timesteps,
)

# The scheduler_config.json files published with FLUX.1-dev and FLUX.1-schnell, plus a static
# shift other than 1 so that the static branch is not the identity.
DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}
SCHNELL = {**DEV, "shift": 1.0, "use_dynamic_shifting": False}
STATIC3 = {**DEV, "shift": 3.0, "use_dynamic_shifting": False}
CONFIGS = {"dev": DEV, "schnell": SCHNELL, "static3": STATIC3}

STEPS = range(1, 51)
SEQ_LENS = [16, 256, 1024, 3000, 4096, 6144, 16384]
STRENGTHS = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.33, 0.35, 0.4, 0.45, 0.5, 0.55, 0.56, 0.6, 0.65, 0.68, 0.7, 0.75, 0.8,
             0.85, 0.9, 0.95, 0.99, 1.0]


def reference_scheduler(config: dict, num_steps: int, image_seq_len: int, sigmas=None):
    """A diffusers scheduler prepared the way FluxPipeline prepares it."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    set_reference_timesteps(scheduler, num_steps, image_seq_len, sigmas)
    return scheduler


def set_reference_timesteps(scheduler, num_steps: int, image_seq_len: int, sigmas=None) -> None:
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    c = scheduler.config
    mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)


@pytest.mark.parametrize("name", CONFIGS)
def test_sigmas_and_timesteps_match_diffusers(name):
    config = SchedulerConfig.from_diffusers(CONFIGS[name])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(CONFIGS[name])
    for n in STEPS:
        for seq_len in SEQ_LENS:
            set_reference_timesteps(scheduler, n, seq_len)
            ours = get_sigmas(n, seq_len, config)
            assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
            torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)
            torch.testing.assert_close(timesteps(ours), scheduler.timesteps, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", CONFIGS)
def test_custom_sigmas_are_shifted_like_diffusers(name):
    config = SchedulerConfig.from_diffusers(CONFIGS[name])
    custom = [1.0, 0.9, 0.75, 0.5, 0.3, 0.2, 0.05]
    for seq_len in (64, 4096, 9000):
        scheduler = reference_scheduler(CONFIGS[name], len(custom), seq_len, sigmas=custom)
        for given in (custom, torch.tensor(custom)):
            ours = get_sigmas(len(custom), seq_len, config, sigmas=given)
            torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigmas"):
        get_sigmas(5, 4096, config, sigmas=custom)
    with pytest.raises(ValueError):
        get_sigmas(0, 4096, config)


def test_mu_matches_calculate_shift_and_is_not_clamped():
    for seq_len in [1, 16, 256, 1024, 4096, 4097, 8192, 16384, 65536]:
        assert compute_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
        assert compute_mu(seq_len, 64, 1024, 0.3, 2.0) == pytest.approx(
            calculate_shift(seq_len, 64, 1024, 0.3, 2.0), abs=1e-12)
    assert compute_mu(4096) == pytest.approx(1.15)
    assert compute_mu(1024) == pytest.approx(0.63)
    assert compute_mu(16384) > compute_mu(8192) > 1.15


def test_shift_functions():
    sigmas = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    # with e^mu = s the exponential shift is the static one
    torch.testing.assert_close(time_shift(np.log(3.0), sigmas), static_shift(3.0, sigmas))
    torch.testing.assert_close(static_shift(1.0, sigmas), sigmas)
    torch.testing.assert_close(time_shift(0.0, sigmas), sigmas)
    assert (static_shift(3.0, sigmas) > sigmas - 1e-12).all()
    assert time_shift(1.15, torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", CONFIGS)
def test_schedule_properties(name):
    config = SchedulerConfig.from_diffusers(CONFIGS[name])
    for n in (1, 4, 28, 50):
        for seq_len in (256, 4096, 16384):
            sigmas = get_sigmas(n, seq_len, config)
            assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
            assert (sigmas[1:] < sigmas[:-1]).all()


def test_low_strength_starts_at_high_sigma():
    sigmas = get_sigmas(28, (1024 // 16) ** 2, SchedulerConfig())
    for strength, expected in [(0.3, 0.599), (0.6, 0.83), (0.8, 0.936)]:
        assert sigmas[strength_start(28, strength)].item() == pytest.approx(expected, abs=2e-3)


def test_strength_start_matches_img2img_pipeline():
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(DEV)
    stand_in = types.SimpleNamespace(scheduler=scheduler)
    config = SchedulerConfig.from_diffusers(DEV)
    checked = 0
    for n in STEPS:
        sigmas = get_sigmas(n, 4096, config)
        for strength in STRENGTHS:
            set_reference_timesteps(scheduler, n, 4096)
            kept, steps_left = FluxImg2ImgPipeline.get_timesteps(stand_in, n, strength, "cpu")
            if steps_left < 1:  # the pipeline refuses to run these
                with pytest.raises(ValueError):
                    strength_start(n, strength)
                continue
            start = strength_start(n, strength)
            assert start == n - steps_left == scheduler.begin_index, (n, strength)
            assert sigmas[start].item() == pytest.approx(scheduler.sigmas[start].item(), abs=1e-6)
            torch.testing.assert_close(timesteps(sigmas)[start:], kept, rtol=0, atol=1e-3)
            checked += 1
    assert checked > 900
    # 25 * 0.56 is 14.000000000000002 in floating point, so one more step than in exact arithmetic runs
    assert strength_start(25, 0.56) == 10 and strength_start(50, 0.56) == 21
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            strength_start(28, bad)


def test_noise_latents_matches_scale_noise():
    n, start = 28, 9
    scheduler = reference_scheduler(DEV, n, 4096)
    scheduler.set_begin_index(start)
    sigmas = get_sigmas(n, 4096, SchedulerConfig())
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 4096, 64, generator=gen), torch.randn(2, 4096, 64, generator=gen)
    expected = scheduler.scale_noise(x, scheduler.timesteps[start:start + 1].repeat(2), noise)
    torch.testing.assert_close(noise_latents(x, noise, sigmas[start]), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(noise_latents(x, noise, sigmas[start].item()), expected, rtol=0, atol=1e-6)
    assert noise_latents(x.bfloat16(), noise.bfloat16(), 0.5).dtype == torch.bfloat16


def test_euler_step_matches_scheduler_step():
    n = 28
    scheduler = reference_scheduler(DEV, n, 1024)
    sigmas = get_sigmas(n, 1024, SchedulerConfig())
    gen = torch.Generator().manual_seed(1)
    x_ref = x_ours = torch.randn(1, 1024, 64, generator=gen)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(1, 1024, 64, generator=gen)
        x_ref = scheduler.step(v, t, x_ref, return_dict=False)[0]
        x_ours = euler_step(x_ours, v, sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-5)
    # python floats for sigmas give the same step
    x, v = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    torch.testing.assert_close(euler_step(x, v, sigmas[3].item(), sigmas[4].item()),
                               euler_step(x, v, sigmas[3], sigmas[4]), rtol=0, atol=0)


def test_euler_step_works_in_float32_and_keeps_x_dtype():
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 256, 64, generator=gen), torch.randn(2, 256, 64, generator=gen)
    sigma, sigma_next = 0.8123, 0.7771
    v = v.bfloat16()
    exact = x.double() + (sigma_next - sigma) * v.double()
    mixed = euler_step(x, v, sigma, sigma_next)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.double(), exact, rtol=0, atol=1e-6)
    low = euler_step(x.bfloat16(), v, sigma, sigma_next)
    assert low.dtype == torch.bfloat16
    # only the final rounding to bf16 may cost precision: at most half a bf16 ulp (2^-8 relative)
    exact_low = x.bfloat16().double() + (sigma_next - sigma) * v.double()
    torch.testing.assert_close(low.double(), exact_low, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("batch,channels,height,width", [(2, 16, 6, 10), (1, 16, 128, 128), (2, 3, 8, 2)])
def test_packing_matches_flux_pipeline(batch, channels, height, width):
    z = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(3))
    tokens = pack_latents(z)
    assert tokens.shape == (batch, height // 2 * (width // 2), 4 * channels)
    assert torch.equal(tokens, FluxPipeline._pack_latents(z, batch, channels, height, width))
    # diffusers unpacks from pixel sizes with the VAE's factor of 8
    reference = FluxPipeline._unpack_latents(tokens, height * 8, width * 8, 8)
    assert torch.equal(unpack_latents(tokens, height, width), reference)
    assert torch.equal(unpack_latents(tokens, height, width), z)
    assert torch.equal(pack_latents(unpack_latents(tokens, height, width)), tokens)
    ids = latent_image_ids(height, width)
    expected = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
    assert ids.dtype == torch.float32 and torch.equal(ids, expected)
    assert latent_image_ids(height, width, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_packing_rejects_odd_grids_and_wrong_token_counts():
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 7, 8))
    with pytest.raises(ValueError, match="even"):
        unpack_latents(torch.zeros(1, 12, 64), 6, 7)
    with pytest.raises(ValueError, match="even"):
        latent_image_ids(8, 5)
    with pytest.raises(ValueError, match="fit"):
        unpack_latents(torch.zeros(1, 12, 64), 8, 8)


def test_text_ids():
    ids = text_ids(512)
    assert ids.shape == (512, 3) and ids.dtype == torch.float32 and not ids.any()


def test_config_round_trips_through_diffusers(tmp_path):
    for config in (SchedulerConfig(), SchedulerConfig(shift=1.0, use_dynamic_shifting=False, max_shift=1.3)):
        exported = config.to_diffusers()
        assert exported["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        (tmp_path / "scheduler_config.json").write_text(json.dumps(exported))
        for scheduler in (FlowMatchEulerDiscreteScheduler.from_config(exported),
                          FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)):
            for key, value in exported.items():
                if not key.startswith("_"):
                    assert scheduler.config[key] == value, key
            # the scheduler's full config, with every setting it knows, reads back to the same thing
            assert SchedulerConfig.from_diffusers(dict(scheduler.config)) == config
        assert SchedulerConfig.from_diffusers(exported) == config


def test_from_diffusers_reads_real_configs_and_missing_keys_like_diffusers():
    assert SchedulerConfig.from_diffusers({**DEV, "_diffusers_version": "0.30.0", "unknown": 1}) == SchedulerConfig()
    schnell = SchedulerConfig.from_diffusers(SCHNELL)
    assert schnell.shift == 1.0 and not schnell.use_dynamic_shifting
    assert isinstance(SchedulerConfig.from_diffusers({**DEV, "shift": 3}).shift, float)
    for partial in ({}, {"use_dynamic_shifting": True}, {"shift": 2.0, "max_shift": 1.5}):
        config = SchedulerConfig.from_diffusers(partial)
        scheduler = reference_scheduler(partial, 20, 6000)
        torch.testing.assert_close(get_sigmas(20, 6000, config), scheduler.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("setting", [{"use_karras_sigmas": True}, {"shift_terminal": 0.1},
                                     {"time_shift_type": "linear"}, {"stochastic_sampling": True}])
def test_from_diffusers_refuses_settings_it_cannot_honour(setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        SchedulerConfig.from_diffusers({**DEV, **setting})
