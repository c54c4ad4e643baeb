"""FSDP2 training on two CPU processes (gloo): the sharded runs end with the weights of the replicated (DDP) runs and
of one process taking the same global batch in two micro-batches, for the transformer and for LoRA; a run killed
by SIGKILL between writing its shards and committing them resumes to the uninterrupted run's weights; checkpoints
of another world size or shape are refused in one line; `rectiflux train --fsdp` exports the gathered EMA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fsdp_run import LORA_SETTINGS, TINY_AE, TINY_FLUX, flux_trainer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import make_tiny_flux_folder

from rectiflux.flux.autoencoder import AutoEncoder
from rectiflux.flux.transformer import Flux
from rectiflux.training.sharding import check_shapes, read_manifest

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
STEPS = 6  # the last 3 distil guidance from a teacher copied off the EMA after step 3
TOLERANCE = 1e-5


def launch(folder: Path, name: str, specs: list[dict]) -> subprocess.CompletedProcess:
    """One torchrun launch of two processes doing `specs` (tests/fsdp_run.py) one after the other."""
    spec = folder / f"{name}.json"
    spec.write_text(json.dumps(specs))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "fsdp_run.py"), str(spec)], env=ENV, capture_output=True, text=True,
                          timeout=300)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def flux_spec(out: Path, fsdp: bool, **extra) -> dict:
    return {"kind": "flux", "fsdp": fsdp, "out": str(out), "dump": str(out) + ".safetensors", "steps": STEPS,
            "every": 1, **extra}


@pytest.fixture(scope="module")
def flux_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp-flux")
    result = launch(tmp, "runs", [flux_spec(tmp / "fsdp", True), flux_spec(tmp / "ddp", False)])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


def test_sharded_transformer_run_equals_ddp_and_one_process(flux_runs):
    fsdp, ddp = load_file(flux_runs / "fsdp.safetensors"), load_file(flux_runs / "ddp.safetensors")
    with safe_open(str(flux_runs / "fsdp.safetensors"), framework="pt") as f:
        assert f.metadata() == {"sharded": "True", "world": "2", "teacher": "True"}
    one = flux_trainer(str(flux_runs / "one"), STEPS, grad_accumulation=2)  # the same global batch, in one process
    one.fit()
    single = {f"model.{k}": v for k, v in one.model.state_dict().items()}
    single |= {f"ema.{k}": v for k, v in one.ema.state_dict().items()}
    assert max_diff(fsdp, ddp) <= TOLERANCE and max_diff(fsdp, single) <= TOLERANCE
    torch.manual_seed(0)  # the weights every run starts from, drawn as flux_trainer draws them
    AutoEncoder(TINY_AE)
    start = Flux(TINY_FLUX).state_dict()
    assert max_diff({k: v for k, v in fsdp.items() if k.startswith("model.")},
                    {f"model.{k}": v for k, v in start.items()}) > 100 * TOLERANCE  # it trained
    # the gradient norm is the global one (clipping was on): the same figures as DDP's whole gradients
    norms = [[json.loads(line)["grad_norm"] for line in (flux_runs / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("fsdp", "ddp")]
    assert len(norms[0]) == STEPS and max(norms[0]) > 0.3 and np.allclose(norms[0], norms[1], rtol=1e-5)
    # the checkpoint: a manifest and one file per rank holding that rank's rows of every tensor
    manifest = json.loads((flux_runs / "fsdp" / "checkpoint.json").read_text())
    assert manifest["step"] == STEPS and manifest["world_size"] == 2
    shards = [load_file(flux_runs / "fsdp" / name) for name in manifest["files"]]
    assert sorted(p.name for p in (flux_runs / "fsdp" / "checkpoint-shards").iterdir()) == \
        [f"{STEPS:08d}-rank{r}-of-2.safetensors" for r in (0, 1)]  # the earlier steps' shards are gone
    for key in fsdp:
        rows = [s[key] for s in shards]
        assert rows[0].shape[0] == -(-fsdp[key].shape[0] // 2) and torch.equal(torch.cat(rows), fsdp[key]), key
        assert tuple(manifest["shapes"][key]) == tuple(fsdp[key].shape)
    assert any(k.startswith("teacher.") for k in manifest["shapes"])
    assert {"optim.0.exp_avg", "optim.0.exp_avg_sq", "optim.0.step"} <= manifest["shapes"].keys()


def test_kill_9_between_shards_and_manifest_then_resume_equals_uninterrupted(flux_runs, tmp_path):
    run = tmp_path / "run"
    # rank 1 SIGKILLs itself once its step-5 shard is on disk; torchrun then ends rank 0, wherever it is
    killed = launch(tmp_path, "killed", [flux_spec(run, True, kill_at=[5, 1])])
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    manifest = json.loads((run / "checkpoint.json").read_text())
    assert manifest["step"] == 4 and any(k.startswith("teacher.") for k in manifest["shapes"])
    names = {p.name for p in (run / "checkpoint-shards").iterdir()}
    assert {"00000004-rank0-of-2.safetensors", "00000004-rank1-of-2.safetensors",
            "00000005-rank1-of-2.safetensors"} <= names  # killed after the new shard, before its manifest
    assert not (run.parent / "run.safetensors").exists()
    resumed = launch(tmp_path, "resumed", [flux_spec(run, True, resume=4)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, again = load_file(flux_runs / "fsdp.safetensors"), load_file(run.parent / "run.safetensors")
    assert max_diff(whole, again) == 0.0  # bit for bit, teacher and optimizer state included
    assert sorted(p.name for p in (run / "checkpoint-shards").iterdir()) == \
        [f"{STEPS:08d}-rank{r}-of-2.safetensors" for r in (0, 1)]


def test_a_sharded_checkpoint_is_refused_by_another_world_size_or_model(flux_runs):
    path = flux_runs / "fsdp" / "checkpoint.json"
    with pytest.raises(ValueError, match="written by 2 processes and this run has 4: resume it under") as e:
        read_manifest(path, 4)
    assert "\n" not in str(e.value)
    manifest = read_manifest(path, 2)
    shapes = {k: tuple(v) for k, v in manifest["shapes"].items()}
    check_shapes(path, manifest, shapes, list(shapes))
    wider = {**shapes, "model.img_in.weight": (48, 64)}
    with pytest.raises(ValueError, match=r"model.img_in.weight of shape \(32, 64\) where this run's is \(48, 64\)"):
        check_shapes(path, manifest, wider, list(wider))
    with pytest.raises(ValueError, match="lacks model.extra"):
        check_shapes(path, manifest, {**shapes, "model.extra": (1,)}, [*shapes, "model.extra"])
    # one process has nothing to shard (fsdp=True runs unsharded): it cannot take the two processes' shards
    trainer = flux_trainer(str(flux_runs / "fsdp"), STEPS, fsdp=True)
    with pytest.raises(ValueError, match="written sharded by 2 processes and this run is unsharded") as e:
        trainer.load_checkpoint()
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = make_tiny_flux_folder(tmp_path_factory.mktemp("fsdp-lora") / "dev")
    data = tmp_path_factory.mktemp("fsdp-data")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a large red circle", "a small blue square", "a green cross", "a red circle"]):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    return folder, data


def test_sharded_lora_run_equals_ddp_and_one_process(lora_inputs, tmp_path):
    from rectiflux.pipelines.load import load
    from rectiflux.training.lora import train_lora

    folder, data = lora_inputs
    common = {"kind": "lora", "model": str(folder), "data": str(data), "every": 2}
    specs = [{**common, "fsdp": fsdp, "out": str(tmp_path / name), "dump": str(tmp_path / f"{name}.safetensors"),
              "steps": 4} for fsdp, name in ((True, "fsdp"), (False, "ddp"))]
    # and a sharded run stopped after its step-2 checkpoint, then resumed to step 4
    specs += [{**common, "fsdp": True, "out": str(tmp_path / "parts"), "steps": 2},
              {**common, "fsdp": True, "out": str(tmp_path / "parts"), "steps": 4, "resume": True,
               "dump": str(tmp_path / "resumed.safetensors")}]
    # each run also checks that the pipeline's transformer ends with all its weights, unchanged
    result = launch(tmp_path, "lora", specs)
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp, ddp = load_file(tmp_path / "fsdp.safetensors"), load_file(tmp_path / "ddp.safetensors")
    one = load_file(train_lora(load(folder), data=str(data), out=str(tmp_path / "one"), steps=4, save_every=4,
                               grad_accumulation=2, **LORA_SETTINGS))
    assert max_diff(fsdp, ddp) <= TOLERANCE and max_diff(fsdp, one) <= TOLERANCE
    assert max(v.abs().max().item() for k, v in fsdp.items() if "lora_B" in k) > 100 * TOLERANCE  # it trained
    assert max_diff(fsdp, load_file(tmp_path / "resumed.safetensors")) == 0.0
    steps = [json.loads(line)["step"] for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # it went on from step 2 rather than starting again
    manifest = json.loads((tmp_path / "fsdp" / "checkpoint.json").read_text())
    assert manifest["step"] == 4 and manifest["world_size"] == 2
    assert all(k.startswith(("lora.downs.", "lora.ups.", "optim.")) for k in manifest["shapes"])


def test_train_command_with_fsdp_exports_the_gathered_ema(tmp_path):
    from rectiflux.pipelines.load import load
    from rectiflux.weights.transformer import load_transformer

    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "rectiflux", "train", "--preset", "shapes", "--out", str(run), "--ae-steps", "2", "--flux-steps", "3",
               "--distill-steps", "1", "--batch-size", "4", "--bank-size", "8", "--checkpoint-every", "3",
               "--sample-every", "0", "--fsdp"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("ae", "flux"):
        manifest = json.loads((run / stage / "checkpoint.json").read_text())
        assert manifest["world_size"] == 2 and not (run / stage / "checkpoint.safetensors").exists()
    shards = [load_file(run / "flux" / name) for name in manifest["files"]]
    ema = {k[4:]: torch.cat([s[k] for s in shards]) for k in shards[0] if k.startswith("ema.")}
    final = load_transformer(run / "flux" / "final").state_dict()  # written whole by rank 0
    assert final.keys() == ema.keys() and all(torch.equal(final[k], ema[k]) for k in ema)
    pipe = load(run / "model")
    assert pipe("a red circle", seed=0, num_inference_steps=2).images[0].size == (64, 64)
