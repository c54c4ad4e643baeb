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
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
                "width": "32", "height": "32", "true_cfg": "1.0", "max_sequence_length": "16", "dtype": "float32",
                "model": str(model.absolute()), "model_name": "tiny", "model_hash": sha,
                "rectiflux_version": rectiflux.__version__}
    assert {k: text.get(k) for k in expected} == expected
    assert "strength" not in text and "negative_prompt" not in text and "image" not in text
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
