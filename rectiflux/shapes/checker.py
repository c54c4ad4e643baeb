"""The shapes world's checker: the attributes an image shows, read with pixel arithmetic, against a scene."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from PIL import Image

from .world import ATTRIBUTES, BACKGROUNDS, COLORS, SHAPES, Scene


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda k: float(np.sum((value - np.array(palette[k], float)) ** 2)))


def _classify_shape(box: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> str:
    """Name the shape filling a bounding box, from its width profile, its corners and its fill ratio.

    Generated shapes have soft, rounded edges, so each test is one a rounded version still passes: a triangle
    is the only shape wider at the bottom than at the top, a square the only one with filled corners, and a
    circle fills its box (pi/4) far more than a cross does (5/9). With "diamond" among `shapes` (a shape outside
    the world): the only one that widens linearly from narrow points to full width in the middle.
    """
    h, w = box.shape
    widths = box.sum(axis=1)
    if "diamond" in shapes and h > 2:
        # its width widens linearly to the middle and back: a tent (a circle's profile bulges, a cross's steps)
        rows = np.arange(h)
        tent = 1 - np.abs(rows - (h - 1) / 2) / (h / 2)
        relative = widths / w
        if relative.std() > 0 and np.corrcoef(relative, tent)[0, 1] > 0.955 and relative.mean() < 0.74:
            return "diamond"
    third = max(h // 3, 1)
    top, bottom = widths[:third].mean(), widths[-third:].mean()
    if bottom > 1.5 * max(top, 1e-6):
        return "triangle"
    ch, cw = max(h // 4, 1), max(w // 4, 1)
    corners = np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()])
    if corners > 0.6:
        return "square"
    return "circle" if box.mean() > 0.67 else "cross"


def read_scene(image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> dict[str, str | None]:
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
    found["shape"] = _classify_shape(box, shapes)
    return found


def score(scene: Scene, image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> dict[str, bool]:
    """Per attribute, whether the image shows what the scene asks; plus `all`. `shapes` are those it may read."""
    found = read_scene(image, shapes)
    want = asdict(scene)
    result = {a: found[a] == want[a] for a in ATTRIBUTES}
    result["all"] = all(result.values())
    return result
