"""rectiflux: a compact PyTorch engine for FLUX.1 rectified-flow image generation."""

__version__ = "0.1.0"

from .transformer import Flux, FluxConfig, load_transformer, save_transformer  # noqa: E402

__all__ = ["Flux", "FluxConfig", "load_transformer", "save_transformer", "__version__"]
