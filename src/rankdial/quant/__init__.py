"""QLoRA's 4-bit base: NF4 quantization (bitsandbytes' format) and the frozen NF4 linear layer."""

from .kernels import kernel_info, set_kernel
from .linear import (NF4Linear, NF4Weight, QuantizeReport, quantize_model, quantized_bits_per_param,
                     set_fused_inference)
from .nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_reference, quantize_nf4, quantize_nf4_reference

__all__ = ["kernel_info", "quantized_bits_per_param", "set_fused_inference", "NF4Linear", "NF4Weight",
           "QuantizeReport", "quantize_model", "set_kernel", "NF4Tensor", "quantize_nf4", "quantize_nf4_reference",
           "dequantize_nf4", "dequantize_nf4_reference"]
