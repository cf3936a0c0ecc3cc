"""Write a mitigation out: a PEFT adapter folder, or a merged model folder.

The adapter export re-factors each mitigated update as PEFT's procedure does
(:mod:`analysis.mitigation.procedure`); the merged export writes ``W_tuned`` with the
intruder components scaled, beside the model folder's config and tokenizer files.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from analysis.adapters import LoraAdapter
from analysis.errors import InputError
from analysis.mitigation.procedure import Mitigation
from analysis.pairing import match_names
from analysis.plan import ComparisonPlan


def _side_files(folder: Path, skip: Callable[[Path], bool]) -> list[Path]:
    """Small non-weight files of a model folder (config, tokenizer), to copy beside an export."""
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or skip(path) or path.stat().st_size > 64 * 2**20:
            continue
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx"):
            continue
        if path.name.endswith(".index.json"):
            continue
        out.append(path)
    return out


def _fused(plan: ComparisonPlan) -> bool:
    """Whether some tensor of ``plan`` holds several matrices (the experts of a fused tensor)."""
    return len({m.name for m in plan.matrices}) < len(plan.matrices)


def _orient_like(stored: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (plan orientation) in the orientation ``stored`` has, found from the data.

    ``reference`` is what the plan hands out for ``stored``.
    """
    if tuple(stored.shape) == tuple(reference.shape) and torch.equal(stored.to(torch.float32), reference):
        return weight
    if tuple(stored.shape) == tuple(reference.T.shape) and torch.equal(stored.to(torch.float32).T, reference):
        return weight.T
    raise InputError("export", f"cannot tell how a {tuple(stored.shape)} tensor was oriented in the analysis")


def export_merged(mitigation: Mitigation, resolver, base: str, tuned: str, out: Path) -> Path:
    """Write the mitigated model as a plain checkpoint (loads with ``from_pretrained``).

    The checkpoint is ``out/model.safetensors`` plus the config and tokenizer files of the
    model folder.

    Every tensor of the model is written: for a full fine-tune the fine-tune's with the
    mitigated matrices replaced; for an adapter the base's with every adapted matrix
    replaced by ``W + dW_mit`` (unmitigated updates such as ``modules_to_save`` merged as
    they are). Dtypes are kept, except that the quantised weights of a quantised
    checkpoint are written dequantised in bf16, without its quantisation config (the note says so).
    """
    from safetensors.torch import save_file

    base_source = resolver.open(base)
    source = base_source if isinstance(resolver.open(tuned), LoraAdapter) else resolver.open(tuned)
    names = source.names()
    by_plan = match_names([m.name for m in mitigation.plan.matrices], names)
    replaced: dict[str, torch.Tensor] = {}
    for matrix in mitigation.plan.matrices:
        target = by_plan.get(matrix.name)
        if target is None:
            if matrix.expert is not None:  # paired across expert layouts (analysis.slots.to_base_layout)
                raise InputError(
                    tuned,
                    f"stores its experts in another layout than the base (per expert against fused), so "
                    f"{matrix.name} cannot be written back into it; export from a fine-tune saved in the "
                    "base's layout",
                )
            raise InputError(tuned, f"the merged model has no tensor for {matrix.name}")
        stored = replaced[target] if target in replaced else source.load(target)
        reference = matrix.load_base() if source is base_source else matrix.load_tuned().weight
        weight = mitigation.tuned(matrix.key).weight
        if stored.dim() == 3 and matrix.expert is not None:  # one expert's slice of a fused tensor
            stored = stored.clone() if target not in replaced else stored
            stored[matrix.expert] = _orient_like(stored[matrix.expert], reference, weight).to(stored.dtype)
            replaced[target] = stored.contiguous()
        else:
            replaced[target] = _orient_like(stored, reference, weight).to(stored.dtype).contiguous()
    tensors = {name: replaced[name] if name in replaced else source.load(name) for name in names}
    for name in source.quant.tensors:  # written dequantised, in bf16
        tensors[name] = tensors[name].to(torch.bfloat16).contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    folder = source.root if source.root.is_dir() else source.root.parent
    for path in _side_files(folder, lambda p: p.name == "model.safetensors"):
        shutil.copy2(path, out / path.name)
    _write_note(out, mitigation, "merged", _dequantised_config(source, out))
    return out


def _dequantised_config(source, out: Path) -> str:
    """Drop the quantisation config from the exported ``config.json``; what the note then says."""
    if not source.quant.tensors:
        return ""
    config_path = out / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for holder in (config, config.get("text_config") or {}):
            if isinstance(holder, dict):
                holder.pop("quantization_config", None)
                holder.pop("compression_config", None)
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    labels = sorted({t.label for t in source.quant.tensors.values()})
    return (
        f"\nThe model was stored quantised ({', '.join(labels)}); its quantised weights are written here "
        "dequantised, in bf16, and config.json carries no quantisation config.\n"
    )


def export_adapter(mitigation: Mitigation, resolver, tuned: str, out: Path) -> Path:
    """Write the mitigated adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads.

    The folder holds ``adapter_config.json`` + ``adapter_model.safetensors``.

    The original adapter's tensors are copied, ``lora_A``/``lora_B`` (or the embedding
    factors) of each mitigated module replaced by the new factors in the stored dtype.
    With ``exact`` the ranks change per module; the config then gets a ``rank_pattern``
    and an ``alpha_pattern`` (anchored, escaped module names) that keep every module's
    scaling, so ``scale * B @ A`` is the mitigated update.
    """
    from safetensors.torch import load_file, save_file

    adapter = resolver.open(tuned)
    if not isinstance(adapter, LoraAdapter) or mitigation.kind != "adapter":
        raise InputError(tuned, "is a full fine-tune; export the merged model instead")
    if adapter.format != "peft":
        raise InputError(tuned, "is a kohya LoRA file; export the merged model instead (PEFT folders only)")
    weights = adapter.root / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(tuned, "has no adapter_model.safetensors (only .bin); export the merged model instead")
    tensors = load_file(str(weights))
    config = json.loads((adapter.root / "adapter_config.json").read_text(encoding="utf-8"))
    module_weights = {f"{m}.weight": m for m in adapter.modules}
    pairs = match_names([m.name for m in mitigation.plan.matrices], list(module_weights))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    if _fused(mitigation.plan):
        raise InputError(tuned, "adapts fused expert tensors; export the merged model instead")
    for summary in mitigation.matrices:
        factors = mitigation.update(summary.key)
        weight_name = pairs.get(summary.name)
        if factors is None or weight_name is None or not summary.mitigated:
            continue
        module = adapter.modules[module_weights[weight_name]]
        B, A = factors.B, factors.A
        if module.layer_type == "embedding":
            # The plan orients an embedding vocab x dim; PEFT stores A r x vocab, B dim x r.
            B, A = factors.A.T, factors.B.T
        tensors[module.A] = A.to(tensors[module.A].dtype).contiguous()
        tensors[module.B] = B.to(tensors[module.B].dtype).contiguous()
        if summary.new_rank != summary.rank:
            key = re.escape(module.module)
            r = int(summary.new_rank)
            rank_pattern[key] = r
            alpha = module.scale * (math.sqrt(r) if config.get("use_rslora") else r)
            alpha_pattern[key] = alpha
    config["rank_pattern"], config["alpha_pattern"] = rank_pattern, alpha_pattern
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _write_note(out, mitigation, "adapter")
    return out


def _write_note(out: Path, mitigation: Mitigation, what: str, extra: str = "") -> None:
    s = mitigation.settings
    totals = mitigation.totals()
    text = (
        f"# Intruder-mitigated {what}\n\n"
        f"Made by the weight-spectrum explorer from {mitigation.plan.tuned_label} on {mitigation.plan.base_label}: "
        f"intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228) among the top {s.top_k} singular "
        f"vectors at eps = {s.eps:g} scaled by lambda = {s.lam:g} (rule {s.rule}, "
        f"{'exact rank r + n' if s.exact else 'truncated to rank r'}); "
        f"{totals['intruders_scaled']} intruders in {totals['matrices_with_intruders']} of "
        f"{totals['matrices']} matrices.\n"
    ) + extra
    (out / "MITIGATION.md").write_text(text, encoding="utf-8")
