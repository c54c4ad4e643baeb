"""LoRA in every format on tiny random models: the image with a LoRA equals the image of the base model with the
format's meaning merged into its weights (computed here), and for peft and XLabs also diffusers' own image; several
adapters with weights, fusing and unfusing exactly, 8-bit weights, blocks read on demand, and refused files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline as DiffusersFluxPipeline
from test_pipeline import assert_close, assert_differ, generators, picture
from tiny_models import make_tiny_flux_folder

from rectiflux.lora.formats import LoraError
from rectiflux.pipelines.load import load
from rectiflux.weights.checkpoint import save_state_dict
from rectiflux.weights.transformer import load_transformer, save_transformer

COMMON = {"prompt": "a large red circle on the left on a white background", "height": 32, "width": 48,
          "num_inference_steps": 3, "guidance_scale": 3.5, "max_sequence_length": 32, "output_type": "np"}
RANK = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("lora") / "dev")


@pytest.fixture(scope="module")
def base(folder):
    return load(folder, blocks="memory")


@pytest.fixture(scope="module")
def ref(folder):
    pipe = DiffusersFluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, seed=0, **kwargs):
    return pipe(generator=generators(seed), **{**COMMON, **kwargs}).images


def rand(*shape, seed=0, scale=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def bfl_linears(pipe) -> dict[str, torch.nn.Linear]:
    """Our (BFL-named) linear layers of the transformer's blocks."""
    return {n: m for n, m in pipe.transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(("double_blocks", "single_blocks"))}


class Merged:
    """The oracle: the base transformer with weight changes added, by our own names, saved as a BFL file."""

    def __init__(self, folder, tmp_path):
        self.folder, self.tmp = folder, tmp_path
        self.model = load_transformer(folder)
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def add(self, module: str, delta: torch.Tensor, rows: tuple[int, int] | None = None, bias=None) -> None:
        weight = self.state[module + ".weight"]
        start, stop = rows or (0, weight.shape[0])
        weight[start:stop] += delta.to(weight.dtype)
        if bias is not None:
            self.state[module + ".bias"][start:stop] += bias

    def pipeline(self, name="merged"):
        self.model.load_state_dict(self.state)
        file = self.tmp / f"{name}.safetensors"
        save_transformer(self.model, file, layout="bfl")
        return load(file, vae=self.folder / "vae", text_encoders=self.folder, blocks="memory")


# ----------------------------------------------------------------------------------------------------------------
# formats against diffusers and against the merged weights

def peft_lora(ref, seed=0, modules=None) -> dict:
    sd = {}
    for i, (name, m) in enumerate(ref.transformer.named_modules()):
        if isinstance(m, torch.nn.Linear) and "transformer_blocks" in name and (modules is None or name in modules):
            sd[f"transformer.{name}.lora_A.weight"] = rand(RANK, m.in_features, seed=seed + 2 * i)
            sd[f"transformer.{name}.lora_B.weight"] = rand(m.out_features, RANK, seed=seed + 2 * i + 1)
    return sd


def test_peft_matches_diffusers_with_call_scale_and_two_adapters(folder, ref):
    ours = load(folder)
    first, second = peft_lora(ref), peft_lora(ref, seed=100)
    ref.load_lora_weights(dict(first), adapter_name="one")
    ours.load_lora_weights(dict(first), adapter_name="one")
    try:
        assert_close(image(ours), image(ref))
        assert_close(image(ours, joint_attention_kwargs={"scale": 0.4}),
                     image(ref, joint_attention_kwargs={"scale": 0.4}))
        ref.load_lora_weights(dict(second), adapter_name="two")
        ours.load_lora_weights(dict(second), adapter_name="two")
        assert ours.get_active_adapters() == ref.get_active_adapters() == ["two"]  # the last loaded
        ref.set_adapters(["one", "two"], [0.7, -0.3])
        ours.set_adapters(["one", "two"], [0.7, -0.3])
        both = image(ours)
        assert_close(both, image(ref))
        assert_differ(both, image(load(folder)))
        ours.delete_adapters("two")
        ref.delete_adapters("two")
        assert ours.get_active_adapters() == ["one"]
        assert_close(image(ours), image(ref))
    finally:
        ref.unload_lora_weights()


def test_peft_metadata_alpha_and_alpha_keys(folder, base, ref, tmp_path):
    sd = peft_lora(ref, modules={"transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp"})
    file = tmp_path / "pytorch_lora_weights.safetensors"
    save_state_dict(sd, file, {"format": "pt", "lora_adapter_metadata": json.dumps(
        {"transformer.r": RANK, "transformer.lora_alpha": 2 * RANK})})
    ours = load(folder, blocks="memory")
    ours.load_lora_weights(tmp_path)  # a folder holding diffusers' file name
    merged = Merged(folder, tmp_path)
    h = base.transformer.config.hidden_size
    a, b = sd["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"], \
        sd["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"]
    merged.add("double_blocks.0.img_attn.qkv", 2 * b @ a, rows=(h, 2 * h))  # alpha / rank = 2
    a, b = sd["transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight"], \
        sd["transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"]
    merged.add("single_blocks.1.linear1", 2 * b @ a, rows=(3 * h, 3 * h + b.shape[0]))
    want = image(merged.pipeline())
    assert_close(image(ours), want)
    keyed = {**sd, "transformer.transformer_blocks.0.attn.to_k.alpha": torch.tensor(8.0),
             "transformer.single_transformer_blocks.1.proj_mlp.alpha": torch.tensor(8.0)}
    again = load(folder, blocks="memory")
    again.load_lora_weights(keyed)
    assert_close(image(again), want)


def kohya_lora(base, names, seed=0, alpha=2.0, prefix="lora_unet_", dotted=False) -> tuple[dict, dict]:
    """kohya tensors for our modules `names`, and the weight change each means: alpha / rank * up @ down."""
    sd, meaning = {}, {}
    linears = bfl_linears(base)
    for i, name in enumerate(names):
        m = linears[name]
        key = prefix + (name if dotted else name.replace(".", "_"))
        down, up = rand(RANK, m.in_features, seed=seed + 2 * i), rand(m.out_features, RANK, seed=seed + 2 * i + 1)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        meaning[name] = alpha / RANK * up @ down
    return sd, meaning


KOHYA_MODULES = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.2",
                 "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1", "single_blocks.1.linear2",
                 "single_blocks.1.modulation.lin"]


@pytest.mark.parametrize(("prefix", "dotted"), [("lora_unet_", False), ("diffusion_model.", True)],
                         ids=["kohya", "comfyui-dotted"])
def test_kohya_fused_projections_stay_fused(folder, base, tmp_path, prefix, dotted):
    sd, meaning = kohya_lora(base, KOHYA_MODULES, prefix=prefix, dotted=dotted)
    merged = Merged(folder, tmp_path)
    for name, delta in meaning.items():
        merged.add(name, delta)
    ours = load(folder, blocks="memory")
    ours.load_lora_weights(sd)
    assert_close(image(ours), image(merged.pipeline()))
    assert ours.lora.loaded["default_0"].format == "kohya"


def test_onetrainer_names_and_kohya_clip(folder, base, ref, tmp_path):
    h = base.transformer.config.hidden_size
    sd = {}
    down, up = rand(RANK, h, seed=1), rand(h, RANK, seed=2)
    sd["lora_transformer_transformer_blocks_0_attn_to_v.lora_down.weight"] = down
    sd["lora_transformer_transformer_blocks_0_attn_to_v.lora_up.weight"] = up
    clip = base.text_encoders.clip
    width = clip.config.hidden_size
    cdown, cup = rand(RANK, width, seed=3), rand(width, RANK, seed=4)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = cdown
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = cup
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(float(RANK))
    ours = load(folder, blocks="memory")
    ours.load_lora_weights(sd)
    merged = Merged(folder, tmp_path)
    merged.add("double_blocks.0.img_attn.qkv", up @ down, rows=(2 * h, 3 * h))  # to_v: the third third
    oracle = merged.pipeline()
    with torch.no_grad():
        oracle.text_encoders.clip.layers[0].q_proj.weight += cup @ cdown
    got = image(ours)
    assert_close(got, image(oracle))
    ours.delete_adapters("default_0")
    assert_close(image(ours), image(base))


def xlabs_lora(base, seed=0) -> tuple[dict, dict]:
    h = base.transformer.config.hidden_size
    sd, meaning = {}, {}
    parts = {"double_blocks.0.processor.qkv_lora1": ("double_blocks.0.img_attn.qkv", None, h, 3 * h),
             "double_blocks.0.processor.qkv_lora2": ("double_blocks.0.txt_attn.qkv", None, h, 3 * h),
             "double_blocks.0.processor.proj_lora1": ("double_blocks.0.img_attn.proj", None, h, h),
             "double_blocks.0.processor.proj_lora2": ("double_blocks.0.txt_attn.proj", None, h, h),
             "single_blocks.1.processor.qkv_lora": ("single_blocks.1.linear1", (0, 3 * h), h, 3 * h),
             "single_blocks.0.processor.proj_lora": ("single_blocks.0.linear2", None,
                                                     base.transformer.single_blocks[0].linear2.in_features, h)}
    for i, (key, (ours, rows, fan_in, fan_out)) in enumerate(parts.items()):
        down, up = rand(RANK, fan_in, seed=seed + 2 * i), rand(fan_out, RANK, seed=seed + 2 * i + 1)
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
        meaning[ours] = (up @ down, rows)  # no alpha: scale 1
    return sd, meaning


def test_xlabs_matches_the_merged_weights_and_diffusers(folder, base, ref, tmp_path):
    sd, meaning = xlabs_lora(base)
    merged = Merged(folder, tmp_path)
    for name, (delta, rows) in meaning.items():
        merged.add(name, delta, rows)
    ours = load(folder, blocks="memory")
    ours.load_lora_weights(dict(sd))
    got = image(ours)
    assert_close(got, image(merged.pipeline()))
    ref.load_lora_weights(dict(sd), adapter_name="xlabs")
    try:
        assert_close(got, image(ref))
    finally:
        ref.unload_lora_weights()


def test_lycoris_lokr_and_loha_and_diff_patches(folder, base, tmp_path):
    linears = bfl_linears(base)
    qkv, proj, fc = linears["double_blocks.0.img_attn.qkv"], linears["double_blocks.0.img_attn.proj"], \
        linears["single_blocks.0.linear2"]
    sd, merged = {}, Merged(folder, tmp_path)
    # LoKr: kron(w1, w2_a @ w2_b), alpha over the rank of the low-rank factor
    w1 = rand(3, 2, seed=1)
    w2_a, w2_b = rand(qkv.out_features // 3, 2, seed=2), rand(2, qkv.in_features // 2, seed=3)
    sd |= {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": w1, "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_a":
           w2_a, "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_b": w2_b,
           "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)}
    merged.add("double_blocks.0.img_attn.qkv", 0.5 * torch.kron(w1, w2_a @ w2_b))
    # LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), alpha / rank
    parts = {k: rand(*shape, seed=10 + i) for i, (k, shape) in enumerate(
        [("hada_w1_a", (proj.out_features, 2)), ("hada_w1_b", (2, proj.in_features)),
         ("hada_w2_a", (proj.out_features, 2)), ("hada_w2_b", (2, proj.in_features))])}
    sd |= {f"lora_unet_double_blocks_0_img_attn_proj.{k}": v for k, v in parts.items()}
    sd["lora_unet_double_blocks_0_img_attn_proj.alpha"] = torch.tensor(4.0)
    merged.add("double_blocks.0.img_attn.proj", 2.0 * (parts["hada_w1_a"] @ parts["hada_w1_b"])
               * (parts["hada_w2_a"] @ parts["hada_w2_b"]))
    # .diff / .diff_b: the change itself
    diff, diff_b = rand(fc.out_features, fc.in_features, seed=20, scale=0.05), rand(fc.out_features, seed=21)
    sd |= {"diffusion_model.single_blocks.0.linear2.diff": diff, "diffusion_model.single_blocks.0.linear2.diff_b":
           diff_b}
    merged.add("single_blocks.0.linear2", diff, bias=diff_b)
    ours = load(folder, blocks="memory")
    ours.load_lora_weights(sd)
    want = image(merged.pipeline())
    assert_close(image(ours), want)
    ours.fuse_lora()
    assert_close(image(ours), want)


def test_bfl_control_lora_turns_dev_into_control_and_back(folder, base, tmp_path):
    h = base.transformer.config.hidden_size
    t = base.transformer
    sd = {"img_in.lora_A.weight": rand(RANK, 128, seed=1), "img_in.lora_B.weight": rand(h, RANK, seed=2),
          "img_in.lora_B.bias": rand(h, seed=3),
          "double_blocks.0.img_attn.qkv.lora_A.weight": rand(RANK, h, seed=4),
          "double_blocks.0.img_attn.qkv.lora_B.weight": rand(3 * h, RANK, seed=5),
          "double_blocks.0.img_attn.norm.query_norm.scale": rand(t.config.head_dim, seed=6) + 1}
    ours = load(folder, blocks="memory")
    plain = image(ours)
    ours.load_lora_weights({f"diffusion_model.{k}": v for k, v in sd.items()})
    assert ours.kind == "control" and ours.transformer.config.in_channels == 128
    with pytest.raises(ValueError, match="control_image"):
        image(ours)
    # the oracle: a control model whose img_in reads 128 channels, built from the merged weights
    oracle = load_transformer(folder)
    state = {k: v.clone() for k, v in oracle.state_dict().items()}
    state["img_in.weight"] = torch.cat([state["img_in.weight"], torch.zeros(h, 64)], dim=1)
    state["img_in.weight"] += sd["img_in.lora_B.weight"] @ sd["img_in.lora_A.weight"]
    state["img_in.bias"] += sd["img_in.lora_B.bias"]
    state["double_blocks.0.img_attn.qkv.weight"] += sd["double_blocks.0.img_attn.qkv.lora_B.weight"] @ \
        sd["double_blocks.0.img_attn.qkv.lora_A.weight"]
    state["double_blocks.0.img_attn.norm.query_norm.scale"] = sd["double_blocks.0.img_attn.norm.query_norm.scale"]
    config = {**dataclasses.asdict(oracle.config), "in_channels": 128, "out_channels": 64}
    save_state_dict(state, tmp_path / "control.safetensors", {"rectiflux_config": json.dumps(config)})
    control = load(tmp_path / "control.safetensors", vae=folder / "vae", text_encoders=folder)
    assert control.kind == "control"
    assert_close(image(ours, control_image=picture(48, 32)), image(control, control_image=picture(48, 32)))
    ours.unload_lora_weights()
    assert ours.kind == "flux" and ours.transformer.config.in_channels == 64
    np.testing.assert_array_equal(image(ours), plain)


# ----------------------------------------------------------------------------------------------------------------
# applying

def test_fuse_and_unfuse_a_hundred_times_is_bit_exact(folder, ref):
    ours = load(folder, blocks="memory")
    ours.load_lora_weights(peft_lora(ref), adapter_name="one")
    ours.load_lora_weights(peft_lora(ref, seed=50), adapter_name="two")
    ours.set_adapters(["one", "two"], [0.6, 0.9])
    unfused = image(ours)
    ours.fuse_lora()
    assert ours.lora._hooks == {}  # fused: no side products left to pay for
    assert_close(image(ours), unfused)
    for _ in range(99):
        ours.unfuse_lora()
        ours.fuse_lora(lora_scale=0.5)
    ours.unfuse_lora()
    ours.unload_lora_weights()
    fresh = load(folder, blocks="memory")
    for (name, a), (_, b) in zip(ours.transformer.state_dict().items(), fresh.transformer.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("blocks", ["lazy", "stream"])
def test_blocks_read_on_demand_get_their_adapters(folder, ref, blocks):
    sd = peft_lora(ref)
    memory = load(folder, blocks="memory")
    memory.load_lora_weights(dict(sd))
    want = image(memory)
    ours = load(folder, blocks=blocks)
    ours.load_lora_weights(dict(sd))
    assert_close(image(ours), want)
    ours.fuse_lora()
    assert_close(image(ours), want)
    assert_close(image(ours), want)  # a streamed block is read, and merged, again
    ours.unfuse_lora()
    assert_close(image(ours, joint_attention_kwargs={"scale": 0.0}), image(load(folder, blocks=blocks)))


def test_int8_weights_unfused_and_fused(folder, base, ref, tmp_path):
    sd, meaning = kohya_lora(base, KOHYA_MODULES)
    merged = Merged(folder, tmp_path)
    for name, delta in meaning.items():
        merged.add(name, delta)
    merged.pipeline()  # writes merged.safetensors
    file = tmp_path / "merged.safetensors"
    float_merged = image(load(file, vae=folder / "vae", text_encoders=folder))
    ours = load(folder, quantize="int8")
    ours.load_lora_weights(dict(sd))
    unfused = image(ours)
    assert np.abs(unfused - float_merged).max() < 0.05  # within the int8 tolerance of the float image
    ours.fuse_lora()
    # fused: re-quantised from the float checkpoint's weights, exactly what quantising the merged file gives
    np.testing.assert_allclose(image(ours), image(load(file, vae=folder / "vae", text_encoders=folder,
                                                       quantize="int8")), atol=2e-4)
    ours.unfuse_lora()
    np.testing.assert_array_equal(image(ours, joint_attention_kwargs={"scale": 0.0}),
                                  image(load(folder, quantize="int8")))


def test_refused_files_leave_the_pipeline_as_it_was(folder, base, ref, tmp_path):
    ours = load(folder, blocks="memory")
    before = {k: v.clone() for k, v in ours.transformer.state_dict().items()}
    good = peft_lora(ref, modules={"transformer_blocks.0.attn.to_q"})
    unplaced = {**good, "transformer.no_such_block.lora_A.weight": torch.zeros(4, 16),
                "transformer.no_such_block.lora_B.weight": torch.zeros(16, 4)}
    with pytest.raises(LoraError, match=r"has 2 tensor\(s\) no module of this pipeline takes: "
                                        r"transformer.no_such_block.lora_A.weight"):
        ours.load_lora_weights(unplaced)
    wrong = dict(good)
    wrong["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(4, 3072)
    with pytest.raises(LoraError, match="for another model: transformer.transformer_blocks.0.attn.to_q changes a "
                                        "16x3072 weight, double_blocks.0.img_attn.qkv here is 16x16"):
        ours.load_lora_weights(wrong)
    (tmp_path / "lora.bin").write_bytes(b"not a pickle we would read")
    with pytest.raises(LoraError, match="never read"):
        ours.load_lora_weights(tmp_path / "lora.bin")
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        ours.set_adapters("x")
    assert ours.get_active_adapters() == [] and ours.lora._hooks == {} and ours.kind == "flux"
    assert all(torch.equal(before[k], v) for k, v in ours.transformer.state_dict().items())
    assert_close(image(ours), image(base))
