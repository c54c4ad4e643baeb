"""The shapes world: renders follow the spec, captions name what is drawn, and the checker reads clean renders."""

import random

import numpy as np
import pytest

from rectiflux.shapes.checker import read_scene, score
from rectiflux.shapes.world import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    Scene,
    all_scenes,
    eval_scenes,
    random_caption,
    random_scene,
    render,
)


def test_every_scene_reads_back_from_a_jittered_render():
    rng = random.Random(0)
    failures = [s for s in all_scenes() for _ in range(2) if not score(s, render(s, rng))["all"]]
    assert failures == []


def test_render_follows_the_spec():
    img = np.asarray(render(Scene("white", "red", "square", "large", "left")))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == BACKGROUNDS["white"]
    assert tuple(img[32, 20]) == COLORS["red"]  # the square's centre is the left position (20, 32)
    ys, xs = np.nonzero((img != 255).any(-1))
    assert xs.min() == 4 and xs.max() == 35 and ys.min() == 16 and ys.max() == 47  # 32 px box
    tri = np.asarray(render(Scene("black", "blue", "triangle", "large", "center"))).any(-1)
    assert tri[17].sum() < 6 and tri[46].sum() > 28  # apex at the top, base along the bottom
    cross = np.asarray(render(Scene("black", "blue", "cross", "large", "center"))).any(-1)
    assert cross[20].sum() == pytest.approx(32 / 3, abs=2) and cross[32].sum() == pytest.approx(32, abs=1)


def test_checker_rejects_wrong_attributes():
    img = render(Scene("gray", "green", "circle", "small", "top"))
    assert read_scene(img) == {"background": "gray", "color": "green", "shape": "circle", "size": "small",
                               "position": "top"}
    wrong = score(Scene("gray", "blue", "square", "large", "bottom"), img)
    assert not any(wrong[a] for a in ("color", "shape", "size", "position", "all")) and wrong["background"]
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert read_scene(blank)["shape"] is None and not score(Scene("white", "red", "circle", "small", "left"),
                                                            blank)["all"]


def test_training_scenes_avoid_held_out_pairs_and_captions_name_what_is_drawn():
    rng = random.Random(1)
    for _ in range(500):
        scene = random_scene(rng)
        assert (scene.color, scene.shape) not in HELD_OUT
        caption = random_caption(scene, rng)
        assert scene.color in caption and scene.shape in caption
        for value, words in [(scene.size, scene.size), (scene.background, f"{scene.background} background")]:
            assert words in caption or value not in caption
    assert len(all_scenes(held_out=True)) == 4 * 3 * 2 * 5


def test_eval_set_covers_every_value_and_is_fixed():
    scenes = eval_scenes(5)
    assert scenes == eval_scenes(5) and len(scenes) == 24 * 5
    for attr, values in [("background", BACKGROUNDS), ("position", POSITIONS), ("size", ("small", "large"))]:
        assert {getattr(s, attr) for s in scenes} == set(values)
    assert {(s.color, s.shape) for s in eval_scenes(1, held_out=True)} == HELD_OUT
    assert Scene("gray", "red", "cross", "small", "top").caption() == \
        "a small red cross at the top on a gray background"
