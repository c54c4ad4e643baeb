"""The transformer against diffusers' FluxTransformer2DModel on the same random weights (diffusers: the oracle)."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from rectiflux.flux import layers
from rectiflux.flux.config import FluxConfig
from rectiflux.flux.layers import apply_rope, rope, timestep_embedding
from rectiflux.flux.transformer import Flux
from rectiflux.weights.checkpoint import CheckpointError
from rectiflux.weights.transformer import load_transformer, save_transformer

CONFIGS = {
    "dev-like": dict(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=3,
                     joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "schnell-like": dict(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
                         joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=False,
                         axes_dims_rope=(2, 2, 4)),
    "odd-channels": dict(in_channels=12, out_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=12,
                         num_attention_heads=2, joint_attention_dim=10, pooled_projection_dim=6, guidance_embeds=True,
                         axes_dims_rope=(4, 4, 4)),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_diffusers(config: dict, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{"in_channels": 16, **config}).eval()
    with torch.no_grad():  # default inits zero some biases and set norms to one: randomise everything
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 and p.numel() < 64 else 0))
    return model


def make_inputs(model: FluxTransformer2DModel, batch=2, grid=(3, 5), txt_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    h, w = grid
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        img=torch.randn(batch, h * w, cfg.in_channels, generator=g),
        img_ids=img_ids.reshape(-1, 3),
        txt=torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=g),
        txt_ids=torch.zeros(txt_len, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        guidance=torch.tensor([3.5, 1.0])[:batch] if cfg.guidance_embeds else None,
    )


def diffusers_forward(model, inputs):
    with torch.no_grad():
        return model(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
                     timestep=inputs["timesteps"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
                     guidance=inputs["guidance"], return_dict=False)[0]


def ours_forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_from_diffusers_folder(tmp_path, name):
    ref = random_diffusers(CONFIGS[name])
    ref.save_pretrained(tmp_path)
    ours = load_transformer(tmp_path)
    for batch, grid, txt_len in [(2, (3, 5), 7), (1, (4, 4), 5)]:
        inputs = make_inputs(ref, batch, grid, txt_len)
        expected = diffusers_forward(ref, inputs)
        assert rel_err(ours_forward(ours, inputs), expected) < 1e-5


def test_batched_ids_equal_shared_ids(tmp_path):
    ref = random_diffusers(CONFIGS["dev-like"])
    ref.save_pretrained(tmp_path)
    ours = load_transformer(tmp_path)
    inputs = make_inputs(ref)
    shared = ours_forward(ours, inputs)
    inputs["img_ids"] = inputs["img_ids"].expand(2, -1, -1)
    inputs["txt_ids"] = inputs["txt_ids"].expand(2, -1, -1)
    assert torch.allclose(ours_forward(ours, inputs), shared, atol=1e-6)


# A BFL-layout writer independent of the package's own key map, checked against diffusers' converter.
def bfl_from_diffusers(sd: dict, num_layers: int, num_single: int) -> dict:
    def qkv(prefix, names, suffix):
        return torch.cat([sd[f"{prefix}{n}.{suffix}"] for n in names])

    out = {}
    for a, b in [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
                 ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                 ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                 ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                 ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                 ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                 ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]:
        for s in ("weight", "bias"):
            if f"{b}.{s}" in sd:
                out[f"{a}.{s}"] = sd[f"{b}.{s}"]
    for s in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{s}"] = qkv(d + "attn.", ["to_q", "to_k", "to_v"], s)
            out[f"{b}txt_attn.qkv.{s}"] = qkv(d + "attn.", ["add_q_proj", "add_k_proj", "add_v_proj"], s)
            for ours, theirs in [("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                                 ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                                 ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                                 ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")]:
                out[f"{b}{ours}.{s}"] = sd[f"{d}{theirs}.{s}"]
        for ours, theirs in [("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                             ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")]:
            out[f"{b}{ours}.scale"] = sd[f"{d}attn.{theirs}.weight"]
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{b}linear1.{s}"] = torch.cat([sd[f"{d}attn.to_{c}.{s}"] for c in "qkv"] + [sd[f"{d}proj_mlp.{s}"]])
            out[f"{b}linear2.{s}"] = sd[f"{d}proj_out.{s}"]
            out[f"{b}modulation.lin.{s}"] = sd[f"{d}norm.linear.{s}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return out


def test_bfl_writer_agrees_with_diffusers_converter():
    # diffusers' converter hard-codes hidden 3072: give every tensor the real row count but a single column
    # (biases stay 1-D), so the test exercises the full-size key map without gigabytes of weights.
    cfg = FluxConfig(depth=2, depth_single=2, guidance_embed=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ours_like = {k: torch.randn(s[0], 1, generator=g) if len(s) > 1 else torch.randn(s[0], generator=g)
                 for k, s in shapes.items()}
    from rectiflux.weights.layout import transformer_to_diffusers as to_diffusers
    diffusers_sd = to_diffusers(ours_like, cfg)
    bfl = bfl_from_diffusers(diffusers_sd, 2, 2)
    assert bfl.keys() == ours_like.keys()
    back = convert_flux_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert back.keys() == diffusers_sd.keys()
    for k in back:
        assert torch.equal(back[k], diffusers_sd[k]), k


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_matches_diffusers_from_bfl_file(tmp_path, prefix):
    config = dict(CONFIGS["dev-like"], attention_head_dim=16)
    ref = random_diffusers(config)
    bfl = bfl_from_diffusers(ref.state_dict(), config["num_layers"], config["num_single_layers"])
    file = tmp_path / "flux.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()}, file)
    ours = load_transformer(file, axes_dim=config["axes_dims_rope"])
    assert ours.config.depth == 2 and ours.config.depth_single == 3 and ours.config.guidance_embed
    inputs = make_inputs(ref)
    assert rel_err(ours_forward(ours, inputs), diffusers_forward(ref, inputs)) < 1e-5


def test_bfl_file_of_head_dim_128_needs_no_axes(tmp_path):
    config = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
                  joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
    ref = random_diffusers(config)
    file = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_from_diffusers(ref.state_dict(), 1, 1).items()}, file)
    ours = load_transformer(file)
    assert ours.config.axes_dim == (16, 56, 56) and not ours.config.guidance_embed
    inputs = make_inputs(ref, grid=(6, 4))
    assert rel_err(ours_forward(ours, inputs), diffusers_forward(ref, inputs)) < 1e-5


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_save_round_trip(tmp_path, layout):
    ref = random_diffusers(CONFIGS["schnell-like"])
    ref.save_pretrained(tmp_path / "src")
    ours = load_transformer(tmp_path / "src")
    target = tmp_path / ("out" if layout == "diffusers" else "out.safetensors")
    save_transformer(ours, target, layout=layout)
    again = load_transformer(target)
    assert again.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    if layout == "diffusers":  # diffusers reads what we write, and computes the same thing
        theirs = FluxTransformer2DModel.from_pretrained(target).eval()
        inputs = make_inputs(ref)
        assert rel_err(diffusers_forward(theirs, inputs), diffusers_forward(ref, inputs)) == 0


def test_sharded_diffusers_folder(tmp_path):
    ref = random_diffusers(CONFIGS["dev-like"])
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_transformer(tmp_path)
    inputs = make_inputs(ref)
    assert rel_err(ours_forward(ours, inputs), diffusers_forward(ref, inputs)) < 1e-5


def test_pipeline_root_folder_finds_transformer(tmp_path):
    ref = random_diffusers(CONFIGS["schnell-like"])
    ref.save_pretrained(tmp_path / "transformer")
    assert load_transformer(tmp_path).config.depth == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_and_run(tmp_path, dtype):
    ref = random_diffusers(CONFIGS["dev-like"])
    ref.save_pretrained(tmp_path)
    ours = load_transformer(tmp_path, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    inputs = {k: v.to(dtype) if k in ("img", "txt", "y") else v for k, v in make_inputs(ref).items()}
    out = ours_forward(ours, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # random weights make this net chaotic (bf16 diffusers is 70% off its own fp32 output): compare like with like
    theirs = diffusers_forward(FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=dtype).eval(), inputs)
    assert rel_err(out.float(), theirs.float()) < 0.02


def test_bad_checkpoints_are_refused_with_names(tmp_path):
    ref = random_diffusers(CONFIGS["schnell-like"])
    sd = {k: v.contiguous() for k, v in bfl_from_diffusers(ref.state_dict(), 1, 2).items()}
    del sd["double_blocks.0.img_mlp.2.bias"]
    sd["double_blocks.0.surprise.weight"] = torch.zeros(2)
    sd["single_blocks.1.linear2.bias"] = torch.zeros(5)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path / "bad.safetensors", axes_dim=(2, 2, 4))
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("double_blocks.0.img_mlp.2.bias", "double_blocks.0.surprise.weight", "single_blocks.1.linear2.bias"):
        assert name in msg
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_transformer(tmp_path / "corrupt.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(\.safetensors or \.sft; pickled"):
        load_transformer(tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_transformer(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="RoPE axes"):  # head_dim 8 leaves the axes unknown
        load_transformer(tmp_path / "bad.safetensors")


def test_guidance_required_for_dev_like(tmp_path):
    ref = random_diffusers(CONFIGS["dev-like"])
    ref.save_pretrained(tmp_path)
    ours = load_transformer(tmp_path)
    inputs = make_inputs(ref)
    inputs["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        ours(**inputs)


def test_timestep_embedding_and_rope_match_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb, get_timestep_embedding
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    t = torch.tensor([0.0, 1.5, 999.0, 250.25])
    assert torch.allclose(timestep_embedding(t), get_timestep_embedding(t, 256, flip_sin_to_cos=True,
                                                                        downscale_freq_shift=0), atol=1e-6)
    ids = torch.stack([torch.zeros(40), torch.arange(40.0) // 5, torch.arange(40.0) % 5 + 100], dim=-1)
    cos, sin = rope(ids, (8, 12, 12), 10_000)
    ref_cos, ref_sin = FluxPosEmbed(10_000, [8, 12, 12])(ids)
    assert torch.allclose(cos, ref_cos, atol=1e-6) and torch.allclose(sin, ref_sin, atol=1e-6)
    x = torch.randn(2, 3, 40, 32)
    ref = apply_rotary_emb(x.transpose(1, 2), (ref_cos, ref_sin), sequence_dim=1).transpose(1, 2)
    assert torch.allclose(apply_rope(x, cos, sin), ref, atol=1e-6)


def test_config_round_trips_through_diffusers_dict():
    cfg = FluxConfig(in_channels=12, num_heads=3, head_dim=16, depth=2, depth_single=5, axes_dim=(4, 6, 6),
                     joint_attention_dim=40, pooled_projection_dim=24, guidance_embed=False)
    assert FluxConfig.from_diffusers(json.loads(json.dumps(cfg.to_diffusers()))) == cfg


def flux_like_qkv(batch: int, length: int, heads: int, head_dim: int = 128, seed: int = 0):
    """q and k as FLUX makes them (RMS-normalised per head, then scaled per channel by the learnt QK-norm scales,
    with a shared offset in k) give logits of tens: where rounding the scores to bfloat16 shows."""
    g = torch.Generator().manual_seed(seed)

    def normed(offset: float) -> torch.Tensor:
        x = torch.randn(batch, length, heads, head_dim, generator=g) + offset * torch.randn(head_dim, generator=g)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * (1 + 3 * torch.rand(head_dim, generator=g))

    return normed(0.3), normed(0.5), torch.randn(batch, length, heads, head_dim, generator=g)


@pytest.mark.parametrize("batch,length,scores", [(1, 40, 1 << 21), (2, 300, 1 << 21), (2, 300, 5000)])
def test_attention_by_head_computes_sdpa_attention(monkeypatch, batch, length, scores):
    # 5000 scores per product: 256-row chunks of 300 query rows, the last one short
    monkeypatch.setattr(layers, "SCORES_PER_PRODUCT", scores)
    q, k, v = flux_like_qkv(batch, length, heads=3, head_dim=16)
    expected = layers.attention(q, k, v)
    assert layers.attention_by_head(q, k, v).shape == expected.shape == (batch, length, 48)
    torch.testing.assert_close(layers.attention_by_head(q, k, v), expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(layers.attention_by_head, dynamic=True)  # whole heads, the batch in one product
    torch.testing.assert_close(compiled(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_attention_by_head_in_bfloat16_errs_within_three_times_sdpa():
    # its scores are rounded to bfloat16, SDPA's stay float32: a little over twice SDPA's error on these logits
    q, k, v = flux_like_qkv(1, 1280, heads=2)
    exact = layers.attention(q.double(), k.double(), v.double())

    def error(out: torch.Tensor) -> float:
        return ((out.double() - exact).norm() / exact.norm()).item()

    sdpa = error(layers.attention(q, k, v, torch.bfloat16))
    by_head = error(layers.attention_by_head(q, k, v, torch.bfloat16))
    assert layers.attention_by_head(q, k, v, torch.bfloat16).dtype == torch.float32  # back in q's dtype
    assert by_head < 3 * sdpa, (sdpa, by_head)
