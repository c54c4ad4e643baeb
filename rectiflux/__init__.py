"""rectiflux: a compact PyTorch engine for FLUX.1 rectified-flow image generation."""

__version__ = "0.1.0"

# names resolve on first use, so `rectiflux --version` and `--help` do not pay for importing torch
_EXPORTS = {
    "load": "pipelines.load", "FluxPipeline": "pipelines.flux", "PipelineOutput": "pipelines.flux",
    "load_redux": "pipelines.redux",
    "Flux": "flux.transformer", "FluxConfig": "flux.config", "AutoEncoder": "flux.autoencoder",
    "load_transformer": "weights.transformer", "save_transformer": "weights.transformer",
    "load_autoencoder": "weights.autoencoder", "model_path": "weights.sources",
    "FirstBlockCache": "sampling.cache",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'rectiflux' has no attribute {name!r}")
