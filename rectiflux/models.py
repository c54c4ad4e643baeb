"""Models that ship inside the package, so that rectiflux makes an image with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models_data"
EMBEDDED = ("shapes",)


def model_path(name: str) -> Path | None:
    """The folder of an embedded model (diffusers layout), or None when `name` is not one."""
    if name not in EMBEDDED:
        return None
    path = MODELS_DIR / name
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"the embedded model {name!r} is missing from this install ({path})")
    return path
