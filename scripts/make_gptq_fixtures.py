"""Regenerate tests/data/gptq: tiny GPTQ checkpoints written by auto-round, and their reference weights.

Neither auto-round (Intel; quantises on the CPU and exports GPTQ's ``auto_gptq`` layout) nor
GPTQModel (whose 7.x releases require torch 2.14) is a dependency of this project. Install
them apart from the project's environment, without their dependencies (both import and run
on the project's torch 2.13 CPU build), e.g.::

    pip install --no-deps --target /tmp/gptq auto-round==0.16.1 py-cpuinfo==9.0.0 \\
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 gptqmodel==7.7.0 \\
        pypcre==0.6.4 logbar==0.4.15 device-smi==0.5.7 tokenicer==0.0.14 defuser==0.0.28
    PYTHONPATH=/tmp/gptq .venv/bin/python scripts/make_gptq_fixtures.py

Each case is a tiny model (seed 0, one block, 32 tokens, four key/value heads so that every
matrix has 32 or 64 outputs, as 3-bit packing needs) quantised by ``AutoRound`` with
round-to-nearest (``iters=0``, no calibration data, ``amp=False``: in float32, as on a CPU
without bf16, where auto-round turns amp off itself) and saved with ``format="auto_gptq"``:
a Llama (tests/factories.py) for the dense cases; a Mixtral and a Qwen3-MoE (four experts,
which auto-round unfuses from transformers' 3-D expert parameters and writes one module
per expert: Qwen3-MoE's ``mlp.experts.N.gate_proj``, and for Mixtral
``block_sparse_moe.experts.N.gate_proj``/``up_proj``/``down_proj``, not the
``w1``/``w3``/``w2`` of Mixtral's own checkpoints; the routers are not quantised); and a
LLaVA (auto-round quantises the language model's linears; the vision tower and the
projector are not quantised). Next to each checkpoint, ``reference.safetensors`` holds every
quantised weight ``[out, in]`` in float32 as GPTQModel's own model-free dequantiser
computes it (``gptqmodel.utils.model_dequant.convert_gptq_file``, given each module's
bits and group size, so that ``dynamic`` overrides are honoured). The script also checks
that auto-round's own GPTQ kernel (``auto_round_extension.torch.qlinear_torch_zp.
QuantLinear``, its forward on the identity matrix), which multiplies in fp16, gives the
same weights rounded to fp16.

Two cases are derived, since auto-round writes neither: ``act-order`` (from a model whose
every matrix is square; each ``g_idx`` a seeded permutation of the groups, ``desc_act:
true``) and ``v2`` (the 4-bit asymmetric case with its zero points stored without GPTQ
v1's minus one, ``checkpoint_format: gptq_v2``, as GPTQModel saves them; its reference,
checked equal, is that of the case it is derived from).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "tests" / "data" / "gptq"
CASES = {  # name: (family, bits, group_size, sym, layer_config, model config overrides)
    "w4g16-sym": ("llama", 4, 16, True, None, {}),
    "w4g16": ("llama", 4, 16, False, None, {}),
    "w8-channel-sym": ("llama", 8, -1, True, None, {}),
    "w2g32": ("llama", 2, 32, False, None, {}),
    "w3g16": ("llama", 3, 16, False, None, {}),
    "w4g16-dynamic": ("llama", 4, 16, False, {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 32}}, {}),
    "w4g16-square": ("llama", 4, 16, False, None, {"intermediate_size": 32}),
    "mixtral-w4g16": ("mixtral", 4, 16, False, None, {}),
    "qwen3-moe-w4g16-sym": ("qwen3_moe", 4, 16, True, None, {}),
    "llava-w4g16": ("llava", 4, 16, False, None, {}),
}


def _model(family: str, **overrides):
    """The tiny model of ``family`` (seed 0, one block) that a case quantises.

    The MoE and LLaVA models carry ``architectures`` in their config, as a model loaded by
    ``from_pretrained`` does, so that the engine asks transformers for their layout.
    """
    import transformers as tf

    from tests.factories import HEADS, build_model

    if family == "llama":
        return build_model("llama", seed=0, num_key_value_heads=HEADS, num_hidden_layers=1, vocab_size=32, **overrides)
    torch.manual_seed(0)
    common = {"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": HEADS, "vocab_size": 32}
    common |= {"hidden_size": 32, "intermediate_size": 32} | overrides  # (auto-round leaves experts of 16 unquantised)
    experts = {"num_experts_per_tok": 2}
    if family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**common, **experts, num_local_experts=4))
    elif family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, **experts, head_dim=8, moe_intermediate_size=32, num_experts=4)
        model = tf.Qwen3MoeForCausalLM(config)
    else:  # llava: the language model's linears are quantised, the vision tower stays as it is
        vision = tf.CLIPVisionConfig(
            hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=8, patch_size=4
        )
        text = tf.LlamaConfig(**common)
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text, vision_config=vision))
    model.config.architectures = [type(model).__name__]
    return model.eval()


def _tokenizer():
    """A word-level tokenizer: auto-round asks for one, though round-to-nearest never calls it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(100)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), unk_token="t0")


def quantise(
    name: str,
    family: str,
    bits: int,
    group: int,
    sym: bool,
    layers: dict | None,
    overrides: dict,
    *,
    fmt: str = "auto_gptq",
    root: Path = OUT,
) -> Path:
    """The case quantised by auto-round and saved in ``fmt`` to ``root / name`` (config and weights).

    scripts/make_awq_fixtures.py uses it with ``fmt="auto_awq"``.
    """
    from auto_round import AutoRound

    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        rounder = AutoRound(
            _model(family, **overrides),
            alg_configs="rtn",
            tokenizer=_tokenizer(),
            bits=bits,
            group_size=group,
            sym=sym,
            iters=0,
            device_map="cpu",
            layer_config=layers,
            disable_opt_rtn=True,
            amp=False,  # float32 throughout: auto-round turns amp on only where the CPU has bf16 (avx512_bf16)
        )
        rounder.quantize_and_save(tmp, format=fmt)
        saved = next(Path(tmp).rglob("model.safetensors")).parent  # auto-round adds a folder named by the scheme
        out.mkdir(parents=True)
        shutil.copy2(saved / "config.json", out / "config.json")
        save_file(load_file(saved / "model.safetensors"), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _modules(folder: Path):
    """``(module, bits, group_size, stored tensors, quantization_config)`` of every ``qweight`` in ``folder``."""
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    stored = load_file(folder / "model.safetensors")
    for name in sorted(n for n in stored if n.endswith(".qweight")):
        module = name.removesuffix(".qweight")
        yield (module, *_module_settings(qconfig, module), stored, qconfig)


def library_dequantised(folder: Path) -> dict[str, torch.Tensor]:
    """Every ``qweight`` as GPTQModel's model-free dequantiser computes it, ``[out, in]`` float32."""
    from gptqmodel.utils.model_dequant import convert_gptq_file

    out = {}
    for module, bits, group, stored, qconfig in _modules(folder):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "module.safetensors"
            save_file(
                {f"{module}.{p}": stored[f"{module}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}, str(path)
            )
            settings = qconfig | {"bits": bits, "group_size": group}
            out[module + ".weight"] = convert_gptq_file(path, torch.float32, settings, "cpu")[module + ".weight"]
    return out


def kernel_dequantised(folder: Path) -> dict[str, torch.Tensor]:
    """Every ``qweight`` as auto-round's GPTQ QuantLinear dequantises it, ``[out, in]`` (fp16 products).

    With ``desc_act`` the layer keeps its ``g_idx`` (each input column's group); without,
    it has none and spreads each group's scale over ``group_size`` consecutive columns, as
    auto-round builds it for such checkpoints. (Its ``g_idx`` path slices the scales'
    columns by the number of inputs, so it is right only where ``out <= in``: the
    act-order case is a model whose every matrix is square.)
    """
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    out = {}
    for module, bits, group, stored, qconfig in _modules(folder):
        scales = stored[module + ".scales"]
        inputs, outputs = stored[module + ".g_idx"].numel(), scales.shape[1]
        assert outputs <= inputs or not qconfig["desc_act"], module
        layer = QuantLinear(bits, group if group > 0 else inputs, inputs, outputs, False, g_idx=qconfig["desc_act"])
        layer.qweight, layer.qzeros, layer.scales = stored[module + ".qweight"], stored[module + ".qzeros"], scales
        if qconfig["desc_act"]:
            layer.g_idx = stored[module + ".g_idx"]
        layer.eval()
        with torch.no_grad():
            out[module + ".weight"] = layer(torch.eye(inputs, dtype=torch.float32)).T.contiguous()
    return out


def _module_settings(qconfig: dict, module: str) -> tuple[int, int]:
    import re

    bits, group = qconfig["bits"], qconfig["group_size"]
    for pattern, override in (qconfig.get("dynamic") or {}).items():
        if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), module):
            return override.get("bits", bits), override.get("group_size", group)
    return bits, group


def _unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    values = 32 // bits
    shifts = torch.arange(values) * bits
    codes = (words.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF) >> shifts
    return (codes & (2**bits - 1)).reshape(words.shape[0], -1)


def _pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    values = 32 // bits
    grouped = codes.to(torch.int64).reshape(codes.shape[0], -1, values) << (torch.arange(values) * bits)
    words = grouped.sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def act_order(src: Path, seed: int = 0) -> Path:
    """``src`` with each ``g_idx`` a seeded permutation of its groups, as GPTQ's act-order stores it.

    Each module's zero point of output 7 in group 0 (the top field of the first ``qzeros``
    word) is also set to 15, v1's code for a zero point of 0 (see :data:`EDGE`).
    """
    out = OUT / (src.name + "-act-order")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(seed)
    state = load_file(src / "model.safetensors")
    for name in [n for n in state if n.endswith(".g_idx")]:
        state[name] = state[name][torch.randperm(state[name].numel(), generator=g)].contiguous()
    for name in [n for n in state if n.endswith(".qzeros")]:
        state[name][0, 0] |= -(1 << 28)  # 0xF0000000: field 7 = 15
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def v2(src: Path) -> Path:
    """``src`` with its zero points stored as they are (``checkpoint_format: gptq_v2``)."""
    out = OUT / (src.name + "-v2")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = load_file(src / "model.safetensors")
    bits = config["quantization_config"]["bits"]
    for name in [n for n in state if n.endswith(".qzeros")]:
        codes = _unpack_cols(state[name], bits) + 1
        assert int(codes.max()) <= 2**bits - 1, name
        state[name] = _pack_cols(codes, bits)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


#: The case whose v1 zero points include a stored 15 (4 bits): GPTQModel's dequantiser reads
#: it as 0, auto-round's kernel as 16, so the two are compared only elsewhere.
EDGE = "w4g16-square-act-order"


def _edge(folder: Path, weight: str) -> torch.Tensor:
    """Where ``weight`` ``[out, in]`` uses the zero point act_order() set to 15 (output 7, group 0)."""
    stored = load_file(folder / "model.safetensors")
    g_idx = stored[weight.removesuffix(".weight") + ".g_idx"]
    mask = torch.zeros(stored[weight.removesuffix(".weight") + ".scales"].shape[1], g_idx.numel(), dtype=torch.bool)
    if folder.name == EDGE:
        mask[7] = g_idx == 0
    return mask


def main() -> None:
    import auto_round
    import gptqmodel

    made = [quantise(name, *settings) for name, settings in CASES.items()]
    made.append(act_order(OUT / "w4g16-square"))
    shutil.rmtree(made.pop(made.index(OUT / "w4g16-square")))  # only the act-order case is kept
    for folder in made:
        reference = library_dequantised(folder)
        kernel = kernel_dequantised(folder)
        assert reference.keys() == kernel.keys()
        for name, weight in reference.items():  # auto-round's kernel: the same weights, rounded to fp16
            rounded, edge = weight.to(torch.float16).float(), _edge(folder, name)
            assert torch.equal(rounded[~edge], kernel[name][~edge]), (folder.name, name)
            assert not (rounded[edge] == kernel[name][edge]).any(), (folder.name, name)  # it reads 16 there
        save_file(reference, str(folder / "reference.safetensors"))
    derived = v2(OUT / "w4g16")
    reference = load_file(OUT / "w4g16" / "reference.safetensors")
    assert all(torch.equal(t, reference[n]) for n, t in library_dequantised(derived).items())
    versions = {"auto-round": auto_round.__version__, "gptqmodel": gptqmodel.__version__, "torch": torch.__version__}
    (OUT / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    for folder in sorted(OUT.iterdir()):
        if folder.is_dir():
            size = sum(p.stat().st_size for p in folder.iterdir())
            print(f"{folder.name}: {size} bytes")


if __name__ == "__main__":
    main()
