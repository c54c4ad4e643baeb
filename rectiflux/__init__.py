"""rectiflux: a compact PyTorch engine for FLUX.1 rectified-flow image generation."""

__version__ = "0.1.0"

# names resolve on first use, so `rectiflux --version` and `--help` do not pay for importing torch
_EXPORTS = {
    "load": "pipeline", "FluxPipeline": "pipeline", "PipelineOutput": "pipeline",
    "Flux": "transformer", "FluxConfig": "transformer", "load_transformer": "transformer",
    "save_transformer": "transformer", "FirstBlockCache": "transformer", "AutoEncoder": "autoencoder",
    "load_autoencoder": "autoencoder",
    "model_path": "models",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'rectiflux' has no attribute {name!r}")
