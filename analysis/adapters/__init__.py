"""LoRA adapters: one module per format behind one interface.

- :mod:`analysis.adapters.base`: the interface, :class:`LoraAdapter` (apply an adapter to
  base weights), :class:`LoraSettings`, :class:`AdapterModule` and the merge rule
  :func:`merge_lora` (PEFT 0.21's ``merge_and_unload()``, LoRA / rsLoRA / DoRA).
- :mod:`analysis.adapters.peft_lora`: PEFT adapter folders.
- :mod:`analysis.adapters.kohya`: kohya/sd-scripts LoRA files.
- :mod:`analysis.adapters.raw_params`: LoRA on raw parameters (``target_parameters``).
"""

from analysis.adapters.base import (
    AdapterModule,
    LoraAdapter,
    LoraSettings,
    lora_scale,
    merge_lora,
    pattern_key,
)
from analysis.adapters.kohya import KOHYA_PREFIXES
from analysis.adapters.peft_lora import PEFT_PREFIX
from analysis.adapters.raw_params import merge_param_lora

__all__ = [
    "KOHYA_PREFIXES",
    "PEFT_PREFIX",
    "AdapterModule",
    "LoraAdapter",
    "LoraSettings",
    "lora_scale",
    "merge_lora",
    "merge_param_lora",
    "pattern_key",
]
