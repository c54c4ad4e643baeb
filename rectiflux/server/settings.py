"""A job's settings as the native API takes them (the OpenAI and AUTOMATIC1111 routes translate theirs into these):
each value checked by the command line's own parsers, so a bad value gets the message `rectiflux generate` gives."""

from __future__ import annotations

import argparse
import math
import re
import secrets
from collections.abc import Callable
from typing import Any

from ..cli.options import (
    SEED_LIMIT,
    cache_type,
    count_type,
    guidance_type,
    seed_type,
    sequence_length_type,
    side_type,
    steps_type,
    strength_type,
    true_cfg_type,
)
from ..cli.recipe import INPUTS, MODES, RANDOM_SEED_LIMIT, WITH_STRENGTH

MAX_IMAGES = 10  # per request, OpenAI's own limit for n
UPLOAD_ID = re.compile(r"[0-9a-f]{64}\.png")
NUMBERS: dict[str, Callable[[str], Any]] = {
    "seed": seed_type, "steps": steps_type, "guidance": guidance_type, "width": side_type, "height": side_type,
    "strength": strength_type, "true_cfg": true_cfg_type, "num_images": count_type,
    "max_sequence_length": sequence_length_type, "cache": cache_type,
}
WHOLE = ("seed", "steps", "width", "height", "num_images", "max_sequence_length")
TEXTS = ("prompt", "negative_prompt")
FIELDS = ("mode", *TEXTS, *NUMBERS, *sorted({k for v in INPUTS.values() for k in v}), "keep_reference_size", "loras")


class BadSettings(ValueError):
    """A setting a client sent that cannot be used: a 4xx with this one line."""


def _number(name: str, value: Any) -> Any:
    # JSON true is an int to Python and 1.5 would pass int(); both are refused as the command line refuses them
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (name in WHOLE and isinstance(value, float)
                                                                           and not value.is_integer()):
        kind = "a whole number" if name in WHOLE else "a number"
        raise BadSettings(f"{name}: must be {kind}, got {value!r}")
    try:
        return NUMBERS[name](str(int(value) if name in WHOLE else value))
    except argparse.ArgumentTypeError as e:
        raise BadSettings(f"{name}: {e}") from None


def parse_settings(data: Any, lora_names: set[str]) -> dict[str, Any]:
    """Checked settings: only known fields, a seed always (a random one when null or left out)."""
    if not isinstance(data, dict):
        raise BadSettings("the settings must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise BadSettings(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"(known: {', '.join(FIELDS)})")
    out: dict[str, Any] = {"mode": data.get("mode") or "generate"}
    if out["mode"] not in MODES:
        raise BadSettings(f"mode: must be one of {', '.join(MODES)}, got {out['mode']!r}")
    for name in TEXTS:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise BadSettings(f"{name}: must be text, got {type(value).__name__}")
        out[name] = value
    if not out["prompt"]:
        raise BadSettings("prompt: give a prompt (what to draw)")
    for name in NUMBERS:
        if data.get(name) is not None:
            out[name] = _number(name, data[name])
    if out["mode"] not in WITH_STRENGTH:  # the page sends its slider's value whatever the mode
        out.pop("strength", None)
    if out.get("seed") is None:
        out["seed"] = secrets.randbelow(RANDOM_SEED_LIMIT)
    n = out.setdefault("num_images", 1)
    if n > MAX_IMAGES:
        raise BadSettings(f"num_images: at most {MAX_IMAGES} images per request, got {n}")
    if out["seed"] + n > SEED_LIMIT:
        raise BadSettings(f"seed: seeds {out['seed']}..{out['seed'] + n - 1} go past the largest seed "
                          f"{SEED_LIMIT - 1}")
    needed = INPUTS.get(out["mode"], ())
    for name in sorted({k for v in INPUTS.values() for k in v}):
        value = data.get(name)
        if value is None:
            if name in needed:
                raise BadSettings(f"{name}: mode {out['mode']} needs an uploaded {name.replace('_', ' ')}")
            continue
        if name not in needed:
            raise BadSettings(f"{name}: mode {out['mode']} takes no {name.replace('_', ' ')}")
        if not isinstance(value, str) or not UPLOAD_ID.fullmatch(value):
            raise BadSettings(f"{name}: not an upload id (POST the image to /api/uploads first), got {value!r}")
        out[name] = value
    if data.get("keep_reference_size") is not None:
        if not isinstance(data["keep_reference_size"], bool):
            raise BadSettings(f"keep_reference_size: must be true or false, got {data['keep_reference_size']!r}")
        if out["mode"] != "edit":
            raise BadSettings("keep_reference_size: only for mode edit (Kontext)")
        out["keep_reference_size"] = data["keep_reference_size"]
    if data.get("loras") is not None:
        out["loras"] = _loras(data["loras"], lora_names)
    return out


def _loras(value: Any, names: set[str]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise BadSettings("loras: must be a list of {name, scale}")
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "scale"}:
            raise BadSettings("loras: each item is {\"name\": ..., \"scale\": ...}")
        if item["name"] not in names:
            raise BadSettings(f"loras: no LoRA named {item['name']!r} on this server (GET /api/info lists them)")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise BadSettings(f"loras: the scale of {item['name']} must be a number, got {scale!r}")
        if not math.isfinite(scale):
            raise BadSettings(f"loras: the scale of {item['name']} must be a finite number, got {scale!r}")
        out.append({"name": item["name"], "scale": float(scale)})
    return out
