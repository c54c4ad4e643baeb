"""`rectiflux fill`, `control`, `edit` and `generate --redux-image` through the console script: each PNG's recipe
reproduces it bit for bit with --from-png, and a model of the wrong kind is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_cli import MODEL_DEFAULTS, assert_one_error_line, env, pixels, run_cli, text_of  # noqa: F401
from tiny_models import make_tiny_flux_folder, make_tiny_redux_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    folders = {}
    for variant in ("fill", "control", "kontext", "flux"):
        folder = make_tiny_flux_folder(root / variant, variant=variant)
        (folder / "rectiflux.json").write_text(json.dumps(MODEL_DEFAULTS))
        folders[variant] = folder
    folders["redux"] = make_tiny_redux_folder(root / "redux")
    return folders


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    mask = Image.new("L", (40, 24))
    mask.paste(255, (8, 4, 28, 20))
    mask.save(tmp_path / "mask.png")
    return tmp_path


CASES = {
    "fill": (["fill", "a yellow disk", "--image", "photo.png", "--mask", "mask.png", "--strength", "0.9"],
             {"mode": "fill", "kind": "fill", "strength": "0.9"}),
    "control": (["control", "a yellow disk", "--control-image", "photo.png"], {"mode": "control", "kind": "control"}),
    "kontext": (["edit", "make it blue", "--image", "photo.png", "--keep-reference-size"],
                {"mode": "edit", "kind": "kontext", "keep_reference_size": "true"}),
}


@pytest.mark.parametrize("variant", list(CASES))
def test_variant_command_and_its_recipe(variant, models, env, inputs):  # noqa: F811
    argv, expected = CASES[variant]
    proc = run_cli([*argv, "--model", models[variant], "--seed", "3", "-o", "out.png"], inputs, env)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(inputs / "out.png").size == (40, 24)  # the input's size
    text = text_of(inputs / "out.png")
    assert {k: text.get(k) for k in expected} == expected
    for name in ("image", "mask", "control_image"):
        if name in text:
            assert len(text[f"{name}_sha256"]) == 64
    proc = run_cli(["generate", "--from-png", "out.png", "-o", "again.png"], inputs, env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(pixels(inputs / "again.png"), pixels(inputs / "out.png"))
    proc = run_cli([*argv, "--model", models["flux"], "-o", "wrong.png"], inputs, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "is a text-to-image (FLUX.1-dev or schnell) model")


def test_redux_variations(models, env, inputs):  # noqa: F811
    args = ["generate", "--redux-image", "photo.png", "--redux-model", models["redux"], "--model", models["flux"],
            "--seed", "5"]
    proc = run_cli([*args, "a red circle", "-o", "redux.png"], inputs, env)
    assert proc.returncode == 0, proc.stderr
    text = text_of(inputs / "redux.png")
    assert json.loads(text["redux_images"]) == [str(inputs / "photo.png")] and len(text["redux_image_1_sha256"]) == 64
    proc = run_cli(["generate", "--from-png", "redux.png", "-o", "again.png"], inputs, env)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(pixels(inputs / "again.png"), pixels(inputs / "redux.png"))
    proc = run_cli([*args, "a red circle", "-o", "plain.png", "--redux-model", inputs / "nowhere"], inputs, env)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "no model at")
