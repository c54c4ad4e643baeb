"""The shapes world (v1): 64x64 images of one shape on a plain background, their captions, and a checker.

Every image can be checked against its prompt with pixel arithmetic, so prompt fidelity is a number.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

SIZE = 64
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
          "purple": (140, 60, 190), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 16, "large": 32}
POSITIONS = {"center": (32, 32), "left": (20, 32), "right": (44, 32), "top": (32, 20), "bottom": (32, 44)}
POSITION_WORDS = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
                  "bottom": "at the bottom"}
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

def _coverage(shape: str, cx: float, cy: float, s: float, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel inside the shape, by supersampling (anti-aliased edges)."""
    n = SIZE * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    dx, dy, half = x - cx, y - cy, s / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex at the top middle, base along the bottom of the box
        t = (dy + half) / s  # 0 at the top, 1 at the bottom
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)
    elif shape == "cross":
        arm = s / 6
        in_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        inside = in_box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(SIZE, supersample, SIZE, supersample).mean(axis=(1, 3))


def render(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """Draw a scene; with `rng`, size and position get the world's jitter (2 px and 3 px at most)."""
    cx, cy = POSITIONS[scene.position]
    s = SIZES[scene.size]
    if rng is not None:
        s += rng.uniform(-2, 2)
        cx, cy = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
    alpha = _coverage(scene.shape, cx, cy, s)[..., None]
    bg, fg = np.array(BACKGROUNDS[scene.background], float), np.array(COLORS[scene.color], float)
    pixels = alpha * fg + (1 - alpha) * bg
    return Image.fromarray(pixels.round().astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# checking

def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda k: float(np.sum((value - np.array(palette[k], float)) ** 2)))


def _classify_shape(box: np.ndarray) -> str:
    """Name the shape filling a bounding box, from its width profile, its corners and its fill ratio.

    Generated shapes have soft, rounded edges, so each test is one a rounded version still passes: a triangle
    is the only shape wider at the bottom than at the top, a square the only one with filled corners, and a
    circle fills its box (pi/4) far more than a cross does (5/9).
    """
    h, w = box.shape
    widths = box.sum(axis=1)
    third = max(h // 3, 1)
    top, bottom = widths[:third].mean(), widths[-third:].mean()
    if bottom > 1.5 * max(top, 1e-6):
        return "triangle"
    ch, cw = max(h // 4, 1), max(w // 4, 1)
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    if corners > 0.6:
        return "square"
    return "circle" if box.mean() > 0.67 else "cross"


def read_scene(image: Image.Image | np.ndarray) -> dict[str, str | None]:
    """The attributes an image shows: background from the border, the shape from the pixels far from it."""
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=float)
    if px.max() <= 1.0 and px.dtype != np.uint8:
        px = px * 255
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((px - bg) ** 2).sum(-1))
    found = {"background": _nearest(bg, BACKGROUNDS), "color": None, "shape": None, "size": None, "position": None}
    candidates = dist > 40
    if candidates.sum() < 20:
        return found
    # color from the pixels well inside the shape, where anti-aliasing has not mixed in the background
    core = dist >= np.quantile(dist[candidates], 0.5)
    color = px[core].mean(axis=0)
    found["color"] = _nearest(color, COLORS)
    mask = dist > 0.5 * np.sqrt(((color - bg) ** 2).sum())
    ys, xs = np.nonzero(mask)
    if len(xs) < 20:
        return found
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    dx, dy = cx - 32, cy - 32
    if abs(dx) <= 6 and abs(dy) <= 6:
        found["position"] = "center"
    elif abs(dx) >= abs(dy):
        found["position"] = "left" if dx < 0 else "right"
    else:
        found["position"] = "top" if dy < 0 else "bottom"
    extent = max(x1 - x0, y1 - y0) + 1
    found["size"] = "small" if extent < 24 else "large"
    box = mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1]
    found["shape"] = _classify_shape(box)
    return found


def score(scene: Scene, image: Image.Image | np.ndarray) -> dict[str, bool]:
    """Per attribute, whether the image shows what the scene asks; plus `all`."""
    found = read_scene(image)
    want = asdict(scene)
    result = {a: found[a] == want[a] for a in ATTRIBUTES}
    result["all"] = all(result.values())
    return result


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
