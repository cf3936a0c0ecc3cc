"""What a dequantiser hands the rest of the engine: one quantised weight and how to read it.

A format module (:mod:`analysis.quant.fp8`, :mod:`analysis.quant.mxfp4`, ...) looks at a
checkpoint's tensor headers and its ``quantization_config`` and returns a
:class:`Claims`: each quantised weight as one :class:`QuantTensor` (its logical name and
shape as a full-precision checkpoint of the same model stores them, the stored tensors it
is made of, a storage label, and the function that dequantises it), plus the quantised
weights it recognises but cannot dequantise (listed in ``skipped``, never read raw).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from analysis.errors import InputError
from analysis.readers import TensorInfo

#: ``dequantise(parts, index) -> float32 tensor``: ``parts`` maps each role (``weight``,
#: ``scale``, ...) to the loaded stored tensor (only slice ``index`` of the roles in
#: :attr:`QuantTensor.sliced` when ``index`` is not ``None``).
Dequantise = Callable[[dict[str, torch.Tensor], int | None], torch.Tensor]


@dataclass(frozen=True)
class QuantTensor:
    """One quantised weight, seen as the full-precision tensor it stands for.

    ``name`` and ``shape`` are those a full-precision checkpoint of the same model stores
    (``...q_proj.weight`` ``[out, in]``; gpt-oss experts ``...experts.gate_up_proj``
    ``[E, in, out]``). ``parts`` maps each role to the stored tensor name; ``sliced`` are
    the roles whose first dimension is the expert (read one expert at a time); ``label``
    says how it is stored (``fp8 e4m3, 128x128 blocks``).
    """

    name: str
    shape: tuple[int, ...]
    parts: Mapping[str, str]
    label: str
    dequantise: Dequantise
    sliced: tuple[str, ...] = ()
    #: Names the algorithm in cache keys: change it when a dequantiser's output changes.
    method: str = ""
    #: The dequantiser is plain torch code that runs where its inputs are (a CUDA GPU too).
    any_device: bool = True


@dataclass
class Claims:
    """What one format found in a checkpoint.

    ``tensors``: the quantised weights it dequantises. ``unhandled``: ``{stored name:
    reason}`` for weights declared quantised that no dequantiser here handles (one entry
    per weight, named by its main stored tensor); ``hidden``: the other stored tensors of
    those weights (scales, zero points), which are parts of them and get no entry of
    their own.
    """

    tensors: list[QuantTensor] = field(default_factory=list)
    unhandled: dict[str, str] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)


#: ``claim(infos, quantization_config) -> Claims``, one per format family.
Claimer = Callable[[dict[str, TensorInfo], dict], Claims]

#: Format families by ``quant_method``; a module registers itself with :func:`register`.
FORMATS: dict[str, Claimer] = {}


def register(*methods: str) -> Callable[[Claimer], Claimer]:
    """Register a format family for the ``quant_method`` values it reads."""

    def wrap(claimer: Claimer) -> Claimer:
        for method in methods:
            FORMATS[method] = claimer
        return claimer

    return wrap


def require(infos: dict[str, TensorInfo], name: str, owner: str, what: str) -> TensorInfo:
    """The header of ``name``, a part of the quantised weight ``owner``.

    Raises
    ------
    InputError
        ``name`` is missing (a quantised weight without its scales cannot be read).
    """
    info = infos.get(name)
    if info is None:
        file = infos[owner].file if owner in infos else owner
        raise InputError(file, f"quantised weight {owner!r} has no {what} (expected tensor {name!r})")
    return info


def misfit(infos: dict[str, TensorInfo], owner: str, problem: str) -> InputError:
    """One error naming the quantised weight whose parts do not fit together."""
    file = infos[owner].file if owner in infos else owner
    return InputError(file, f"quantised weight {owner!r}: {problem}")


def dequantise_device(quantised: QuantTensor) -> torch.device:
    """Where ``quantised`` is dequantised: a CUDA GPU when there is one, else the CPU.

    ``WSE_DEQUANTISE_DEVICE`` (``auto``, ``cpu``, ``cuda``) overrides; dequantisers that
    run only on the CPU (bitsandbytes' CPU build) always run there. The result is the same
    float32 tensor either way (elementwise casts, products and table lookups, each exactly
    rounded), handed out on the CPU.
    """
    if not quantised.any_device:
        return torch.device("cpu")
    return dequantise_setting()


def dequantise_setting() -> torch.device:
    """The device ``WSE_DEQUANTISE_DEVICE`` names (``auto``: CUDA when present).

    Raises
    ------
    InputError
        Not one of ``auto``, ``cpu``, ``cuda``, or ``cuda`` on a machine without one.
    """
    from analysis.config import env_choice

    choice = env_choice("WSE_DEQUANTISE_DEVICE", "auto", ("auto", "cpu", "cuda"))
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise InputError("WSE_DEQUANTISE_DEVICE", "is cuda, but no CUDA GPU is available")
    return torch.device("cpu")


def read_small(infos: dict[str, TensorInfo], names: list[str]) -> dict[str, torch.Tensor]:
    """Small stored tensors (shapes, quant states) needed to list a checkpoint, one open per file.

    A large MoE checkpoint has tens of thousands of them; opening its shard once per tensor
    would cost minutes.
    """
    from safetensors import SafetensorError, safe_open

    by_file: dict = {}
    for name in names:
        by_file.setdefault(infos[name].file, []).append(name)
    found: dict[str, torch.Tensor] = {}
    for file, listed in by_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in listed:
                    found[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise InputError(file, f"cannot read the quantisation parameters stored in it: {error}") from error
    return found


def dtype_label(dtype: torch.dtype) -> str:
    """``bf16``, ``fp16``, ``fp32``, ``fp8 e4m3``... the storage label of a plain tensor."""
    names = {
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float32: "fp32",
        torch.float64: "fp64",
        torch.float8_e4m3fn: "fp8 e4m3",
        torch.float8_e5m2: "fp8 e5m2",
    }
    return names.get(dtype, str(dtype).removeprefix("torch."))
