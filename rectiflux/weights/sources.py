"""Where models come from: local folders and files, repo ids in the local Hugging Face cache, and the models that
ship inside the package (so rectiflux makes an image with nothing downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable
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


def _find(source: str | os.PathLike, holds: Callable[[Path], bool]) -> tuple[Path | None, list[str] | None]:
    """(path, None) for a local path or an embedded model; for a repo id the cache's snapshot that `holds` (or None)
    and the places looked in; (None, None) for anything else."""
    path = Path(source)
    if path.exists():
        return path, None
    embedded = model_path(str(source))
    if embedded is not None:
        return embedded, None
    if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
        return cached_snapshot(source, holds)
    return None, None


def resolve_source(source: str | os.PathLike) -> Path:
    """A local folder or file, the embedded model's name, or a Hugging Face repo id found in the local cache."""
    found, looked = _find(source, lambda p: (p / "model_index.json").exists())
    if found is not None:
        return found
    if looked is not None:
        raise CheckpointError(f"model {source!r} is not in the local Hugging Face cache (looked in "
                              f"{', '.join(looked)}); download it there or pass a local folder")
    raise CheckpointError(f"no model at {source}: pass a diffusers folder, a BFL .safetensors file, "
                          "a Hugging Face repo id in the local cache, or 'shapes'")


TOKENIZER_REPOS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")


def cached_snapshot(repo: str, holds: Callable[[Path], bool]) -> tuple[Path | None, list[str]]:
    """The newest snapshot of `repo` in the local Hugging Face cache for which `holds(snapshot)`, and the places
    looked in."""
    looked = []
    for cache in hf_cache_dirs():
        snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
        looked.append(str(snapshots))
        found = sorted((p for p in snapshots.glob("*") if holds(p)), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1], looked
    return None, looked


def _holds_tokenizers(snapshot: Path) -> bool:
    # a partial download of the two tokenizer folders is enough
    return (snapshot / "tokenizer").is_dir() and (snapshot / "tokenizer_2").is_dir()


def resolve_tokenizers(source: str | os.PathLike) -> Path:
    """The folder holding FLUX's tokenizer/ and tokenizer_2/: a local folder (a diffusers FLUX folder) or a Hugging
    Face repo id in the local cache."""
    found, looked = _find(source, _holds_tokenizers)
    if found is not None:
        return found
    if looked is not None:
        raise CheckpointError(f"no tokenizers of {source!r} in the local Hugging Face cache (looked in "
                              f"{', '.join(looked)}); download its tokenizer/ and tokenizer_2/ or pass a local folder")
    raise CheckpointError(f"no tokenizers at {source}: pass a diffusers FLUX folder or a Hugging Face repo id in the "
                          "local cache (tokenizers= / --tokenizers)")


def default_tokenizers() -> Path | None:
    """FLUX.1-dev's or FLUX.1-schnell's tokenizers where the local cache holds them (theirs are the same)."""
    for repo in TOKENIZER_REPOS:
        found, _ = cached_snapshot(repo, _holds_tokenizers)
        if found is not None:
            return found
    return None
