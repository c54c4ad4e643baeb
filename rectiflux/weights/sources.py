"""Where models come from: local folders and files, repo ids in the local Hugging Face cache, and the models that
ship inside the package (so rectiflux makes an image with nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError

MODELS_DIR = Path(__file__).parent.parent / "models_data"
EMBEDDED = ("shapes",)


def model_path(name: str) -> Path | None:
    """The folder of an embedded model (diffusers layout), or None when `name` is not one."""
    if name not in EMBEDDED:
        return None
    path = MODELS_DIR / name
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"the embedded model {name!r} is missing from this install ({path})")
    return path


def hf_cache_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return [home / "hub"]


def resolve_source(source: str | os.PathLike) -> Path:
    """A local folder or file, the embedded model's name, or a Hugging Face repo id found in the local cache."""
    path = Path(source)
    if path.exists():
        return path
    embedded = model_path(str(source))
    if embedded is not None:
        return embedded
    if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
        looked = []
        for cache in hf_cache_dirs():
            snapshots = cache / f"models--{source.replace('/', '--')}" / "snapshots"
            looked.append(str(snapshots))
            found = sorted(snapshots.glob("*/model_index.json"), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1].parent
        raise CheckpointError(f"model {source!r} is not in the local Hugging Face cache (looked in "
                              f"{', '.join(looked)}); download it there or pass a local folder")
    raise CheckpointError(f"no model at {source}: pass a diffusers folder, a BFL .safetensors file, "
                          "a Hugging Face repo id in the local cache, or 'shapes'")
