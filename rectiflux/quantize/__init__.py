"""8-bit weights for the transformer: `QuantizedLinear` and its kernels (`linear`), quantised files (`files`)."""

from .files import load_quantized, quantize_file, save_quantized
from .linear import QuantizedLinear, block_quantizer, int8_matmul_is_fast, quantize_transformer, set_activations

__all__ = ["QuantizedLinear", "block_quantizer", "int8_matmul_is_fast", "load_quantized", "quantize_file",
           "quantize_transformer", "save_quantized", "set_activations"]
