"""Quantised checkpoints: every quantised weight dequantised to float32, one matrix at a time.

Format knowledge lives in one module per family, so a new format touches one file:

- :mod:`~analysis.quant.fp8`: fine-grained block FP8 (``fp8``), per-channel ``fbgemm_fp8``;
- :mod:`~analysis.quant.mxfp4`: gpt-oss MXFP4 experts (``mxfp4``);
- :mod:`~analysis.quant.compressed`: every ``compressed-tensors`` format (its library);
- :mod:`~analysis.quant.bnb`: bitsandbytes NF4/FP4/int8 (its library);
- :mod:`~analysis.quant.awq`: AutoAWQ GEMM (compressed-tensors' AutoAWQ reader);
- :mod:`~analysis.quant.gptq`: GPTQ (its documented layout, as GPTQModel dequantises it).

Each registers a claimer (:func:`analysis.quant.base.register`) that turns the headers
and ``quantization_config`` into :class:`~analysis.quant.base.QuantTensor` values;
:func:`~analysis.quant.detect.index_checkpoint` collects them for
:class:`analysis.sources.WeightSource`, which then hands out each quantised weight under
the name and shape a full-precision checkpoint of the model uses. Optional libraries are
imported only when a checkpoint needs them.
"""

from analysis.quant.base import QuantTensor, dequantise_device, dequantise_setting, dtype_label
from analysis.quant.detect import QuantIndex, index_checkpoint, quantization_config

__all__ = [
    "QuantIndex",
    "QuantTensor",
    "dequantise_device",
    "dequantise_setting",
    "dtype_label",
    "index_checkpoint",
    "quantization_config",
]
