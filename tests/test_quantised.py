"""Quantised checkpoints (issue 22): each format dequantised exactly as its own library does.

For every format a tiny model is stored quantised by that format's own code
(:mod:`tests.quantised`); the checks are that every dequantised matrix equals the
library's own dequantisation element for element, and that the report on (quantised
base, full-precision fine-tune) equals the report on (the dequantised base saved as
float32, the same fine-tune): the same matrices, every count equal, every metric within
float32 round-off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis.compare import compare
from analysis.errors import InputError
from analysis.report import to_report
from analysis.sources import open_location
from charts.html_report import html_report
from tests import families, quantised

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``made(family)``: (base model, its full-precision folder, a bf16 full fine-tune folder)."""
    root = tmp_path_factory.mktemp("quantised")
    built: dict[str, tuple] = {}
    families.quiet()

    def get(family: str):
        if family not in built:
            model = _build(family)
            base = families.save(model, family, root / family / "base")
            tuned_model = _build(family)
            families.perturb(tuned_model)
            tuned = families.save(tuned_model.to(torch.bfloat16), family, root / family / "tuned")
            built[family] = (model, base, tuned, root / family)
        return built[family]

    return get


def _build(family: str):
    if family == "gpt_oss":
        return quantised.gpt_oss_model()
    if family == "mixtral8":  # each router has 8 outputs: AWQ packs its codes and zero points in one word a row
        return families.build("mixtral", num_local_experts=8)
    return families.build(family)


def _fp8_reference(folder: Path) -> dict[str, torch.Tensor]:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    stored = load_file(folder / "model.safetensors")
    dequantise = Fp8Dequantize(None)
    return {
        n: dequantise._dequantize_one(t, stored[n + "_scale_inv"], torch.float32)
        for n, t in stored.items()
        if n + "_scale_inv" in stored
    }


def _mxfp4_reference(folder: Path) -> dict[str, torch.Tensor]:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stored = load_file(folder / "model.safetensors")
    return {
        n.removesuffix("_blocks"): convert_moe_packed_tensors(
            t, stored[n.removesuffix("_blocks") + "_scales"], dtype=torch.float32
        )
        for n, t in stored.items()
        if n.endswith("_blocks")
    }


def _compressed_reference(folder: Path) -> dict[str, torch.Tensor]:
    """Each compressed module decompressed by its compressor, with the stored scheme and format.

    (compressed-tensors' own model-free ``CompressedTensorsDequantizer`` re-infers the
    format from the scheme and leaves ``int-quantized`` weights as stored, so it is not used.)
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    group = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    params = compressor.compression_param_names(scheme)
    stored = load_file(folder / "model.safetensors")
    modules = {n.removesuffix(".weight_scale") for n in stored if n.endswith(".weight_scale")}
    reference = {}
    for m in sorted(modules):
        try:
            reference[f"{m}.weight"] = compressor.decompress({p: stored[f"{m}.{p}"] for p in params}, scheme)["weight"]
        except RuntimeError as error:  # compressed-tensors 0.20 cannot unpack one-word zero-point rows
            assert "stride(-1) must be 1" in str(error) and stored[f"{m}.weight_zero_point"].shape[0] == 1, m
    return {n: t.float() for n, t in reference.items()}


def _bnb_reference(folder: Path) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as F

    stored = load_file(folder / "model.safetensors")
    out = {}
    for name, tensor in stored.items():
        if name + ".absmax" in stored:
            state = {k.removeprefix(name + "."): v for k, v in stored.items() if k.startswith(name + ".")}
            out[name] = F.dequantize_4bit(tensor, F.QuantState.from_dict(state, torch.device("cpu"))).float()
        elif name.endswith(".weight") and name.removesuffix("weight") + "SCB" in stored:
            out[name] = F.int8_vectorwise_dequant(tensor, stored[name.removesuffix("weight") + "SCB"]).float()
    return out


def _check_exact(folder: Path, reference: dict[str, torch.Tensor], label: str) -> None:
    source = open_location(str(folder))
    assert reference, "the writer quantised nothing"
    for name, expected in reference.items():
        assert source.storage(name) == label, name
        got = source.load(name)
        assert got.dtype == torch.float32 and torch.equal(got, expected.to(torch.float32)), name
        if got.dim() == 3:  # one expert read alone equals its slice of the whole
            assert torch.equal(source.load_slice(name, 1), expected[1].to(torch.float32)), name
    assert not [s for s in source.quantised_skips()], source.quantised_skips()


def _same_reports(quantised_base: Path, reference_base: Path, tuned: Path) -> dict:
    got = to_report(compare(str(quantised_base), [str(tuned)], cache=None, device="cpu"))["models"][0]
    want = to_report(compare(str(reference_base), [str(tuned)], cache=None, device="cpu"))["models"][0]
    return _same_models(got, want)


def _same_models(got: dict, want: dict) -> dict:
    """``got`` (a report's model) analyses the same matrices as ``want``, with the same counts and metrics."""
    assert [m["name"] for m in got["matrices"]] == [m["name"] for m in want["matrices"]]
    assert [m["expert"] for m in got["matrices"]] == [m["expert"] for m in want["matrices"]]
    assert got["matrices"], "nothing analysed"
    for a, b in zip(got["matrices"], want["matrices"], strict=True):
        for key in ("intruders", "rank90", "amplification_rank", "shape", "layer", "module", "stack"):
            assert a[key] == b[key], (a["name"], key)
        for key in ("effective_rank", "stable_rank", "delta_fro", "amplification_factor"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (a["name"], key, a[key], b[key])
    assert [s["name"] for s in got["skipped"]] == [s["name"] for s in want["skipped"]]
    assert (got["unmatched"], got["shape_mismatches"]) == (want["unmatched"], want["shape_mismatches"])
    return got


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen3_moe_fused", "llava"])
def test_fp8_blocks_dense_moe_and_multimodal(made, family):
    model, base, tuned, root = made(family)
    folder = quantised.fp8_blocks(base, root / "fp8")
    reference = _fp8_reference(folder)
    _check_exact(folder, reference, "fp8 e4m3, 16x16 blocks")
    report = _same_reports(folder, quantised.dequantised_copy(folder, root / "fp8-deq", reference), tuned)
    assert not any("scale" in s["name"] for s in report["skipped"])
    # Matrices that do not tile into 16x16 blocks (routers [4, 32], experts with 24 columns):
    # transformers' quantiser leaves them as they are.
    storages = {m["name"]: m["storage"] for m in report["matrices"]}
    tiles = {m["name"]: m["shape"][0] % 16 == 0 and m["shape"][1] % 16 == 0 for m in report["matrices"]}
    assert {n: s for n, s in storages.items() if s != "fp8 e4m3, 16x16 blocks"} == {
        n: "fp32" for n, t in tiles.items() if not t
    }
    assert {m["tuned_storage"] for m in report["matrices"]} == {"bf16"}
    fp8 = sum(m["storage"] == "fp8 e4m3, 16x16 blocks" for m in report["matrices"])
    assert report["summary"]["storage"]["base"]["fp8 e4m3, 16x16 blocks"] == fp8 > 0


def test_fp8_partial_blocks_match_a_float64_reference(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(200, 300, generator=g) * 10).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3, generator=g) + 0.5
    save_file(
        {"model.layers.0.mlp.down_proj.weight": weight, "model.layers.0.mlp.down_proj.weight_scale_inv": scale},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    )
    got = open_location(str(tmp_path)).load("model.layers.0.mlp.down_proj.weight")
    spread = scale.double().repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert torch.allclose(got.double(), weight.double() * spread, rtol=1e-7, atol=0)


def test_fp8_missing_or_misfit_scales_are_one_error_naming_the_tensor(tmp_path):
    from safetensors.torch import save_file

    weight = torch.randn(64, 64).to(torch.float8_e4m3fn)
    config = json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32]}})
    (tmp_path / "config.json").write_text(config)
    save_file({"model.layers.0.mlp.up_proj.weight": weight}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*no block scales"):
        open_location(str(tmp_path))
    save_file(
        {"model.layers.0.mlp.up_proj.weight": weight, "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(3, 2)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(InputError, match=r"up_proj\.weight.*\(3, 2\).*needs \(2, 2\)"):
        open_location(str(tmp_path))


MXFP4_DATA = Path(__file__).parent / "data" / "mxfp4" / "gpt-oss"


def test_mxfp4_written_by_triton_kernels(made, tmp_path):
    """gpt-oss's experts as triton_kernels' own MXFP4 quantiser wrote them (scripts/make_mxfp4_fixtures.py).

    Every expert matrix equals transformers' dequantisation, what transformers' gpt-oss
    loads with ``Mxfp4Config(dequantize=True)``, gpt-oss's own reader and triton_kernels'
    own ``upcast_from_mxfp_torch`` (the last two stored by the script, which ran them), and
    lies within its block's scale of the bf16 weight that was quantised (so the blocks run
    along each matrix's inputs, as gpt-oss stores them: a square ``down_proj`` read
    transposed would not).
    """
    from transformers import GptOssForCausalLM, Mxfp4Config

    reference = _mxfp4_reference(MXFP4_DATA)
    _check_exact(MXFP4_DATA, reference, "mxfp4")
    source = open_location(str(MXFP4_DATA))
    got = {name: source.load(name) for name in reference}
    loaded = GptOssForCausalLM.from_pretrained(
        MXFP4_DATA, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32, device_map="cpu"
    ).state_dict()
    others = {f: load_file(MXFP4_DATA / f"{f}.safetensors") for f in ("reference-gpt-oss", "reference-triton-kernels")}
    stored = load_file(MXFP4_DATA / "model.safetensors")
    bf16 = load_file(MXFP4_DATA / "source.safetensors")
    assert (
        bf16.keys()
        == reference.keys()
        == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    )
    for name, weight in got.items():
        assert torch.equal(loaded[name], weight), name
        for file, other in others.items():
            assert other.keys() == reference.keys() and torch.equal(other[name].float(), weight), (file, name)
        exponents = stored[name + "_scales"].to(torch.int32) - 127  # [E, out, in/32]
        step = torch.ldexp(torch.ones(exponents.shape), exponents).repeat_interleave(32, -1).transpose(1, 2)
        assert ((weight - bf16[name].float()).abs() <= step).all(), name
        assert not torch.equal(weight, bf16[name].float()), name
    model, base, tuned, root = made("gpt_oss")
    report = _same_reports(MXFP4_DATA, quantised.dequantised_copy(MXFP4_DATA, tmp_path / "deq", reference), tuned)
    assert sum(m["expert"] is not None for m in report["matrices"]) == 2 * 2 * 4  # 2 blocks x 2 tensors x 4 experts


COMPRESSED = {
    "pack-quantized-w4-group": (
        "pack-quantized",
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 8},
    ),
    "pack-quantized-w4-group-asym": (
        "pack-quantized",
        {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16},
    ),
    "pack-quantized-w4-group8-asym-moe": (
        "pack-quantized",
        {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 8},
    ),
    "pack-quantized-w4-channel": (
        "pack-quantized",
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"},
    ),
    "int-quantized-w8-channel": (
        "int-quantized",
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    ),
    "float-quantized-fp8-channel": (
        "float-quantized",
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
    ),
    "naive-quantized-w8-tensor": (
        "naive-quantized",
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor"},
    ),
}


@pytest.mark.parametrize("case", sorted(COMPRESSED))
def test_compressed_tensors(made, case):
    fmt, scheme = COMPRESSED[case]
    family = "qwen3_moe" if case.endswith("-moe") or case == "pack-quantized-w4-group" else "llama"
    model, base, tuned, root = made(family)
    fake: dict[str, torch.Tensor] = {}
    folder = quantised.compressed(
        base,
        root / case,
        scheme,
        fmt,
        ignore=("lm_head", "re:.*embed_tokens", "re:.*layers\\.1\\.self_attn\\.o_proj"),
        fake=fake,
    )
    reference = _compressed_reference(folder)
    source = open_location(str(folder))
    assert source.storage("model.layers.1.self_attn.o_proj.weight") == "fp32"  # ignored: stored as is
    for name, expected in reference.items():
        assert torch.equal(source.load(name), expected), name
    if not scheme["symmetric"]:
        # Routers over 4 experts pack their zero points into one int32 row, which
        # compressed-tensors 0.20's decompress cannot unpack (it raises); every weight,
        # those included, equals the library's own fake_quantize of the original.
        assert case != "pack-quantized-w4-group8-asym-moe" or set(fake) - set(reference) == {
            f"model.layers.{i}.mlp.gate.weight" for i in range(2)
        }
        for name, expected in fake.items():
            assert torch.equal(source.load(name), expected), name
    _same_reports(folder, quantised.dequantised_copy(folder, root / (case + "-deq"), reference | fake), tuned)


@pytest.mark.parametrize(("quant_type", "double"), [("nf4", True), ("fp4", False)])
def test_bitsandbytes_4bit(made, quant_type, double):
    model, base, tuned, root = made("llama")
    folder = quantised.bnb_4bit(base, root / f"{quant_type}{double}", quant_type, double)
    reference = _bnb_reference(folder)
    _check_exact(folder, reference, quant_type + (", double-quantised" if double else ""))
    _same_reports(folder, quantised.dequantised_copy(folder, root / f"{quant_type}{double}-deq", reference), tuned)


def test_bitsandbytes_8bit(made):
    model, base, tuned, root = made("llama")
    folder = quantised.bnb_8bit(base, root / "int8")
    reference = _bnb_reference(folder)
    _check_exact(folder, reference, "int8 (LLM.int8)")
    _same_reports(folder, quantised.dequantised_copy(folder, root / "int8-deq", reference), tuned)


GPTQ_DATA = Path(__file__).parent / "data" / "gptq"
GPTQ = {  # tests/data/gptq (scripts/make_gptq_fixtures.py): case -> its reference's case, storage labels
    "w4g16": ("w4g16", {"int4 groups of 16 (GPTQ)"}),
    "w4g16-sym": ("w4g16-sym", {"int4 groups of 16, symmetric (GPTQ)"}),
    "w4g16-v2": ("w4g16", {"int4 groups of 16 (GPTQ)"}),
    "w4g16-square-act-order": ("w4g16-square-act-order", {"int4 groups of 16, act-order (GPTQ)"}),
    "w4g16-dynamic": ("w4g16-dynamic", {"int4 groups of 16 (GPTQ)", "int8 groups of 32, symmetric (GPTQ)"}),
    "w8-channel-sym": ("w8-channel-sym", {"int8 per channel, symmetric (GPTQ)"}),
    "w3g16": ("w3g16", {"int3 groups of 16 (GPTQ)"}),
    "w2g32": ("w2g32", {"int2 groups of 32 (GPTQ)"}),
    "mixtral-w4g16": ("mixtral-w4g16", {"int4 groups of 16 (GPTQ)"}),
    "qwen3-moe-w4g16-sym": ("qwen3-moe-w4g16-sym", {"int4 groups of 16, symmetric (GPTQ)"}),
    "llava-w4g16": ("llava-w4g16", {"int4 groups of 16 (GPTQ)"}),
}


AWQ_DATA = Path(__file__).parent / "data" / "awq"
AWQ = {  # tests/data/awq (scripts/make_awq_fixtures.py): case -> storage label
    "llama-w4g16": "int4 groups of 16 (AWQ)",
    "llama-w4-channel": "int4 per channel (AWQ)",
    "mixtral-w4g16": "int4 groups of 16 (AWQ)",
    "qwen3-moe-w4g16-sym": "int4 groups of 16, symmetric (AWQ)",
    "llava-w4g16": "int4 groups of 16 (AWQ)",
}


def _labels(folder: Path) -> set[str]:
    """The storage labels of the quantised matrices of ``folder`` (a case of tests/data/gptq or awq)."""
    return GPTQ[folder.name][1] if folder.parent == GPTQ_DATA else {AWQ[folder.name]}


def _case_id(folder: Path) -> str:
    return f"{folder.parent.name}/{folder.name}"


@pytest.mark.parametrize("case", sorted(GPTQ))
def test_gptq_written_by_auto_round_equals_its_own_kernel(case):
    """Every matrix equals auto-round's GPTQ kernel's dequantisation, bit for bit (fp16 products, as float32)."""
    folder = GPTQ_DATA / case
    reference_case, labels = GPTQ[case]
    reference = load_file(GPTQ_DATA / reference_case / "reference.safetensors")
    source = open_location(str(folder))
    stored = load_file(folder / "model.safetensors")
    assert set(reference) == {n.removesuffix(".qweight") + ".weight" for n in stored if n.endswith(".qweight")}
    for name, expected in reference.items():
        got = source.load(name)
        assert got.dtype == torch.float32 and torch.equal(got, expected.float()), name
    assert {source.storage(name) for name in reference} == labels
    assert not source.quantised_skips()
    assert not [n for n in source.names() if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    if case == "w4g16-dynamic":
        assert source.storage("model.layers.0.mlp.down_proj.weight") == "int8 groups of 32, symmetric (GPTQ)"


@pytest.mark.parametrize("case", sorted(AWQ))
def test_awq_written_by_auto_round_equals_autoawq(case):
    """Every matrix equals AutoAWQ's own ``dequantize_gemm``, element for element.

    AutoAWQ multiplies the code differences by the fp16 scales in fp16, and so does
    compressed-tensors (in the scales' dtype): the reference is stored in fp16 as AutoAWQ
    returns it, and read here as float32. ``llama-w4-channel`` is ``group_size: -1`` (one
    scale per output); ``qwen3-moe-w4g16-sym`` is ``zero_point: false``, whose ``qzeros``
    (all 8) are stored all the same and are parts of their weights, not names of their own.
    """
    folder = AWQ_DATA / case
    reference = load_file(folder / "reference.safetensors")
    source = open_location(str(folder))
    stored = load_file(folder / "model.safetensors")
    assert set(reference) == {n.removesuffix(".qweight") + ".weight" for n in stored if n.endswith(".qweight")}
    for name, expected in reference.items():
        assert expected.dtype == torch.float16, name
        got = source.load(name)
        assert got.dtype == torch.float32 and torch.equal(got, expected.float()), name
        assert source.storage(name) == AWQ[case], name
    assert not source.quantised_skips()
    assert not [n for n in source.names() if n.endswith((".qweight", ".qzeros", ".scales"))]


DENSE_CASES = [
    GPTQ_DATA / "w4g16-square-act-order",
    GPTQ_DATA / "w3g16",
    AWQ_DATA / "llama-w4g16",
    AWQ_DATA / "llama-w4-channel",
]


@pytest.mark.parametrize("folder", DENSE_CASES, ids=_case_id)
def test_gptq_and_awq_report_equals_the_dequantised_base(folder, tmp_path):
    reference = {n: t.float() for n, t in load_file(folder / "reference.safetensors").items()}
    base = quantised.dequantised_copy(folder, tmp_path / "deq", reference)
    g = torch.Generator().manual_seed(0)
    tuned = {}
    for name, tensor in load_file(base / "model.safetensors").items():
        if tensor.dim() == 2:
            left, right = torch.randn(tensor.shape[0], 4, generator=g), torch.randn(4, tensor.shape[1], generator=g)
            tensor = tensor + 0.02 * left @ right
        tuned[name] = tensor.to(torch.bfloat16)
    tuned_folder = quantised.full_precision_copy(base, tmp_path / "tuned", tuned)
    report = _same_reports(folder, base, tuned_folder)
    assert {m["storage"] for m in report["matrices"] if m["name"] in reference} == _labels(folder)
    assert {m["name"] for m in report["matrices"]} >= set(reference)


#: auto-round's GPTQ and AWQ MoE and multimodal cases (the same models in both formats): how
#: many expert matrices, how many of the vision tower.
FAMILIES = {"mixtral-w4g16": (12, 0), "qwen3-moe-w4g16-sym": (12, 0), "llava-w4g16": (0, 6)}
FAMILY_CASES = [data / case for case in sorted(FAMILIES) for data in (GPTQ_DATA, AWQ_DATA)]


@pytest.mark.parametrize("in_memory", [False, True], ids=["save_pretrained", "in_memory"])
@pytest.mark.parametrize("folder", FAMILY_CASES, ids=_case_id)
def test_gptq_and_awq_moe_and_multimodal_report_equals_the_dequantised_base(folder, in_memory, tmp_path):
    """auto-round's per-expert GPTQ and AWQ modules against a bf16 fine-tune stored per expert or fused.

    Mixtral's GPTQ and AWQ experts are ``block_sparse_moe.experts.N.gate_proj``/``up_proj``/``down_proj``
    where its own checkpoints have ``w1``/``w3``/``w2`` and the model in memory one fused
    ``gate_up_proj``: each must be paired with its expert (and half) of the fine-tune.
    """
    reference = {n: t.float() for n, t in load_file(folder / "reference.safetensors").items()}
    base = quantised.dequantised_copy(folder, tmp_path / "deq", reference)
    tuned = quantised.fine_tune_of(folder, tmp_path / "tuned", in_memory=in_memory)
    report = _same_reports(folder, base, tuned)
    analysed = {m["name"]: m for m in report["matrices"]}
    assert set(reference) <= set(analysed), sorted(set(reference) - set(analysed))
    assert {analysed[n]["storage"] for n in reference} == _labels(folder)
    assert {m["tuned_storage"] for m in report["matrices"]} == {"bf16"}
    assert not report["unmatched"] and not report["shape_mismatches"]
    experts, vision = FAMILIES[folder.name]
    assert sum(m["expert"] is not None for m in report["matrices"]) == experts
    assert sorted({m["expert"] for m in report["matrices"]} - {None}) == list(range(4 if experts else 0))
    assert {m["storage"] for m in report["matrices"] if m["stack"] == "vision"} == ({"fp32"} if vision else set())
    assert sum(m["stack"] == "vision" for m in report["matrices"]) == vision
    # Every analysed quantised matrix is a GPTQ (AWQ) one; the others are the routers and the vision tower.
    assert {n for n, m in analysed.items() if m["storage"] in _labels(folder)} == set(reference)
    # Each is paired with its own expert (and half of a fused gate_up_proj): the fine-tune
    # (the same seeded model, changed by 2%) differs from it by that change plus the 4-bit
    # rounding, ~7% of the weight; paired with another matrix it would differ by ~140%.
    for name, weight in reference.items():
        assert analysed[name]["delta_fro"] < 0.15 * float(weight.norm()), name


@pytest.mark.parametrize("in_memory", [False, True], ids=["save_pretrained", "in_memory"])
@pytest.mark.parametrize("folder", FAMILY_CASES, ids=_case_id)
def test_gptq_and_awq_moe_and_multimodal_as_the_fine_tune_of_a_bf16_base(folder, in_memory, tmp_path):
    """The other way round: a bf16 base (per expert or fused) against the GPTQ (AWQ) checkpoint.

    Against a fused base, each expert's quantised ``gate_proj`` and ``up_proj`` are joined
    into the base's ``gate_up_proj`` slice; the joined matrix is stored as they are.
    """
    reference = {n: t.float() for n, t in load_file(folder / "reference.safetensors").items()}
    deq = quantised.dequantised_copy(folder, tmp_path / "deq", reference)
    base = quantised.fine_tune_of(folder, tmp_path / "base", in_memory=in_memory)
    got = to_report(compare(str(base), [str(folder)], cache=None, device="cpu"))["models"][0]
    want = to_report(compare(str(base), [str(deq)], cache=None, device="cpu"))["models"][0]
    report = _same_models(got, want)
    assert not report["unmatched"] and not report["shape_mismatches"]
    experts, vision = FAMILIES[folder.name]
    fused = in_memory and experts
    assert sum(m["expert"] is not None for m in report["matrices"]) == (experts * 2 // 3 if fused else experts)
    (label,) = _labels(folder)
    quantised_matrices = len(reference) - (experts // 3 if fused else 0)  # gate and up joined: one matrix
    assert report["summary"]["storage"]["tuned"] == {
        label: quantised_matrices,
        "fp32": len(report["matrices"]) - quantised_matrices,
    }
    assert {m["tuned_storage"] for m in report["matrices"] if m["module"] != "router" and m["stack"] != "vision"} == {
        label
    }
    smallest = min(float(w.norm()) for w in reference.values())
    assert max(m["delta_fro"] for m in report["matrices"] if m["tuned_storage"] == label) < 0.15 * smallest


def _gptq_folder(tmp_path: Path, qconfig: dict, src: Path = GPTQ_DATA / "w4g16", **replace) -> Path:
    """``src`` (tests/data/gptq/w4g16) with another ``quantization_config`` and some stored tensors replaced."""
    from safetensors.torch import save_file

    state = load_file(src / "model.safetensors") | replace
    save_file({n: t for n, t in state.items() if t is not None}, str(tmp_path / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] |= qconfig
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_gptq_formats_not_read_are_skipped_naming_them_never_read_raw(tmp_path):
    source = open_location(str(_gptq_folder(tmp_path, {"checkpoint_format": "marlin"})))
    skips = source.quantised_skips()
    assert len(skips) == 7 and all(s["name"].endswith(".qweight") for s in skips)
    assert (
        skips[0]["reason"]
        == "GPTQ weight in the 'marlin' checkpoint format: only gptq and gptq_v2 are read (not read raw)"
    )
    assert not [n for n in source.names() if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    source = open_location(str(_gptq_folder(tmp_path, {"checkpoint_format": "gptq", "bits": 5})))
    assert {s["reason"] for s in source.quantised_skips()} == {
        "GPTQ 5-bit weight packed in 2-D int32: only 2, 3, 4 and 8 bits packed in 2-D int32 are read (not read raw)"
    }


def test_gptq_missing_or_misfit_parts_are_one_error_naming_the_tensor(tmp_path):
    module = "model.layers.0.self_attn.q_proj"
    with pytest.raises(InputError, match=rf"{module}\.qweight.*no qzeros"):
        open_location(str(_gptq_folder(tmp_path, {}, **{module + ".qzeros": None})))
    with pytest.raises(InputError, match=rf"{module}\.qweight.*scales has shape \(1, 32\), not \(2, 32\)"):
        open_location(str(_gptq_folder(tmp_path, {}, **{module + ".scales": torch.ones(1, 32, dtype=torch.float16)})))
    with pytest.raises(InputError, match=rf"{module}\.qweight.*qzeros are torch\.int64, not torch\.int32"):
        zeros = load_file(GPTQ_DATA / "w4g16" / "model.safetensors")[module + ".qzeros"]
        open_location(str(_gptq_folder(tmp_path, {}, **{module + ".qzeros": zeros.long()})))
    g_idx = torch.full((32,), 7, dtype=torch.int32)
    source = open_location(str(_gptq_folder(tmp_path, {}, **{module + ".g_idx": g_idx})))
    with pytest.raises(
        InputError, match=r"q_proj\.weight.*cannot be dequantised: its g_idx names groups outside 0\.\.1"
    ):
        source.load(module + ".weight")


def test_awq_versions_not_read_are_skipped_and_misfit_parts_are_one_error(tmp_path):
    src, module = AWQ_DATA / "llama-w4g16", "model.layers.0.self_attn.q_proj"
    for qconfig, reason in [
        ({"version": "gemv"}, "AWQ 4-bit weight: AWQ gemv 4-bit is not read (not read raw)"),
        ({"bits": 5}, "AWQ 5-bit weight: AWQ gemm 5-bit is not read (not read raw)"),
    ]:
        source = open_location(str(_gptq_folder(tmp_path, qconfig, src)))
        skips = source.quantised_skips()
        assert len(skips) == 7 and {s["reason"] for s in skips} == {reason}
        assert not [n for n in source.names() if n.endswith((".qweight", ".qzeros", ".scales"))]
    with pytest.raises(InputError, match=rf"{module}\.qweight.*no qzeros"):
        open_location(str(_gptq_folder(tmp_path, {}, src, **{module + ".qzeros": None})))
    down = "model.layers.0.mlp.down_proj.qweight"  # [64, 32]: 4 groups of 16 inputs, or 1 per channel
    with pytest.raises(InputError, match=rf"{down}': its scales have shape \(4, 32\), not \(1, 32\)"):
        open_location(str(_gptq_folder(tmp_path, {"group_size": -1}, src)))
    channel = AWQ_DATA / "llama-w4-channel"
    with pytest.raises(InputError, match=rf"{down}': its scales have shape \(1, 32\), not \(4, 32\)"):
        open_location(str(_gptq_folder(tmp_path, {"group_size": 16}, channel)))


def test_cache_keys_come_from_codes_and_scales(made, tmp_path):
    model, base, tuned, root = made("llama")
    folder = quantised.fp8_blocks(base, root / "fp8-keys")
    source = open_location(str(folder))
    name = "model.layers.0.mlp.up_proj.weight"
    seen = []

    def stored(file, tensor, load):
        seen.append(tensor)
        return f"d({tensor})"

    source.stored_digest(name, stored)
    assert sorted(seen) == [name, name + "_scale_inv"]
    from safetensors.torch import save_file

    state = load_file(folder / "model.safetensors")
    state[name + "_scale_inv"] = state[name + "_scale_inv"] * 2  # the same codes, other scales
    other = quantised._write(
        folder, tmp_path / "other", state, json.loads((folder / "config.json").read_text())["quantization_config"]
    )
    from analysis.provenance import hash_stored

    assert open_location(str(other)).stored_digest(name, hash_stored) != source.stored_digest(name, hash_stored)
    assert save_file  # imported for the writer above


def test_qlora_adapter_on_an_nf4_base_equals_peft_merge(made):
    """Each adapted matrix is what PEFT's ``Linear4bit.merge`` computes before re-quantising."""
    from peft import PeftModel
    from peft.utils.integrations import dequantize_bnb_weight
    from transformers import AutoModelForCausalLM

    from analysis.compare import plan_models

    model, base, tuned, root = made("llama")
    folder = quantised.bnb_4bit(base, root / "qlora-base")
    adapter, _, _ = families.make_adapter(model, "llama", "all", root / "qlora-adapter")
    quantised_model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    peft_model = PeftModel.from_pretrained(quantised_model, adapter)
    expected = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            weight = module.get_base_layer().weight
            merged = dequantize_bnb_weight(weight, state=weight.quant_state) + module.get_delta_weight("default")
            expected[name.removeprefix("base_model.model.") + ".weight"] = merged.float()
    plan = plan_models(str(folder), [str(adapter)])[0]
    got = {m.name: m.load_tuned().weight for m in plan.matrices}
    assert set(got) == set(expected) and len(got) == 14
    for name, weight in got.items():
        assert torch.allclose(weight, expected[name], rtol=0, atol=1e-6), name
    assert {m.id.storage for m in plan.matrices} == {"nf4, double-quantised"}


def test_merged_export_of_a_quantised_base_is_bf16_without_the_quantisation_config(made, tmp_path):
    from transformers import AutoModelForCausalLM

    from analysis.mitigation import MitigationSettings, export_merged, run
    from analysis.specs import SpecResolver

    model, base, tuned, root = made("llama")
    folder = quantised.bnb_4bit(base, root / "export-base")
    adapter, _, _ = families.make_adapter(model, "llama", "all", root / "export-adapter")
    resolver = SpecResolver(allow_local_paths=True)
    result = run(resolver, str(folder), str(adapter), MitigationSettings(lam=0.25), cache=None)
    out = export_merged(result.mitigation, resolver, str(folder), str(adapter), tmp_path / "merged")
    written = load_file(str(out / "model.safetensors"))
    assert not [n for n in written if ".absmax" in n or "quant_state" in n or "quant_map" in n]
    source = open_location(str(folder))
    for name in source.quant.tensors:
        assert written[name].dtype == torch.bfloat16 and tuple(written[name].shape) == source.shape(name), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert "dequantised, in bf16" in (out / "MITIGATION.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out)  # transformers loads it as a plain model
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype in (torch.bfloat16, torch.float32)


def test_fp8_base_against_an_fp8_fine_tune(made):
    """Both sides quantised (DeepSeek-R1 against V3-Base): the same as both dequantised."""
    model, base, tuned, root = made("mixtral")
    base_fp8 = quantised.fp8_blocks(base, root / "fp8-both-base")
    tuned_fp8 = quantised.fp8_blocks(tuned, root / "fp8-both-tuned")
    tuned_reference = quantised.dequantised_copy(tuned_fp8, root / "fp8-both-tuned-deq", _fp8_reference(tuned_fp8))
    base_reference = quantised.dequantised_copy(base_fp8, root / "fp8-both-base-deq", _fp8_reference(base_fp8))
    result = compare(str(base_fp8), [str(tuned_fp8)], cache=None, device="cpu")
    got = to_report(result)["models"][0]
    want = to_report(compare(str(base_reference), [str(tuned_reference)], cache=None, device="cpu"))["models"][0]
    # The HTML report says how each fine-tune's matrices are stored, beside its totals.
    page = html_report(result, 0.5)
    assert "base fp8 e4m3, 16x16 blocks (" in page and "fine-tune fp8 e4m3, 16x16 blocks (" in page
    assert [(m["name"], m["expert"], m["intruders"], m["rank90"]) for m in got["matrices"]] == [
        (m["name"], m["expert"], m["intruders"], m["rank90"]) for m in want["matrices"]
    ]
    for a, b in zip(got["matrices"], want["matrices"], strict=True):
        assert math.isclose(a["delta_fro"], b["delta_fro"], rel_tol=1e-4), a["name"]
    assert {m["tuned_storage"] for m in got["matrices"]} >= {"fp8 e4m3, 16x16 blocks"}


def test_a_cached_quantised_analysis_gives_the_same_report(made, tmp_path):
    from analysis.cache import SpectrumCache

    model, base, tuned, root = made("llama")
    folder = quantised.fp8_blocks(base, root / "fp8-cached")
    cache = SpectrumCache(tmp_path / "cache")
    first = to_report(compare(str(folder), [str(tuned)], cache=cache, device="cpu"))
    again = to_report(compare(str(folder), [str(tuned)], cache=cache, device="cpu"))
    fresh = to_report(compare(str(folder), [str(tuned)], cache=None, device="cpu"))
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert [m["intruders"] for m in first["models"][0]["matrices"]] == [
        m["intruders"] for m in fresh["models"][0]["matrices"]
    ]


def test_an_fp8_file_without_a_config_is_found_by_its_scale_names(made, tmp_path):
    """A lone .safetensors upload has no config.json: the 16x16 blocks are inferred from the shapes."""
    import shutil

    model, base, tuned, root = made("llama")
    folder = quantised.fp8_blocks(base, root / "fp8-noconfig-src")
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    source = open_location(str(tmp_path / "model.safetensors"))
    reference = _fp8_reference(folder)
    for name, expected in reference.items():
        assert source.storage(name) == "fp8 e4m3, 16x16 blocks" and torch.equal(source.load(name), expected)
    assert not [n for n in source.names() if n.endswith("_scale_inv")]


def test_without_the_library_compressed_weights_are_skipped_naming_the_package(made, monkeypatch):
    from analysis.quant import compressed as compressed_format

    model, base, tuned, root = made("llama")
    fmt, scheme = COMPRESSED["pack-quantized-w4-channel"]
    folder = quantised.compressed(base, root / "no-library", scheme, fmt, ignore=("lm_head", "re:.*embed_tokens"))
    monkeypatch.setattr(compressed_format, "_library", lambda: None)
    source = open_location(str(folder))
    skipped = source.quantised_skips()
    assert len(skipped) == 14 and all(s["name"].endswith(".weight_packed") for s in skipped)
    assert all("install compressed-tensors" in s["reason"] for s in skipped)
    assert not [n for n in source.names() if n.rsplit(".", 1)[-1].startswith("weight_")]


def test_awq_gemm_with_eight_output_routers(made):
    """AutoAWQ's layout packed here, for the one case auto-round does not write (tests/data/awq is its output).

    ``mixtral8``'s routers have 8 outputs: their codes and zero points pack into one int32
    word a row, and the zero points unpack to one int32 row of compressed-tensors'
    pack-quantized form, which its decompress cannot unpack by itself. auto-round leaves
    every matrix with a dimension not a multiple of 32 unquantised, so this checkpoint is
    packed by tests/quantised.py ``awq_gemm`` (as AutoAWQ's ``WQLinear_GEMM.from_linear``);
    the reference is ``(q - z) * s`` in float64, rounded as fp16 scales give.
    """
    model, base, tuned, root = made("mixtral8")
    folder, expected = quantised.awq_gemm(base, root / "awq")
    assert {n for n in expected if n.endswith(".gate.weight")} == {
        f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)
    }
    source = open_location(str(folder))
    got = {}
    for name, reference in expected.items():
        assert source.storage(name) == "int4 groups of 16 (AWQ)"
        got[name] = source.load(name)
        # The library multiplies in the scales' dtype (fp16), as AutoAWQ's kernels do.
        assert torch.equal(got[name], reference.to(torch.float16).to(torch.float32)), name
    assert not source.quantised_skips()
    assert not [n for n in source.names() if n.endswith((".qweight", ".qzeros", ".scales"))]
    _same_reports(folder, quantised.dequantised_copy(folder, root / "awq-deq", got), tuned)


def test_dequantise_device_setting(made, monkeypatch):
    model, base, tuned, root = made("llama")
    folder = quantised.fp8_blocks(base, root / "fp8-device")
    name = "model.layers.0.mlp.up_proj.weight"
    monkeypatch.setenv("WSE_DEQUANTISE_DEVICE", "gpu")
    with pytest.raises(InputError, match="WSE_DEQUANTISE_DEVICE.*auto, cpu, cuda"):
        open_location(str(folder)).load(name)
    if not torch.cuda.is_available():
        monkeypatch.setenv("WSE_DEQUANTISE_DEVICE", "cuda")
        with pytest.raises(InputError, match="no CUDA GPU"):
            open_location(str(folder)).load(name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_every_format_dequantises_to_the_same_bytes(made, monkeypatch):
    model, base, tuned, root = made("llama")
    folders = [
        quantised.fp8_blocks(base, root / "gpu-fp8"),
        MXFP4_DATA,
        quantised.compressed(
            base,
            root / "gpu-ct",
            *reversed(COMPRESSED["pack-quantized-w4-group-asym"]),
            ignore=("lm_head", "re:.*embed_tokens"),
        ),
        AWQ_DATA / "llama-w4g16",
        AWQ_DATA / "llama-w4-channel",
        AWQ_DATA / "qwen3-moe-w4g16-sym",
        GPTQ_DATA / "w3g16",
        GPTQ_DATA / "w4g16-square-act-order",
    ]
    for folder in folders:
        source = open_location(str(folder))
        for name in source.quant.tensors:
            monkeypatch.setenv("WSE_DEQUANTISE_DEVICE", "cpu")
            on_cpu = source.load(name)
            monkeypatch.setenv("WSE_DEQUANTISE_DEVICE", "cuda")
            assert torch.equal(source.load(name), on_cpu), (folder.name, name)


def test_fbgemm_fp8_per_channel_and_unread_fp8_is_never_raw(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    scale = (w.abs().amax(1, keepdim=True) / 448).to(torch.float32)  # one scale a row, as fbgemm's quantiser
    codes = (w / scale.double()).to(torch.float8_e4m3fn)
    name = "model.layers.0.mlp.up_proj.weight"
    odd = "model.layers.0.mlp.experts.gate_up_proj"  # fused FP8 experts fbgemm would scale [E, 1, out]: not read
    state = {name: codes, name + "_scale": scale, odd: torch.zeros(2, 32, 48).to(torch.float8_e4m3fn)}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fbgemm_fp8"}}))
    source = open_location(str(tmp_path))
    assert source.storage(name) == "fp8 e4m3, per channel"
    assert torch.equal(source.load(name), codes.to(torch.float32) * scale)
    assert source.quantised_skips() == [
        {"name": odd, "reason": "FP8 tensor of a fbgemm_fp8 checkpoint that its dequantiser does not read"}
    ]
    assert odd not in source.names()
