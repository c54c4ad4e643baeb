"""The shapes world's checker: the attributes an image shows, read with pixel arithmetic, against a scene.

The rules are those of the world's definition (docs/shapes.md, "The checker"): background from the border,
the shape's pixels as those far from it, color from their mean, position from their bounding box's centre, size
from its extent, and the shape from the box's fill ratio and width profile, compared with those of the ideal
shapes. They were fixed before the second edition of the model was evaluated; tests/test_shapes.py shows them
right on clean, jittered, aliased, noisy and blurred renders.
"""

from __future__ import annotations

import functools
from dataclasses import asdict

import numpy as np
from PIL import Image

from .world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    POSITION_JITTER,
    POSITIONS,
    SHAPES,
    SIZE_JITTER,
    SIZES,
    Scene,
    coverage,
    inside_shape,
)

PROFILE_BANDS = 16  # horizontal bands of the bounding box whose mean widths make the width profile
# a box whose profile is further than this from every ideal shape's is read as no shape: above what renders
# reach at the stated noise and blur levels, below the distance of the two closest ideal shapes (triangle and
# cross); tests/test_shapes.py holds both
UNREADABLE = 0.35


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda k: float(np.sum((value - np.array(palette[k], float)) ** 2)))


def width_profile(widths: np.ndarray, bands: int = PROFILE_BANDS) -> np.ndarray:
    """Row widths from the top of the box to its bottom (fractions of the box's width), averaged in bands."""
    fine = bands * 8
    rows = np.interp((np.arange(fine) + 0.5) / fine, (np.arange(len(widths)) + 0.5) / len(widths), widths)
    return rows.reshape(bands, 8).mean(axis=1)


@functools.cache
def ideal_profile(shape: str) -> tuple[np.ndarray, float]:
    """The width profile and fill ratio of the ideal shape, from its definition (the one render() draws) on a
    256 px box."""
    n = 256
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    box = inside_shape(shape, x, y, 0.5, 0.5, 1.0)
    return width_profile(box.mean(axis=1)), float(box.mean())


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in all eight directions."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The 8-connected region of `mask` with the most pixels (stray specks elsewhere are not the shape)."""
    remaining, best = mask.copy(), np.zeros_like(mask)
    while remaining.any():
        region = np.zeros_like(mask)
        region.flat[np.flatnonzero(remaining)[0]] = True
        while True:  # grow within the mask until it stops
            grown = _dilate(region) & remaining
            if (grown == region).all():
                break
            region = grown
        remaining &= ~region
        if region.sum() > best.sum():
            best = region
    return best


UPSAMPLE = 4  # the coverage is read at a quarter pixel: a box off by a pixel would move a 16 px shape's fill by 1/8


def box_features(alpha: np.ndarray, blob: np.ndarray) -> tuple[tuple[float, float, float, float], np.ndarray, float]:
    """The shape's box (left, top, right, bottom, in pixels), width profile and fill ratio, from its coverage.

    The shape is `blob` (the largest region more than half covered) with the partly covered pixels around it;
    its coverage is interpolated to a quarter pixel and cut at one half there, which puts straight edges within
    a fraction of a pixel of where they are and loses less than half a pixel of a triangle's thin apex and
    corners.
    """
    near = _dilate(_dilate(blob))
    h, w = alpha.shape
    fine = np.asarray(Image.fromarray(np.where(near, alpha, 0.0).astype(np.float32), mode="F")
                      .resize((w * UPSAMPLE, h * UPSAMPLE), Image.BILINEAR)) >= 0.5
    ys, xs = np.nonzero(fine)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = fine[y0:y1, x0:x1]
    return ((x0 / UPSAMPLE, y0 / UPSAMPLE, x1 / UPSAMPLE, y1 / UPSAMPLE), width_profile(box.mean(axis=1)),
            float(box.mean()))


def shape_distances(profile: np.ndarray, fill: float, shapes: tuple[str, ...] = SHAPES) -> dict[str, float]:
    """How far a width profile and fill ratio are from each ideal shape's (mean absolute difference of the
    profile plus that of the fill ratio)."""
    distances = {}
    for shape in shapes:
        ideal, ideal_fill = ideal_profile(shape)
        distances[shape] = float(np.abs(profile - ideal).mean() + abs(fill - ideal_fill))
    return distances


def classify_shape(profile: np.ndarray, fill: float, shapes: tuple[str, ...] = SHAPES) -> str | None:
    """The ideal shape nearest the width profile and fill ratio; None when none is near."""
    distances = shape_distances(profile, fill, shapes)
    best = min(distances, key=distances.get)
    return best if distances[best] <= UNREADABLE else None


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=float)
    if px.max() <= 1.0 and np.asarray(image).dtype != np.uint8:
        px = px * 255
    return px


def read_scene(image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> dict[str, str | None]:
    """The attributes an image shows: background from the border, the shape from the pixels far from it."""
    px = _pixels(image)
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
    blob = largest_blob(coverage_of(px, bg, np.array(COLORS[found["color"]], float)) >= 0.5)
    if blob.sum() < 20:
        return found
    # the color again, from the blob's inside only: noise far from the shape no longer counts
    inner = blob & ~_dilate(~blob)
    found["color"] = _nearest(px[inner if inner.sum() >= 4 else blob].mean(axis=0), COLORS)
    alpha = coverage_of(px, bg, np.array(COLORS[found["color"]], float))
    blob = largest_blob(alpha >= 0.5)
    if blob.sum() < 20:
        return found
    (left, top, right, bottom), profile, fill = box_features(alpha, blob)
    # position from the box's centre, as the world defines it; the pixel centroid would not do: a large
    # triangle's sits 5 px below its box's centre, which with 3 px of jitter reads "in the center" as "at the
    # bottom" on clean renders
    dx, dy = (left + right) / 2 - 32, (top + bottom) / 2 - 32
    if abs(dx) <= 6 and abs(dy) <= 6:
        found["position"] = "center"
    elif abs(dx) >= abs(dy):
        found["position"] = "left" if dx < 0 else "right"
    else:
        found["position"] = "top" if dy < 0 else "bottom"
    extent = max(right - left, bottom - top)
    found["size"] = "small" if extent < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    found["shape"] = classify_shape(profile, fill, shapes)
    return found


def coverage_of(px: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """How much of each pixel the shape covers, read as where its color lies between background and foreground."""
    axis = fg - bg
    return np.clip(((px - bg) @ axis) / (axis @ axis), 0.0, 1.0)


def score(scene: Scene, image: Image.Image | np.ndarray, shapes: tuple[str, ...] = SHAPES) -> dict[str, bool]:
    """Per attribute, whether the image shows what the scene asks; plus `all`. `shapes` are those it may read."""
    return compare(scene, read_scene(image, shapes))


def compare(scene: Scene, found: dict[str, str | None]) -> dict[str, bool]:
    """Per attribute, whether what was read is what the scene asks; plus `all`."""
    want = asdict(scene)
    result = {a: found[a] == want[a] for a in ATTRIBUTES}
    result["all"] = all(result.values())
    return result


# ----------------------------------------------------------------------------------------------------------------
# shape quality: the drawn shape's pixels against the ideal render of the scene

def shape_mask(scene: Scene, image: Image.Image | np.ndarray) -> np.ndarray:
    """The pixels more than half covered by the scene's color over its background."""
    bg, fg = np.array(BACKGROUNDS[scene.background], float), np.array(COLORS[scene.color], float)
    return coverage_of(_pixels(image), bg, fg) > 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def shape_iou(scene: Scene, image: Image.Image | np.ndarray) -> float:
    """IoU of the drawn shape's pixels with the ideal shape of the scene's attributes, at the best size and offset
    the world's jitter allows (searched on a 1 px grid, then refined to a quarter pixel)."""
    drawn = shape_mask(scene, image)
    cx0, cy0 = POSITIONS[scene.position]
    s0 = SIZES[scene.size]

    def iou_at(dx: float, dy: float, ds: float) -> float:
        return _iou(drawn, coverage(scene.shape, cx0 + dx, cy0 + dy, s0 + ds, supersample=1) >= 0.5)

    limits = (POSITION_JITTER, POSITION_JITTER, SIZE_JITTER)
    grid = [np.arange(-lim, lim + 1e-9, 1.0) for lim in limits]
    best = max((iou_at(dx, dy, ds), (dx, dy, ds)) for dx in grid[0] for dy in grid[1] for ds in grid[2])
    for step in (0.5, 0.25):
        centre = best[1]
        for offsets in np.ndindex(3, 3, 3):
            point = tuple(float(np.clip(c + (o - 1) * step, -lim, lim))
                          for c, o, lim in zip(centre, offsets, limits, strict=True))
            best = max(best, (iou_at(*point), point))
    return best[0]
