"""rectiflux.load from every source a user has: a diffusers folder, BFL single files, the local HF cache."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_flux_folder

import rectiflux
from rectiflux.pipelines.load import load
from rectiflux.weights.checkpoint import CheckpointError
from rectiflux.weights.transformer import load_transformer, save_transformer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny") / "flux")


def image(pipe, **kw):
    return pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, seed=0, output_type="np", **kw).images


def test_bfl_single_files_load_like_the_folder(tmp_path):
    # BFL's ae.safetensors records no GroupNorm group count: FLUX's 32 is assumed, so build with 32
    folder = make_tiny_flux_folder(tmp_path / "flux32", vae_block_out_channels=(32, 64), vae_norm_num_groups=32)
    reference = image(load(folder))
    bfl = tmp_path / "bfl"
    bfl.mkdir()
    save_transformer(load_transformer(folder), bfl / "flux1-tiny.safetensors", layout="bfl")
    # BFL's ae.safetensors: our autoencoder's own parameter names are BFL's
    from rectiflux.weights.autoencoder import load_autoencoder
    save_file({k: v.contiguous() for k, v in load_autoencoder(folder / "vae").state_dict().items()},
              bfl / "ae.safetensors")
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        shutil.copytree(folder / sub, bfl / sub)
    pipe = load(bfl / "flux1-tiny.safetensors")
    assert np.abs(image(pipe) - reference).max() < 1e-6
    # the same with the text encoders elsewhere and the autoencoder named explicitly
    moved = tmp_path / "elsewhere"
    (bfl / "ae.safetensors").rename(tmp_path / "my-ae.safetensors")
    shutil.move(str(bfl / "text_encoder"), str(moved / "text_encoder"))
    for sub in ("tokenizer", "text_encoder_2", "tokenizer_2"):
        shutil.move(str(bfl / sub), str(moved / sub))
    pipe = load(bfl / "flux1-tiny.safetensors", vae=tmp_path / "my-ae.safetensors", text_encoders=moved)
    assert np.abs(image(pipe) - reference).max() < 1e-6


def test_repo_id_found_in_the_local_hf_cache(folder, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--acme--tiny-flux" / "snapshots" / "0123abc"
    shutil.copytree(folder, snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = rectiflux.load("acme/tiny-flux")
    assert np.abs(image(pipe) - image(load(folder))).max() < 1e-6
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*hub"):
        rectiflux.load("acme/missing-model")


def test_bad_sources_are_refused_in_one_line(folder, tmp_path):
    with pytest.raises(CheckpointError, match="no model at"):
        load(tmp_path / "nothing-here")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop(next(iter(state)))
    save_file(state, weights)
    with pytest.raises(CheckpointError) as e:
        load(broken)
    assert "missing" in str(e.value) and "\n" not in str(e.value)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load(broken)


def test_dtype_argument(folder):
    pipe = load(folder, dtype="bfloat16")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.autoencoder.decoder.conv_in.weight.dtype == torch.bfloat16
    assert np.isfinite(image(pipe)).all()


def test_quantized_pipeline_stays_close_to_float32(folder):
    reference = image(load(folder))
    for mode, min_psnr in (("int8", 35), ("int8-dynamic", 30), ("float8", 30)):
        for blocks in ("lazy", "memory"):  # quantised as each block is read: at first use, or at load
            pipe = load(folder, quantize=mode, blocks=blocks)
            pixels = image(pipe)
            assert all(type(m).__name__ == "QuantizedLinear" for m in pipe.transformer.double_blocks[0].modules()
                       if isinstance(m, torch.nn.Linear) or type(m).__name__ == "QuantizedLinear")
            mse = float(((pixels - reference) ** 2).mean())
            assert 10 * np.log10(1 / max(mse, 1e-12)) >= min_psnr, mode
    with pytest.raises(ValueError, match="quantize must be one of"):
        load(folder, quantize="int4")
    with pytest.raises(ValueError, match="quantize_file"):
        load(folder, quantize="int8", blocks="stream")


def test_a_transformer_of_no_known_variant_is_refused_with_the_known_widths(folder, tmp_path):
    from rectiflux.flux.config import FluxConfig
    from rectiflux.pipelines.load import detect_kind

    for width, kind in ((64, "flux"), (128, "control"), (384, "fill")):
        assert detect_kind(FluxConfig(in_channels=width, out_channels=64), 16, 8) == kind
    with pytest.raises(CheckpointError, match=r"in_channels 96 .* 64 \(text-to-image or Kontext\), 128 \(control\), "
                                              r"384 \(fill\)") as e:
        detect_kind(FluxConfig(in_channels=96, out_channels=64), 16, 8)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown kind 'redux'"):
        detect_kind(FluxConfig(), 16, 8, kind="redux")


def test_loading_and_generating_do_not_import_the_compiler(folder):
    # importing torch._dynamo takes seconds and only compile=True needs it: a decorator on the FBGEMM product once
    # made every load pay it, so that product is the one run here
    script = ("import sys\n"
              "from rectiflux.pipelines.load import load\n"
              f"pipe = load({str(folder)!r}, quantize='int8-dynamic', kernels={{'int8_products': 'fbgemm'}})\n"
              "pipe('a red circle', height=32, width=32, num_inference_steps=1, max_sequence_length=16)\n"
              "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
