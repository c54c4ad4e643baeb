"""The autoencoder against diffusers' AutoencoderKL (the oracle), on tiny random configs."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file

from rectiflux.flux.autoencoder import AutoEncoder, AutoEncoderConfig, DiagonalGaussian
from rectiflux.weights.autoencoder import load_autoencoder, save_autoencoder
from rectiflux.weights.checkpoint import CheckpointError
from rectiflux.weights.layout import autoencoder_config_from_shapes
from rectiflux.weights.layout import autoencoder_from_diffusers as from_diffusers
from rectiflux.weights.layout import autoencoder_to_diffusers as to_diffusers

torch.set_num_threads(1)

CASES = {
    "two-levels": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                       scaling_factor=0.3611, shift_factor=0.1159, size=(24, 40)),
    "three-levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
                         in_channels=4, out_channels=2, scaling_factor=0.7, shift_factor=-0.25, size=(20, 36)),
}


def make_vae(seed: int, **kw) -> AutoencoderKL:
    torch.manual_seed(seed)
    n = len(kw["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        use_quant_conv=False, use_post_quant_conv=False, **kw)
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim == 1:  # GroupNorm affine (1 and 0 by default) and biases: make them matter
                p.add_(0.3 * torch.randn_like(p))
    return vae.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def images(vae: AutoencoderKL, size: tuple[int, int]) -> torch.Tensor:
    return torch.rand(2, vae.config.in_channels, *size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def latents(vae: AutoencoderKL, size: tuple[int, int]) -> torch.Tensor:
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (2, vae.config.latent_channels, size[0] // f, size[1] // f)
    return torch.randn(shape, generator=torch.Generator().manual_seed(4))


def assert_same_outputs(ours: AutoEncoder, vae: AutoencoderKL, size: tuple[int, int], tol: float = 1e-5) -> None:
    x, z = images(vae, size), latents(vae, size)
    with torch.no_grad():
        theirs, mine = vae.encode(x).latent_dist, ours.encode(x)
        assert mine.mean.shape == theirs.mean.shape == z.shape
        assert rel(mine.mean, theirs.mean) < tol and rel(mine.mode(), theirs.mode()) < tol
        assert rel(mine.logvar, theirs.logvar) < tol
        for seeds in ([7], [8, 9], 5):  # a list of generators (one per image, or one for all) or a generator
            gens = [[torch.Generator().manual_seed(s) for s in seeds] if isinstance(seeds, list)
                    else torch.Generator().manual_seed(seeds) for _ in range(2)]
            assert rel(mine.sample(gens[0]), theirs.sample(gens[1])) < tol
        assert rel(ours.decode(z), vae.decode(z).sample) < tol


@pytest.mark.parametrize("name", CASES)
def test_matches_diffusers(name, tmp_path):
    kw = dict(CASES[name])
    size = kw.pop("size")
    vae = make_vae(0, **kw)
    vae.save_pretrained(tmp_path / "vae")
    ours = load_autoencoder(tmp_path)  # a pipeline folder: its vae/ is found
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "in_channels",
                "out_channels", "scaling_factor", "shift_factor"):
        assert getattr(ours.config, key) == pytest.approx(getattr(vae.config, key)), key
    assert_same_outputs(ours, vae, size)
    z = latents(vae, size)
    # the pipelines' own formulas with the config's values
    assert torch.equal(ours.scale_latents(z), (z - vae.config.shift_factor) * vae.config.scaling_factor)
    assert torch.equal(ours.unscale_latents(z), z / vae.config.scaling_factor + vae.config.shift_factor)


def test_posterior_draws_like_diffusers():
    moments = torch.randn(3, 8, 5, 7, generator=torch.Generator().manual_seed(0)) * 30
    assert (moments[:, 4:] > 20).any() and (moments[:, 4:] < -30).any()  # the logvar clamp is exercised
    for dtype in (torch.float32, torch.bfloat16):
        mine, theirs = DiagonalGaussian(moments.to(dtype)), DiagonalGaussianDistribution(moments.to(dtype))
        assert torch.equal(mine.mean, theirs.mean) and torch.equal(mine.logvar, theirs.logvar)
        for seeds in ([1], [2, 3, 4]):
            a = mine.sample([torch.Generator().manual_seed(s) for s in seeds])
            b = theirs.sample([torch.Generator().manual_seed(s) for s in seeds])
            assert a.dtype == dtype and torch.equal(a, b)
        a, b = (d.sample(torch.Generator().manual_seed(6)) for d in (mine, theirs))
        assert torch.equal(a, b)


def bfl_from_diffusers(sd: dict, levels: int, layers: int) -> dict:
    """The BFL ae.safetensors layout, written out by hand (checked against diffusers' converter below)."""
    out = {}

    def put(bfl: str, diffusers: str) -> None:
        for s in ("weight", "bias"):
            t = sd[f"{diffusers}.{s}"]
            out[f"{bfl}.{s}"] = t[:, :, None, None] if t.ndim == 2 else t  # BFL's attention uses 1x1 convs

    def resnet(bfl: str, diffusers: str) -> None:
        for p in ("norm1", "conv1", "norm2", "conv2"):
            put(f"{bfl}.{p}", f"{diffusers}.{p}")
        if f"{diffusers}.conv_shortcut.weight" in sd:
            put(f"{bfl}.nin_shortcut", f"{diffusers}.conv_shortcut")

    for part in ("encoder", "decoder"):
        put(f"{part}.conv_in", f"{part}.conv_in")
        put(f"{part}.norm_out", f"{part}.conv_norm_out")
        put(f"{part}.conv_out", f"{part}.conv_out")
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        attn = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
        for bfl, diffusers in attn:
            put(f"{part}.mid.attn_1.{bfl}", f"{part}.mid_block.attentions.0.{diffusers}")
    for i in range(levels):
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            put(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        d = levels - 1 - i  # BFL numbers decoder levels by resolution, diffusers in execution order
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}")
        if i > 0:
            put(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{d}.upsamplers.0.conv")
    assert len(out) == len(sd)
    return out


def test_bfl_layout_and_round_trip(tmp_path):
    # BFL's code fixes 32 groups, so that is what a BFL file implies
    vae = make_vae(1, block_out_channels=(32, 64), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                   scaling_factor=0.3611, shift_factor=0.1159)
    sd = vae.state_dict()
    bfl = bfl_from_diffusers(sd, 2, 2)
    back = convert_ldm_vae_checkpoint(bfl, dict(vae.config))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)

    save_file(bfl, tmp_path / "ae.safetensors")
    ours = load_autoencoder(tmp_path / "ae.safetensors")
    assert ours.config == AutoEncoderConfig(block_out_channels=(32, 64), layers_per_block=2)
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (0.3611, 0.1159)  # FLUX's, from the facts
    assert_same_outputs(ours, vae, (16, 24))

    save_file({f"first_stage_model.{k}": v for k, v in bfl.items()}, tmp_path / "bundle.safetensors")
    bundled = load_autoencoder(tmp_path / "bundle.safetensors").state_dict()
    assert all(torch.equal(bundled[k], v) for k, v in ours.state_dict().items())

    save_autoencoder(ours, tmp_path / "saved")
    again = AutoencoderKL.from_pretrained(tmp_path / "saved").eval()
    assert again.state_dict().keys() == sd.keys() and all(torch.equal(again.state_dict()[k], sd[k]) for k in sd)
    for key in ("scaling_factor", "shift_factor", "block_out_channels", "layers_per_block", "norm_num_groups"):
        a, b = getattr(again.config, key), getattr(vae.config, key)
        assert (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b), key  # JSON lists
    assert again.config.force_upcast and not again.config.use_quant_conv and again.quant_conv is None
    assert_same_outputs(ours, again, (16, 24))


def test_refuses_mismatched_checkpoints(tmp_path):
    vae = make_vae(2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(tmp_path)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(file)
    del sd["decoder.up_blocks.0.resnets.1.conv2.weight"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["encoder.mid_block.attentions.0.to_q.weight"] = torch.zeros(32, 31)
    save_file(sd, file)
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(tmp_path)
    for name in ("decoder.up_blocks.0.resnets.1.conv2.weight", "encoder.extra.weight",
                 "encoder.mid_block.attentions.0.to_q.weight"):
        assert name in str(e.value)

    bfl = bfl_from_diffusers(vae.state_dict(), 2, 1)
    del bfl["decoder.up.1.block.1.conv2.weight"]
    bfl["decoder.extra.bias"] = torch.zeros(3)
    bfl["encoder.down.0.block.0.conv1.weight"] = torch.zeros(16, 3, 3, 1)
    save_file(bfl, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError) as e:
        cfg = AutoEncoderConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)
        load_autoencoder(tmp_path / "ae.safetensors", config=cfg)
    for name in ("decoder.up.1.block.1.conv2.weight", "decoder.extra.bias", "encoder.down.0.block.0.conv1.weight"):
        assert name in str(e.value)

    with pytest.raises(ValueError, match="use_quant_conv"):
        AutoEncoderConfig.from_diffusers(dict(vae.config, use_quant_conv=True))
    folder = tmp_path / "quant-conv"
    vae.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_quant_conv": True}))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported autoencoder config: use_quant_conv"):
        load_autoencoder(folder)  # the loader names the file


def test_bfloat16_load(tmp_path):
    kw = dict(CASES["two-levels"])
    size = kw.pop("size")
    vae = make_vae(3, **kw)
    vae.save_pretrained(tmp_path)
    ours = load_autoencoder(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    z = latents(vae, size)
    with torch.no_grad():
        out = ours.decode(z.bfloat16())
        assert out.dtype == torch.bfloat16 and rel(out, vae.decode(z).sample) < 0.05


def test_flux_size_layout_matches_diffusers():
    cfg = AutoEncoderConfig()
    with torch.device("meta"):
        ours = AutoEncoder(cfg)
        theirs = AutoencoderKL.from_config(cfg.to_diffusers())
    converted = {k: tuple(v.shape) for k, v in to_diffusers(ours.state_dict(), cfg).items()}
    assert converted == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    flux = (theirs.config.scaling_factor, theirs.config.shift_factor, theirs.config.latent_channels)
    assert flux == (0.3611, 0.1159, 16)  # the values in flux-facts
    assert autoencoder_config_from_shapes({k: tuple(v.shape) for k, v in ours.state_dict().items()}) == cfg


def test_inference_layout_and_in_place_ops_change_nothing():
    """encode/decode convolve channels-last activations and work in place without gradients; the weights keep
    their layout (a state dict safetensors can save) and the results are those of the plain graph."""
    kw = dict(CASES["two-levels"])
    size = kw.pop("size")
    vae = make_vae(1, **kw)
    ours = AutoEncoder(AutoEncoderConfig(**{k: v for k, v in vae.config.items() if k in kw}))
    ours.load_state_dict(from_diffusers(vae.state_dict(), ours.config))
    x, z = images(vae, size), latents(vae, size)
    with torch.no_grad():
        fast_pixels, fast_mean = ours.decode(z), ours.encode(x).mean
    plain_pixels, plain_mean = ours.decoder(z), ours.encoder(x).chunk(2, dim=1)[0]  # with autograd: no fast path
    assert plain_pixels.requires_grad
    assert fast_pixels.is_contiguous()
    assert rel(fast_pixels, plain_pixels) < 1e-5 and rel(fast_mean, plain_mean) < 1e-5
    assert all(t.is_contiguous() for t in ours.state_dict().values())
