"""LoRA training on a tiny random model: the written file is one diffusers reads and renders as we do, in both
layouts; a resumed run ends where an uninterrupted one does; bad data is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline as DiffusersFluxPipeline
from PIL import Image
from test_pipeline import assert_close, assert_differ, generators
from tiny_models import make_tiny_flux_folder

from rectiflux import cli
from rectiflux.pipelines.load import load
from rectiflux.training.lora import read_dataset, train_lora

COMMON = {"prompt": "a large red circle", "height": 32, "width": 32, "num_inference_steps": 2,
          "guidance_scale": 3.5, "max_sequence_length": 16, "output_type": "np"}
SETTINGS = {"rank": 4, "steps": 6, "batch_size": 2, "lr": 1e-2, "resolution": 32, "max_sequence_length": 16,
            "save_every": 3, "log_every": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("lora-train") / "dev")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a large red circle", "a small blue square", "a green cross", "a red circle"]):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def test_trained_lora_loads_in_diffusers_and_here_alike(folder, data, tmp_path):
    pipe = load(folder)
    before = pipe(generator=generators(0), **COMMON).images
    path = train_lora(pipe, data=str(data), out=str(tmp_path / "peft"), **SETTINGS)
    assert path.name == "pytorch_lora_weights.safetensors"
    np.testing.assert_array_equal(pipe(generator=generators(0), **COMMON).images, before)  # hooks gone after
    pipe.load_lora_weights(path.parent)
    ours = pipe(generator=generators(0), **COMMON).images
    assert_differ(ours, before)
    ref = DiffusersFluxPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path.parent))
    assert_close(ours, ref(generator=generators(0), **COMMON).images)
    kohya = train_lora(load(folder), data=str(data), out=str(tmp_path / "kohya"), format="kohya", **SETTINGS)
    again = load(folder)
    again.load_lora_weights(kohya)
    assert again.lora.loaded["default_0"].format == "kohya"
    assert_close(again(generator=generators(0), **COMMON).images, ours)  # the same training, the other layout
    metrics = [json.loads(line) for line in (tmp_path / "peft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))


def test_resume_ends_where_an_uninterrupted_run_does(folder, data, tmp_path):
    whole = train_lora(load(folder), data=str(data), out=str(tmp_path / "whole"), **SETTINGS)
    train_lora(load(folder), data=str(data), out=str(tmp_path / "parts"), **{**SETTINGS, "steps": 3})
    resumed = train_lora(load(folder), resume=True, data=str(data), out=str(tmp_path / "parts"), **SETTINGS)
    from safetensors.torch import load_file

    a, b = load_file(whole), load_file(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_bad_data_and_runs_are_refused(folder, data, tmp_path, monkeypatch, capsys):
    (tmp_path / "lonely").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely" / "cat.png")
    with pytest.raises(ValueError, match="cat.png has no caption: write it to cat.txt"):
        read_dataset(tmp_path / "lonely")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    assert cli.main(["train-lora", str(data), "--model", str(folder), "--out", "run"]) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert cli.main(["train-lora", str(tmp_path / "nowhere"), "--model", str(folder), "--out", "new"]) == 2
    assert "no training folder" in capsys.readouterr().err
    assert torch.get_num_threads() >= 1


def test_two_processes_train_the_same_adapters(folder, data, tmp_path):
    script = tmp_path / "ddp_lora.py"
    script.write_text(f"""
import os
from safetensors.torch import save_file
from rectiflux.pipelines.load import load
from rectiflux.training.lora import LoraTrainConfig, LoraTrainer
trainer = LoraTrainer(LoraTrainConfig(data=r"{data}", out=r"{tmp_path / 'run'}", rank=4, steps=3, batch_size=4,
                                      resolution=32, max_sequence_length=16, save_every=3), load(r"{folder}"))
trainer.fit()
save_file({{k: v.contiguous() for k, v in trainer.network.state_dict().items() if k.startswith(("downs", "ups"))}},
          r"{tmp_path}/rank" + os.environ["RANK"] + ".safetensors")
""")
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                             str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(rank0[k].abs().max() > 0 for k in rank0 if k.startswith("ups"))  # they trained
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
