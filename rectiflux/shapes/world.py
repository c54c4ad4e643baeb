"""The shapes world (v1): 64x64 images of one shape on a plain background, and their captions.

Every image can be checked against its prompt with pixel arithmetic (`checker.py`), so prompt fidelity is a number.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 64
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
          "purple": (140, 60, 190), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 16, "large": 32}
SIZE_JITTER, POSITION_JITTER = 2.0, 3.0  # px, at most
POSITIONS = {"center": (32, 32), "left": (20, 32), "right": (44, 32), "top": (32, 20), "bottom": (32, 44)}
POSITION_WORDS = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
                  "bottom": "at the bottom"}
# a shape outside the world, for teaching the embedded model a concept it has never seen with a LoRA
# (python -m benchmarks.concept); a new color would not do: the autoencoder, trained on the world's six, decodes
# any other color as one of them
NEW_SHAPES = ("diamond",)
HELD_OUT = {("purple", "triangle"), ("orange", "circle"), ("green", "cross"), ("yellow", "square")}
ATTRIBUTES = ("background", "color", "shape", "size", "position")


@dataclass(frozen=True)
class Scene:
    background: str
    color: str
    shape: str
    size: str
    position: str

    def caption(self) -> str:
        """The canonical caption, the form evaluation prompts use."""
        return (f"a {self.size} {self.color} {self.shape} {POSITION_WORDS[self.position]} "
                f"on a {self.background} background")


def all_scenes(held_out: bool | None = None) -> list[Scene]:
    """Every scene; held_out=True only the held-out color-shape pairs, False only the seen ones."""
    scenes = [Scene(*combo) for combo in itertools.product(BACKGROUNDS, COLORS, SHAPES, SIZES, POSITIONS)]
    if held_out is None:
        return scenes
    return [s for s in scenes if ((s.color, s.shape) in HELD_OUT) == held_out]


def random_scene(rng: random.Random, allow_held_out: bool = False) -> Scene:
    while True:
        scene = Scene(rng.choice(list(BACKGROUNDS)), rng.choice(list(COLORS)), rng.choice(SHAPES),
                      rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))
        if allow_held_out or (scene.color, scene.shape) not in HELD_OUT:
            return scene


def vocabulary() -> list[str]:
    """Every word a caption of the world can hold, sorted."""
    words = {"a", "on", "background", *BACKGROUNDS, *COLORS, *SHAPES, *SIZES}
    for phrase in POSITION_WORDS.values():
        words.update(phrase.split())
    return sorted(words)


def random_caption(scene: Scene, rng: random.Random) -> str:
    """A training caption: color and shape always; size, position and background each left out at times,
    in a few word orders, so the model learns the words rather than one sentence."""
    size = scene.size if rng.random() < 0.8 else None
    position = POSITION_WORDS[scene.position] if rng.random() < 0.8 else None
    background = f"on a {scene.background} background" if rng.random() < 0.8 else None
    noun = " ".join(w for w in (size, scene.color, scene.shape) if w)
    if rng.random() < 0.7:
        parts = [f"a {noun}", position, background]
    else:
        parts = [f"a {noun}", background, position]
    return " ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------------------------
# drawing

def inside_shape(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, s: float) -> np.ndarray:
    """Whether each point (x, y) lies inside the shape whose s x s box is centred at (cx, cy)."""
    dx, dy, half = x - cx, y - cy, s / 2
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex at the top middle, base along the bottom of the box
        t = (dy + half) / s  # 0 at the top, 1 at the bottom
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)
    if shape == "cross":
        arm = s / 6
        in_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        return in_box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    if shape == "diamond":  # not of the world: the square turned 45 degrees, corners at the box's side middles
        return np.abs(dx) + np.abs(dy) <= half
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, cx: float, cy: float, s: float, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel inside the shape, from supersample x supersample points per pixel (1: the
    pixel's centre only, an aliased render)."""
    n = SIZE * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    inside = inside_shape(shape, x, y, cx, cy, s)
    return inside.reshape(SIZE, supersample, SIZE, supersample).mean(axis=(1, 3))


def render(scene: Scene, rng: random.Random | None = None, antialias: bool = True) -> Image.Image:
    """Draw a scene; with `rng`, size and position get the world's jitter (2 px and 3 px at most)."""
    cx, cy = POSITIONS[scene.position]
    s = SIZES[scene.size]
    if rng is not None:
        s += rng.uniform(-SIZE_JITTER, SIZE_JITTER)
        cx, cy = cx + rng.uniform(-POSITION_JITTER, POSITION_JITTER), cy + rng.uniform(-POSITION_JITTER,
                                                                                         POSITION_JITTER)
    alpha = coverage(scene.shape, cx, cy, s, 4 if antialias else 1)[..., None]
    bg, fg = np.array(BACKGROUNDS[scene.background], float), np.array(COLORS[scene.color], float)
    pixels = alpha * fg + (1 - alpha) * bg
    return Image.fromarray(pixels.round().astype(np.uint8))


def drawn_scenes(seed: int, per_pair: int) -> list[Scene]:
    """A fresh prompt set drawn from `seed`: every color-shape pair `per_pair` times (held-out pairs included),
    each with a random background and position, half of them small and half large (odd counts alternate)."""
    rng = random.Random(seed)
    scenes = []
    for i, (color, shape) in enumerate(itertools.product(COLORS, SHAPES)):
        for j in range(per_pair):
            size = list(SIZES)[(i + j) % 2]
            scenes.append(Scene(rng.choice(list(BACKGROUNDS)), color, shape, size, rng.choice(list(POSITIONS))))
    return scenes


def eval_scenes(per_pair: int = 5, held_out: bool | None = None) -> list[Scene]:
    """A fixed, balanced prompt set: every color-shape pair `per_pair` times, cycling background, size and
    position so each of their values is covered."""
    others = list(itertools.product(BACKGROUNDS, SIZES, POSITIONS))
    scenes = []
    for i, (color, shape) in enumerate(itertools.product(COLORS, SHAPES)):
        if held_out is not None and ((color, shape) in HELD_OUT) != held_out:
            continue
        for j in range(per_pair):
            bg, size, pos = others[(i * 7 + j * 11) % len(others)]
            scenes.append(Scene(bg, color, shape, size, pos))
    return scenes
