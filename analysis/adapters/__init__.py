"""LoRA adapters: one module per format behind one interface.

- :mod:`analysis.adapters.base`: the interface, :class:`LoraAdapter` (apply an adapter to
  base weights), :class:`LoraSettings`, :class:`AdapterModule` and the merge rule
  :func:`merge_lora` (PEFT 0.21's ``merge_and_unload()``, LoRA / rsLoRA / DoRA).
- :mod:`analysis.adapters.peft_lora`: PEFT adapter folders.
- :mod:`analysis.adapters.kohya`: kohya/sd-scripts LoRA files.
- :mod:`analysis.adapters.raw_params`: LoRA on raw parameters (``target_parameters``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from analysis.adapters import kohya, peft_lora
from analysis.adapters.base import (
    AdapterModule,
    LoraAdapter,
    LoraSettings,
    lora_scale,
    merge_lora,
    merge_param_lora,
    pattern_key,
)
from analysis.adapters.kohya import KOHYA_PREFIXES
from analysis.adapters.peft_lora import PEFT_PREFIX


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format: how to recognise it and open it.

    ``open_folder(label, folder, allow_pickle)`` and ``open_file(label, path, names)``
    return the adapter, or ``None`` when the folder or file is not in this format
    (``names``: the tensor names in the file's header). Adding a format is a new module
    with one of these, appended to :data:`FORMATS`.
    """

    name: str
    open_folder: Callable[[str, Path, bool], LoraAdapter | None]
    open_file: Callable[[str, Path, list[str]], LoraAdapter | None]


#: The detection registry, tried in order.
FORMATS: list[AdapterFormat] = [
    AdapterFormat("peft", peft_lora.open_folder, peft_lora.open_file),
    AdapterFormat("kohya", kohya.open_folder, kohya.open_file),
]


def open_adapter_folder(label: str, folder: Path, allow_pickle: bool) -> LoraAdapter | None:
    """The adapter in ``folder`` in the first format that recognises it, else ``None``."""
    for fmt in FORMATS:
        adapter = fmt.open_folder(label, folder, allow_pickle)
        if adapter is not None:
            return adapter
    return None


def open_adapter_file(label: str, path: Path, names: list[str]) -> LoraAdapter | None:
    """The adapter in the file ``path`` (tensor ``names``), else ``None``."""
    for fmt in FORMATS:
        adapter = fmt.open_file(label, path, names)
        if adapter is not None:
            return adapter
    return None


def is_adapter(source: object) -> bool:
    """Whether an opened source is an adapter (applied to a base) rather than a model."""
    return isinstance(source, LoraAdapter)


__all__ = [
    "FORMATS",
    "AdapterFormat",
    "is_adapter",
    "open_adapter_file",
    "open_adapter_folder",
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
