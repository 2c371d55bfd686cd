"""Quantized (int8 / NF4) frozen edge snapshots through bitsandbytes; adapters train on top of them."""

from fednested.quantization.snapshot import (
    BLOCKSIZE,
    Bits,
    BlockwiseQuantized,
    QuantizationError,
    QuantizedExperts,
    QuantizedLinear,
    load_quantized_version,
    model_memory_bytes,
    pin_mmap_threshold,
    quantization_error,
    quantize_base,
    quantized_bits,
)

__all__ = [
    "BLOCKSIZE",
    "Bits",
    "BlockwiseQuantized",
    "QuantizationError",
    "QuantizedExperts",
    "QuantizedLinear",
    "load_quantized_version",
    "model_memory_bytes",
    "pin_mmap_threshold",
    "quantization_error",
    "quantize_base",
    "quantized_bits",
]
