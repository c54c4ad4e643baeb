"""The `rectiflux` command line, run as users run it: the installed console script in a subprocess, against a tiny
random FLUX folder. Each subprocess pays a few seconds of imports, so argument checks that need no model run
in-process through `rectiflux.cli.main`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tiny_models import make_tiny_flux_folder

import rectiflux
from rectiflux import cli
from rectiflux.cli.generate import StepTimer, output_paths, write_png
from rectiflux.cli.recipe import weights_sha256

SCRIPT = Path(sys.executable).with_name("rectiflux")
# the console script when the package is installed in this interpreter's environment, else the module
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rectiflux"]
# the model's own defaults (rectiflux.json below) keep every run tiny, and prove they are read from the model
MODEL_DEFAULTS = {"steps": 2, "guidance": 2.5, "width": 32, "height": 32, "max_sequence_length": 16,
                  "strength": 0.75}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = make_tiny_flux_folder(tmp_path_factory.mktemp("cli-model") / "tiny")
    (folder / "rectiflux.json").write_text(json.dumps(MODEL_DEFAULTS))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    # the weight-hash cache goes to a private folder, never the user's ~/.cache
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache")), OMP_WAIT_POLICY="PASSIVE",
                HF_HUB_OFFLINE="1")


def run_cli(args: list[str], cwd: Path, env: dict[str, str], command: list[str] = COMMAND):
    return subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def text_of(path: Path) -> dict[str, str]:
    with Image.open(path) as im:
        return dict(im.text)


def assert_one_error_line(stderr: str, fragment: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rectiflux: error: "), stderr
    assert fragment in lines[0], stderr


@pytest.fixture(scope="module")
def first(model, env, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A text-to-image run with every default: random seed, default name, the model's steps/size/guidance."""
    folder = tmp_path_factory.mktemp("first")
    proc = run_cli(["generate", "a red circle", "--model", model], folder, env)
    assert proc.returncode == 0, proc.stderr
    outputs = list(folder.iterdir())
    assert len(outputs) == 1, outputs
    return outputs[0], proc


# ----------------------------------------------------------------------------------------------------------------
# subprocess runs of the console script

def test_generate_writes_png_with_recipe(first, model, env):
    path, proc = first
    match = re.fullmatch(r"rectiflux-(\d+)\.png", path.name)
    assert match, path.name
    seed = match.group(1)
    assert proc.stderr == ""  # no library chatter, no bar when stderr is not a terminal
    summary = proc.stdout.splitlines()
    assert len(summary) == 1 and summary[0].startswith(f"wrote {path.name} ") and f"seed {seed}" in summary[0]
    assert "s/step" in summary[0]
    assert pixels(path).shape == (32, 32, 3)

    transformer = model / "transformer" / "diffusion_pytorch_model.safetensors"
    sha = hashlib.sha256(transformer.read_bytes()).hexdigest()
    text = text_of(path)
    expected = {"mode": "generate", "prompt": "a red circle", "seed": seed, "steps": "2", "guidance": "2.5",
                "width": "32", "height": "32", "true_cfg": "1.0", "max_sequence_length": "16", "dtype": "auto",
                "model": str(model.absolute()), "model_name": "tiny", "model_hash": sha,
                "rectiflux_version": rectiflux.__version__}
    assert {k: text.get(k) for k in expected} == expected
    assert "strength" not in text and "negative_prompt" not in text and "image" not in text
    # what "auto" chose for each model (this tiny model's widths are too small for bfloat16 to pay anywhere)
    assert json.loads(text["dtypes"]) == {"transformer": "float32", "vae": "float32", "text_encoders": "float32"}
    assert json.loads(text["kernels"]) == {"attention": "sdpa"}
    cache = json.loads((Path(env["XDG_CACHE_HOME"]) / "rectiflux" / "weight-hashes.json").read_text())
    assert cache[str(transformer.absolute())]["sha256"] == sha


def test_from_png_reproduces_bit_for_bit(first, env, tmp_path):
    path, _ = first
    again = tmp_path / "again.png"
    again.write_bytes(b"old contents, replaced thanks to --overwrite")
    proc = run_cli(["generate", "--from-png", path, "-o", again, "--overwrite"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    np.testing.assert_array_equal(pixels(again), pixels(path))
    assert text_of(again) == text_of(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png"]  # no temporary file left


def forge(path: Path, out: Path, **changes: str) -> Path:
    info = PngInfo()
    for key, value in {**text_of(path), **changes}.items():
        info.add_text(key, value)
    with Image.open(path) as im:
        im.save(out, pnginfo=info)
    return out


def test_from_png_replays_the_recorded_dtypes_not_a_new_choice(first, env, tmp_path):
    path, _ = first
    chosen = {"transformer": "bfloat16", "vae": "float32", "text_encoders": "bfloat16"}
    forged = forge(path, tmp_path / "forged.png", dtypes=json.dumps(chosen))
    proc = run_cli(["generate", "--from-png", forged, "-o", tmp_path / "replayed.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(text_of(tmp_path / "replayed.png")["dtypes"]) == chosen
    # an explicit --dtype wins over the recipe's
    proc = run_cli(["generate", "--from-png", forged, "--dtype", "float32", "-o", tmp_path / "f32.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(text_of(tmp_path / "f32.png")["dtypes"]).values()) == {"float32"}
    np.testing.assert_array_equal(pixels(tmp_path / "f32.png"), pixels(path))


def test_from_png_replays_the_recorded_kernels(first, env, tmp_path):
    path, _ = first
    # int8-dynamic, made where the timings chose the other way from this machine's: its kernels are replayed
    for attention, products in (("by-head", "dequant"), ("sdpa", "int_mm")):
        kernels = {"attention": attention, "int8_products": products}
        forged = forge(path, tmp_path / "forged.png", quantize="int8-dynamic", kernels=json.dumps(kernels))
        proc = run_cli(["generate", "--from-png", forged, "-o", tmp_path / "replayed.png", "--overwrite"], tmp_path,
                       env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(text_of(tmp_path / "replayed.png")["kernels"]) == kernels
    forged = forge(path, tmp_path / "bad.png", kernels=json.dumps({"attention": "flash"}))
    proc = run_cli(["generate", "--from-png", forged, "-o", tmp_path / "no.png"], tmp_path, env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "bad recipe value for kernels" in proc.stderr and "attention must be one of sdpa, by-head" in proc.stderr
    forged = forge(path, tmp_path / "bad.png", kernels=json.dumps({"int8_products": "dequant"}))
    proc = run_cli(["generate", "--from-png", forged, "-o", tmp_path / "no.png"], tmp_path, env)
    assert proc.returncode == 2 and "quantize='int8-dynamic' only" in proc.stderr, proc.stderr
    assert not (tmp_path / "no.png").exists()


def test_replaying_int8_products_a_cpu_runs_slowly_warns(first, tmp_path, monkeypatch, capsys):
    import rectiflux.quantize.linear as quantize

    path, _ = first
    forged = forge(path, tmp_path / "forged.png", quantize="int8-dynamic",
                   kernels=json.dumps({"attention": "sdpa", "int8_products": "int_mm"}))
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", False)  # as on an AVX2-only CPU
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cli.main(["generate", "--from-png", str(forged), "-o", str(tmp_path / "slow.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: the recipe's int8 products ran on torch._int_mm" in err, err
    assert json.loads(text_of(tmp_path / "slow.png")["kernels"])["int8_products"] == "int_mm"  # replayed anyway
    monkeypatch.setattr(quantize, "INT8_MATMUL_FAST", True)
    assert cli.main(["generate", "--from-png", str(forged), "-o", str(tmp_path / "fast.png")]) == 0
    assert capsys.readouterr().err == ""
    # FBGEMM's products recorded where torch had them, replayed where it has none: dequantised, and said so
    forged = forge(path, tmp_path / "fbgemm.png", quantize="int8-dynamic",
                   kernels=json.dumps({"attention": "sdpa", "int8_products": "fbgemm"}))
    monkeypatch.setattr(quantize, "_FBGEMM", False)
    assert cli.main(["generate", "--from-png", str(forged), "-o", str(tmp_path / "no-fbgemm.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the recipe's int8 products ran on FBGEMM, which this torch lacks" in err, err
    assert json.loads(text_of(tmp_path / "no-fbgemm.png")["kernels"])["int8_products"] == "dequant"


def test_from_png_overrides_and_numbered_outputs(first, env, tmp_path):
    path, _ = first
    seed = int(text_of(path)["seed"])
    proc = run_cli(["generate", "--from-png", path, "--guidance", "9", "--num-images", "2", "-o", "many.png"],
                   tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many-1.png", "many-2.png"]
    one, two = text_of(tmp_path / "many-1.png"), text_of(tmp_path / "many-2.png")
    assert (one["seed"], two["seed"]) == (str(seed), str(seed + 1))  # image k has seed + k - 1
    assert one["guidance"] == two["guidance"] == "9.0"  # the flag wins over the recipe
    assert one["prompt"] == "a red circle" and one["steps"] == "2"  # the rest comes from the recipe
    assert not np.array_equal(pixels(tmp_path / "many-1.png"), pixels(path))  # same seed, other guidance
    assert not np.array_equal(pixels(tmp_path / "many-1.png"), pixels(tmp_path / "many-2.png"))


def test_step_cache_is_recorded_and_streaming_gives_the_same_image(first, env, tmp_path):
    path, _ = first
    proc = run_cli(["generate", "--from-png", path, "--steps", "6", "--cache", "0.5", "-o", "cached.png"],
                   tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert text_of(tmp_path / "cached.png")["cache"] == "0.5"
    proc = run_cli(["generate", "--from-png", tmp_path / "cached.png", "--blocks", "stream", "-o", "again.png"],
                   tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert text_of(tmp_path / "again.png")["cache"] == "0.5" and "blocks" not in text_of(tmp_path / "again.png")
    np.testing.assert_array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "cached.png"))


def test_img2img_keeps_input_size(model, env, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 36, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    proc = run_cli(["img2img", "a blue square", "--image", "in.png", "--model", model, "--seed", "3",
                    "-o", "out.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (36, 28)
    text = text_of(tmp_path / "out.png")
    assert (text["mode"], text["strength"], text["width"], text["height"]) == ("img2img", "0.75", "36", "28")
    assert text["image"] == str((tmp_path / "in.png").absolute())


def test_inpaint_keeps_input_size(model, env, tmp_path):
    Image.new("RGB", (40, 24), (200, 40, 40)).save(tmp_path / "in.png")
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (10, 6, 26, 18))
    mask.save(tmp_path / "mask.png")
    proc = run_cli(["inpaint", "a yellow disk", "--image", "in.png", "--mask", "mask.png", "--strength", "0.9",
                    "--model", model, "--seed", "5", "-o", "out.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (40, 24)
    text = text_of(tmp_path / "out.png")
    assert (text["mode"], text["strength"], text["seed"]) == ("inpaint", "0.9", "5")
    assert text["mask"] == str((tmp_path / "mask.png").absolute())


def test_existing_output_is_kept_and_checked_before_loading(env, tmp_path):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"precious")
    # the model does not exist: the error must be about the output, so that check ran before any loading
    proc = run_cli(["generate", "a cat", "--model", tmp_path / "no-such-model", "-o", existing], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--overwrite")
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]


def test_corrupt_checkpoint_is_one_line(model, env, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = run_cli(["generate", "a cat", "--model", broken, "-o", "out.png"], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "diffusion_pytorch_model.safetensors")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "out.png").exists()


def test_too_long_prompt_is_one_line(model, env, tmp_path):
    proc = run_cli(["generate", "a red circle on a blue background", "--model", model, "--max-sequence-length", "4",
                    "-o", "out.png"], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "max_sequence_length 4")
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(env, tmp_path):
    proc = run_cli(["generate", "a cat", "--model", tmp_path / "nowhere", "--debug"], tmp_path, env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert proc.stderr.splitlines()[-1].startswith("rectiflux: error: ")
    assert list(tmp_path.iterdir()) == []


def test_python_m_version(env, tmp_path):
    proc = run_cli(["--version"], tmp_path, env, command=[sys.executable, "-m", "rectiflux"])
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"rectiflux {rectiflux.__version__}"


# ----------------------------------------------------------------------------------------------------------------
# in-process: everything refused before a model is loaded

@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "image.png")
    Image.new("L", (32, 32), 255).save(folder / "mask.png")
    Image.new("L", (32, 24), 255).save(folder / "small-mask.png")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    (folder / "notes.png").write_text("not an image")
    Image.new("RGB", (32, 32)).save(folder / "plain.png")  # no recipe
    info = PngInfo()
    info.add_itxt("rectiflux_version", rectiflux.__version__)
    info.add_itxt("prompt", "a cat")
    info.add_itxt("steps", "0")
    Image.new("RGB", (32, 32)).save(folder / "bad-recipe.png", pnginfo=info)
    return folder


IN = "inputs"
BAD_INPUTS = [
    (["generate"], "give a PROMPT"),
    (["generate", "x", "--width", "8"], "at least 16"),
    (["generate", "x", "--height", "32.5"], "whole number"),
    (["generate", "x", "--width", "9000"], "width must be from 16 to"),
    (["generate", "x", "--steps", "0"], "argument --steps"),
    (["generate", "x", "--num-images", "0"], "argument --num-images"),
    (["generate", "x", "--seed", "-1"], "argument --seed"),
    (["generate", "x", "--true-cfg", "-1"], "argument --true-cfg"),
    (["generate", "x", "--guidance", "nan"], "finite"),
    (["generate", "x", "--max-sequence-length", "600"], "at most 512"),
    (["generate", "x", "--dtype", "float64"], "argument --dtype"),
    (["generate", "x", "--cache", "-0.5"], "argument --cache"),
    (["generate", "x", "--blocks", "later"], "argument --blocks"),
    (["generate", "x", "-o", "out.jpg"], "must end in .png"),
    (["generate", "--from-png", "missing.png"], "no PNG file"),
    (["generate", "--from-png", f"{IN}/plain.png"], "no rectiflux recipe"),
    (["generate", "--from-png", f"{IN}/bad-recipe.png"], "bad recipe value for steps"),
    (["img2img", "x", "--image", "missing.png"], "no image file"),
    (["img2img", "x", "--image", f"{IN}/notes.png"], "cannot read image"),
    (["img2img", "x", "--image", f"{IN}/tiny.png"], "is 8x8"),
    (["img2img", "x", "--image", f"{IN}/image.png", "--strength", "0"], "(0, 1]"),
    (["img2img", "x", "--image", f"{IN}/image.png", "--strength", "1.5"], "(0, 1]"),
    (["img2img", "x"], "needs --image"),
    (["inpaint", "x", "--image", f"{IN}/image.png"], "needs --mask"),
    (["inpaint", "x", "--image", f"{IN}/image.png", "--mask", f"{IN}/small-mask.png"], "mask is 32x24"),
    (["generate", "x", "--device", "meta"], "cannot run a pipeline"),
    (["generate", "x", "--device", "cuda:0"], "no CUDA device"),
    (["generate", "x", "-o", "/proc/x.png"], "cannot write /proc/x.png"),
    (["fill", "x", "--image", f"{IN}/image.png"], "fill needs --mask"),
    (["control", "x"], "control needs --control-image"),
    (["edit", "x"], "edit needs --image"),
    ([], "give a command"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_INPUTS, ids=[" ".join(a) or "nothing" for a, _ in BAD_INPUTS])
def test_bad_input_is_refused_before_loading(argv, fragment, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    # a model that does not exist: were the input let through, the error would be about the model instead
    model = ["--model", str(tmp_path / "no-such-model")] if argv else []
    assert cli.main([*argv, *model]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err, fragment)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_unknown_model_path_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "x", "--model", str(tmp_path / "no-such-model"), "--width", "32"]) == 2
    assert_one_error_line(capsys.readouterr().err, "no model at")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# in-process: the pieces

def test_output_names():
    assert output_paths(None, 7, 1) == [Path("rectiflux-7.png")]
    assert output_paths("a/b.png", 7, 2) == [Path("a/b-1.png"), Path("a/b-2.png")]
    assert output_paths("a/", 7, 1) == [Path("a/rectiflux-7.png")]


def test_write_png_never_replaces_a_file_that_appeared(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"someone else's")
    with pytest.raises(cli.UsageError, match="appeared"):
        write_png(Image.new("RGB", (4, 4)), target, {"prompt": "p"}, overwrite=False)
    assert target.read_bytes() == b"someone else's"
    write_png(Image.new("RGB", (4, 4), (1, 2, 3)), target, {"prompt": "crème brûlée"}, overwrite=True)
    assert text_of(target) == {"prompt": "crème brûlée"}  # iTXt keeps any text
    assert pixels(target)[0, 0].tolist() == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_weight_hash_is_cached_by_size_and_mtime(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    cache = tmp_path / "cache"
    assert weights_sha256([a], cache) == hashlib.sha256(b"weights a").hexdigest()
    # a cached entry is trusted while size and mtime match: prove it is read by planting a fake one
    table = json.loads((cache / "weight-hashes.json").read_text())
    table[str(a.absolute())]["sha256"] = "f" * 64
    (cache / "weight-hashes.json").write_text(json.dumps(table))
    assert weights_sha256([a], cache) == "f" * 64
    os.utime(a, ns=(0, 10**9))  # another mtime: hashed again
    assert weights_sha256([a], cache) == hashlib.sha256(b"weights a").hexdigest()
    shards = weights_sha256([a, b], cache)
    assert shards not in (weights_sha256([a], cache), weights_sha256([b], cache))
    assert len(shards) == 64


def test_step_timer_leaves_out_the_first_step():
    timer = StepTimer()
    for _ in range(2):
        timer.start()
        for step in range(1, 4):
            timer(step, 3)
    assert timer.seconds_per_step > 0 and len(timer.intervals) == 4  # each image's first step (prompt encoding) out


# ----------------------------------------------------------------------------------------------------------------
# the holes a new user falls into

def test_prompt_that_is_not_utf8_is_refused(model, env, tmp_path):
    proc = subprocess.run([*COMMAND, "generate", b"a red \xff circle", "--model", str(model), "-o", "out.png"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


def test_summary_counts_the_steps_that_ran_and_the_cached_ones(model, env, tmp_path):
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "in.png")
    proc = run_cli(["img2img", "a blue square", "--image", "in.png", "--model", model, "--steps", "4",
                    "--strength", "0.5", "--seed", "1", "-o", "out.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert " 2 steps at " in proc.stdout  # 4 steps at strength 0.5: 2 ran
    proc = run_cli(["generate", "a blue square", "--model", model, "--steps", "6", "--cache", "0.5", "--seed", "1",
                    "-o", "cached.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r" 6 steps, \d of them cached at ", proc.stdout), proc.stdout


def test_changed_inputs_of_a_recipe_are_refused_unless_forced(model, env, tmp_path):
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "in.png")
    proc = run_cli(["img2img", "a blue square", "--image", "in.png", "--model", model, "--seed", "2",
                    "-o", "out.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    source_sha = hashlib.sha256((tmp_path / "in.png").read_bytes()).hexdigest()
    assert text_of(tmp_path / "out.png")["image_sha256"] == source_sha
    Image.new("RGB", (32, 32), (40, 200, 40)).save(tmp_path / "in.png")
    proc = run_cli(["generate", "--from-png", "out.png", "-o", "again.png"], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "has changed since out.png was made")
    assert "--force" in proc.stderr and not (tmp_path / "again.png").exists()
    proc = run_cli(["generate", "--from-png", "out.png", "-o", "again.png", "--force"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("rectiflux: warning: ") and "has changed" in proc.stderr


def test_bfl_file_with_vae_and_text_encoders_options(model, env, tmp_path):
    from rectiflux.weights.transformer import load_transformer, save_transformer

    save_transformer(load_transformer(model), tmp_path / "flux1-dev.safetensors", layout="bfl")
    shutil.copytree(model / "vae", tmp_path / "vae")  # the tiny VAE's 8 groups do not show in a BFL file's shapes
    proc = run_cli(["generate", "a blue square", "--model", "flux1-dev.safetensors", "-o", "x.png"], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--vae")
    args = ["--model", "flux1-dev.safetensors", "--vae", "vae", "--text-encoders", model,
            "--width", "32", "--height", "32", "--steps", "2", "--seed", "4", "--max-sequence-length", "16"]
    proc = run_cli(["generate", "a blue square", *args, "-o", "bfl.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert text_of(tmp_path / "bfl.png")["vae"] == str((tmp_path / "vae").absolute())
    proc = run_cli(["generate", "a blue square", "--model", model, *args[6:], "--guidance", "3.5", "-o", "dir.png"],
                   tmp_path, env)
    np.testing.assert_array_equal(pixels(tmp_path / "bfl.png"), pixels(tmp_path / "dir.png"))
    proc = run_cli(["generate", "--from-png", "bfl.png", "-o", "again.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "bfl.png"))


def test_a_diffusers_transformer_file_and_bad_model_settings_are_named(model, env, tmp_path):
    file = model / "transformer" / "diffusion_pytorch_model.safetensors"
    proc = run_cli(["generate", "a cat", "--model", file, "-o", "x.png"], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"is the transformer of the diffusers folder {model}: pass the folder")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "rectiflux.json").write_text(json.dumps({**MODEL_DEFAULTS, "steps": "many"}))
    proc = run_cli(["generate", "a cat", "--model", broken, "-o", "x.png"], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"{broken / 'rectiflux.json'}: bad value for steps")


def test_sigterm_while_writing_leaves_no_temporary_file(env, tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from PIL import PngImagePlugin
        from rectiflux import cli
        save = PngImagePlugin._save
        def slow_save(im, fp, filename, **kw):
            fp.write(b"half a png")
            fp.flush()
            print("writing", flush=True)
            time.sleep(60)
        PngImagePlugin._save = slow_save
        PngImagePlugin.Image.register_save("PNG", slow_save)
        sys.exit(cli.main(["generate", "a large red circle on the left on a white background", "-o", "out.png"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temporary file is there now
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "rectiflux: terminated"
    assert list(tmp_path.iterdir()) == []


def test_a_shapes_size_it_never_saw_is_one_warning_line(env, tmp_path):
    proc = run_cli(["generate", "a large red circle on the left", "--width", "96", "--height", "64", "--steps", "1",
                    "-o", "x.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["rectiflux: warning: shapes was trained on 64x64 images only: at 96x64 it will "
                                        "likely draw repeated tiles or noise"]


def test_train_refuses_to_overwrite_a_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "run" / "ae").mkdir(parents=True)
    (tmp_path / "run" / "ae" / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--out", "run", "--stages", "ae"]) == 2
    assert_one_error_line(capsys.readouterr().err, "pass --resume to continue it or --overwrite")
    assert cli.main(["train", "--out", "run", "--resume", "--overwrite"]) == 2
    assert (tmp_path / "run" / "ae" / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_lora_option_recipe_and_changed_file(model, env, tmp_path):
    from rectiflux.weights.checkpoint import save_state_dict

    g = torch.Generator().manual_seed(0)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 16, generator=g) * 0.5,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(48, 4, generator=g) * 0.5,
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    save_state_dict(lora, tmp_path / "style.safetensors")
    args = ["generate", "a blue square", "--model", model, "--seed", "6"]
    assert run_cli([*args, "-o", "plain.png"], tmp_path, env).returncode == 0
    proc = run_cli([*args, "--lora", "style.safetensors:0.8", "-o", "lora.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads(text_of(tmp_path / "lora.png")["loras"])
    assert recorded == [{"file": str(tmp_path / "style.safetensors"), "name": "style.safetensors", "scale": 0.8,
                         "sha256": hashlib.sha256((tmp_path / "style.safetensors").read_bytes()).hexdigest()}]
    assert not np.array_equal(pixels(tmp_path / "lora.png"), pixels(tmp_path / "plain.png"))
    proc = run_cli(["generate", "--from-png", "lora.png", "-o", "again.png"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "lora.png"))
    save_state_dict({**lora, "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)},
                    tmp_path / "style.safetensors")
    proc = run_cli(["generate", "--from-png", "lora.png", "-o", "changed.png"], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "no longer matches the one that made lora.png")
    save_state_dict({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 16)}, tmp_path / "bad.safetensors")
    proc = run_cli([*args, "--lora", "bad.safetensors", "-o", "bad.png"], tmp_path, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "no module of this pipeline takes: lora_unet_nowhere.lora_down.weight")


glibc = pytest.mark.skipif(cli.environment_without_tcache({}) is None, reason="glibc's heap")


@glibc
def test_environment_without_tcache():
    assert cli.environment_without_tcache({"HOME": "/root"}) == {"HOME": "/root", "GLIBC_TUNABLES": cli.TCACHE_OFF}
    joined = cli.environment_without_tcache({"GLIBC_TUNABLES": "glibc.malloc.mxfast=0"})
    assert joined == {"GLIBC_TUNABLES": f"glibc.malloc.mxfast=0:{cli.TCACHE_OFF}"}
    assert cli.environment_without_tcache({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}) is None  # the user's
    assert cli.environment_without_tcache({"RECTIFLUX_KEEP_FREED_MEMORY": "0"}) is None


@glibc
def test_the_program_restarts_itself_so_that_freed_blocks_merge(tmp_path):
    # a freed block then a new one of the same size, 8 times, in a heap that keeps freed memory: with glibc's
    # per-thread cache each 64-byte-aligned block's small leftover keeps it apart, and the heap grows every time
    code = textwrap.dedent("""
        import os, sys
        from rectiflux.cli import main
        if "GLIBC_TUNABLES" not in os.environ:
            main()  # as the program: replaces this process by the same command, so never returns
            sys.exit("not restarted")
        import torch
        from rectiflux.runtime import heap
        def resident_mib():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        heap.keep_freed_memory("cpu")
        before = resident_mib()
        for _ in range(8):
            block = torch.empty(8 << 20).fill_(1.0)  # 32 MiB
            del block
            torch.empty(8 << 20).fill_(1.0)
        print(os.environ["GLIBC_TUNABLES"], resident_mib() - before)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RECTIFLUX_KEEP_FREED_MEMORY")}
    program = tmp_path / "rectiflux"  # the console script's name: other programs calling main() are not restarted
    program.write_text(code)
    out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    tunables, growth = out.stdout.split()
    assert tunables == cli.TCACHE_OFF
    assert float(growth) < 64  # one block's 32 MiB, reused (with the cache: 8 blocks' worth)
    program.rename(tmp_path / "notebook.py")
    out = subprocess.run([sys.executable, str(tmp_path / "notebook.py")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode != 0 and "not restarted" in out.stderr
