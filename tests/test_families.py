"""Today's families end to end (issue 10): every block matrix and expert slice analysed,
unique identities, nothing dropped without a reason, counts equal to the papers' procedure
on PEFT's own ``merge_and_unload()`` weights.

Models are built once per test session (:mod:`tests.families`); each family's test runs
the command line once on the base, a full fine-tune and two PEFT adapters (PEFT's default
targets and ``all-linear``, which on MoE models adds ``target_parameters`` on the experts).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cli import main
from tests import families

_BLOCK_WORDS = ("layers", "layer", "h", "blocks", "block")


@pytest.fixture(scope="session")
def family_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


_BUILT: dict[str, dict] = {}


def built(family: str, root: Path) -> dict:
    """Base, full fine-tune and adapters of ``family``, built once per session."""
    if family not in _BUILT:
        families.quiet()
        model = families.build(family)
        out = root / family
        entry = {"base": families.save(model, family, out / "base"), "model": model}
        tuned = copy.deepcopy(model)
        families.perturb(tuned)
        entry["full"] = families.save(tuned, family, out / "full")
        for targets in ("default", "all"):
            entry[targets], entry[f"{targets}_merged"], entry[f"{targets}_config"] = families.make_adapter(
                model, family, targets, out / targets
            )
        _BUILT[family] = entry
    return _BUILT[family]


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _in_block(name: str) -> bool:
    parts = name.split(".")
    return any(p in _BLOCK_WORDS and i + 1 < len(parts) and parts[i + 1].isdigit() for i, p in enumerate(parts))


def expected_matrices(folder: Path) -> int:
    """Every 2-D weight inside the blocks except embeddings, plus every expert slice of a
    3-D expert tensor, counted from the file itself."""
    count = 0
    for name, tensor in _stored(folder).items():
        if not _in_block(name) or not tensor.is_floating_point():
            continue
        if tensor.dim() == 2 and name.endswith(".weight") and "relative_attention_bias" not in name:
            count += 1
        elif tensor.dim() == 3 and ".experts." in name:
            count += tensor.shape[0]
    return count


def _find_in_memory(stored: torch.Tensor, memory: dict[str, torch.Tensor]) -> tuple[str, int | None, slice]:
    """Where the stored matrix lives in the model in memory: (name, expert, rows), found by value."""
    for name, tensor in memory.items():
        if tensor.dim() == 2 and tensor.shape == stored.shape and torch.equal(tensor, stored):
            return name, None, slice(None)
        if tensor.dim() == 3:
            for e in range(tensor.shape[0]):
                candidate = tensor[e]
                for start in range(0, candidate.shape[0] - stored.shape[0] + 1, max(1, stored.shape[0])):
                    rows = slice(start, start + stored.shape[0])
                    part = candidate[rows]
                    if part.shape == stored.shape and torch.equal(part, stored):
                        return name, e, rows
                    if candidate.shape == stored.shape[::-1] and torch.equal(candidate.T, stored):
                        return name, e, slice(None)
    raise AssertionError("stored matrix not found in memory")


def reference_counts(base: torch.Tensor, tuned: torch.Tensor, k: int, epsilons: list[float]) -> tuple[list, np.ndarray]:
    """The papers' procedure: two float32 SVDs, score_j = max_i |Ut[:, j]^T U0[:, i]|."""
    U0 = torch.linalg.svd(base.float(), full_matrices=False).U
    Ut = torch.linalg.svd(tuned.float(), full_matrices=False).U
    scores = (Ut[:, :k].T @ U0).abs().max(dim=1).values.numpy()
    return [int((scores < eps).sum()) for eps in epsilons], scores


@pytest.mark.parametrize("family", families.FAMILIES)
def test_family_end_to_end(family: str, family_root: Path, tmp_path: Path) -> None:
    entry = built(family, family_root)
    out = tmp_path / "report.json"
    tuned = [str(entry[t]) for t in ("full", "default", "all")]
    code = main(["report", str(entry["base"]), *tuned, "--out", str(out), "--quiet", "--no-cache"])
    assert code == 0
    report = json.loads(out.read_text())
    full, default, all_linear = report["models"]
    expected = expected_matrices(entry["base"])
    assert len(full["matrices"]) == expected
    assert len(all_linear["matrices"]) == expected, "all-linear adapts every block matrix, experts included"
    stored = _stored(entry["base"])
    for model in report["models"]:
        identities = [(m["stack"], m["layer"], m["module"], m["expert"]) for m in model["matrices"]]
        assert len(set(identities)) == len(identities)
        analysed = {m["name"] for m in model["matrices"]}
        skipped = {s["name"] for s in model["skipped"]}
        assert analysed.isdisjoint(skipped) and all(s["reason"] for s in model["skipped"])
        assert analysed | skipped == set(stored), "every base tensor is analysed or skipped with a reason"
    if family in families.MOE:
        assert {m["module"] for m in all_linear["matrices"]} >= {"router", "down"}
        assert {m["expert"] for m in all_linear["matrices"]} == {None, 0, 1, 2, 3}
    if family == "t5":
        assert {m["stack"] for m in full["matrices"]} == {"encoder", "decoder"}
        assert {"self_attn_out", "cross_attn_out"} <= {m["module"] for m in full["matrices"]}
        assert any("relative_attention_bias" in s["name"] for s in full["skipped"])
    if family == "llava":
        assert {m["stack"] for m in full["matrices"]} == {"vision", "language"}

    # Counts against the papers' procedure on PEFT's merge_and_unload() weights.
    memory = {n: t.detach() for n, t in entry["model"].state_dict().items()}
    merged = entry["all_merged"]
    picks = all_linear["matrices"][:3] + [m for m in all_linear["matrices"] if m["expert"] is not None][:2]
    for matrix in picks:
        tensor = stored[matrix["name"]]
        if tensor.dim() == 3:
            layout_t = tensor[matrix["expert"]]
            name, e, rows = _find_in_memory(layout_t, memory)
        else:
            name, e, rows = _find_in_memory(tensor, memory)
        base = memory[name] if e is None else memory[name][e]
        tuned_w = merged[name] if e is None else merged[name][e]
        if e is not None and base.shape != tensor.shape[-2:] and base.T.shape == tensor.shape[-2:]:
            base, tuned_w = base.T, tuned_w.T
        base, tuned_w = base[rows], tuned_w[rows]
        # GPT-2's Conv1D and gpt-oss's experts store in x out; the forward applies out x in.
        if family == "gpt2" or (family == "gpt_oss" and e is not None):
            base, tuned_w = base.T, tuned_w.T
        assert list(base.shape) == matrix["shape"]
        counts, scores = reference_counts(base, tuned_w, report["top_k"], report["epsilons"])
        assert np.allclose(matrix["intruder_scores"], scores[: len(matrix["intruder_scores"])], atol=2e-3)
        for eps, got, want in zip(report["epsilons"], matrix["intruders"], counts, strict=True):
            if np.min(np.abs(scores - eps)) > 2e-3:  # no score at the threshold itself
                assert got == want, (matrix["name"], eps)


@pytest.mark.parametrize("family", ["qwen3_moe_fused", "gpt_oss"])
def test_expert_slices_are_what_the_forward_pass_applies(family: str, family_root: Path) -> None:
    """Each fused expert slice, as the plan hands it out (``out x in``), is the map the
    experts module applies: ``F.linear(x, W)`` reproduces the module's own computation."""
    from analysis.pairing import plan_comparison
    from analysis.specs import open_model

    entry = built(family, family_root)
    plan = plan_comparison(open_model(entry["base"]), open_model(entry["full"]))
    experts = entry["model"].model.layers[0].mlp.experts
    x = torch.randn(5, families.H, generator=torch.Generator().manual_seed(0))
    for expert in range(4):
        loaded = {m.module: m.load_base() for m in plan.matrices if m.layer == 0 and m.expert == expert}
        assert set(loaded) == {"gate_up", "down"}
        gate_up = torch.nn.functional.linear(x, loaded["gate_up"])
        if family == "gpt_oss":  # the module's own: x @ W[e] (+ bias), [E, in, out]
            own = x @ experts.gate_up_proj[expert].detach() + experts.gate_up_proj_bias[expert].detach()
            assert torch.allclose(gate_up + experts.gate_up_proj_bias[expert].detach(), own, atol=1e-6)
            hidden = torch.randn(5, loaded["down"].shape[1], generator=torch.Generator().manual_seed(1))
            own_down = hidden @ experts.down_proj[expert].detach()
            assert torch.allclose(torch.nn.functional.linear(hidden, loaded["down"]), own_down, atol=1e-6)
            continue
        gate, up = gate_up.chunk(2, dim=-1)
        expected = torch.nn.functional.linear(experts.act_fn(gate) * up, loaded["down"])
        index = torch.full((5, 1), expert)
        with torch.no_grad():
            got = experts(x, index, torch.ones(5, 1))
        assert torch.allclose(got, expected, atol=1e-5)


def test_peft_intruder_detector_on_gpt2_matches_side_right(family_root: Path) -> None:
    """PEFT's own detector (``peft.tuners.lora.intruders.reduce_intruder_dimension``)
    decomposes the weight as the layer stores it. GPT-2's ``Conv1D`` stores ``in x out``,
    so its "left" singular vectors are the input space of the ``out x in`` matrix: its
    counts are the engine's ``--side right`` counts there (docs/models.md)."""
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    from analysis.compare import compare
    from analysis.pair_metrics import AnalysisSettings

    entry = built("gpt2", family_root)
    messages: list[str] = []
    peft_model = PeftModel.from_pretrained(copy.deepcopy(entry["model"]), entry["all"])
    with torch.no_grad():
        reduce_intruder_dimension(peft_model, top_k=10, threshold_epsilon=0.5, logging_sink=messages.append)
    peft_counts = {}
    for message in messages:
        found = re.match(r"^(\S+): (No intruders|Intruders: (\d+))$", str(message))
        if found:
            peft_counts[found[1].removeprefix("base_model.model.") + ".weight"] = int(found[3] or 0)
    result = compare(
        str(entry["base"]), [str(entry["all"])], epsilons=[0.5], cache=None, settings=AnalysisSettings(side="right")
    )
    checked = 0
    for matrix in result.models[0].matrices:
        if np.min(np.abs(matrix.intruder_scores[:10] - 0.5)) < 2e-3:
            continue  # a score at the threshold itself: float round-off decides
        assert matrix.intruder_counts(10, [0.5])[0] == peft_counts[matrix.name], matrix.name
        checked += 1
    assert checked >= 6


def test_zero_update_amplification_is_null_and_shown_as_missing(tiny_llama: Path, tmp_path: Path) -> None:
    """Undefined stays undefined: a fine-tune equal to its base has no amplification factor."""
    from analysis.compare import compare
    from analysis.report import to_report
    from charts import comparison, tables

    result = compare(str(tiny_llama), [str(tiny_llama)], cache=None)
    matrices = result.models[0].matrices
    assert matrices and all(m.amplification_factor is None for m in matrices)
    assert all(0.0 <= s <= 1.0 for m in matrices for s in m.intruder_scores)
    report = to_report(result)
    assert all(m["amplification_factor"] is None for m in report["models"][0]["matrices"])
    json.dumps(report, allow_nan=False)
    table = tables.amplification_table(result.models)
    assert table["amplification_factor"].isna().all()
    comparison.amplification_figure(result.models)  # draws, with no bar for an undefined factor
    assert tables.matrix_table(result.models, k=10, eps=0.5)["amplification_factor"].isna().all()


@pytest.mark.parametrize("family", [*families.MOE, "llava", "gpt2", "t5"])
def test_adapters_merge_exactly_as_peft_merge_and_unload(family: str, family_root: Path) -> None:
    """Every adapted matrix, experts and routers included (``target_parameters``), equals
    PEFT's own ``merge_and_unload()`` weight to float32 round-off, whatever the base's
    checkpoint naming (LLaVA) or expert layout (per-expert, fused, ``[E, in, out]``)."""
    from analysis.pairing import plan_comparison
    from analysis.specs import open_model

    entry = built(family, family_root)
    memory = {n: t.detach() for n, t in entry["model"].state_dict().items()}
    plan = plan_comparison(open_model(entry["base"]), open_model(entry["all"]))
    stored = _stored(entry["base"])
    changed = 0
    for matrix in plan.matrices:
        tensor = stored[matrix.name]
        tensor = tensor[matrix.expert] if tensor.dim() == 3 else tensor
        name, e, rows = _find_in_memory(tensor, memory)
        want = entry["all_merged"][name] if e is None else entry["all_merged"][name][e]
        if e is not None and want.T.shape == tensor.shape and want.shape != tensor.shape:
            want = want.T
        want = want[rows]
        if family == "gpt2" or (family == "gpt_oss" and e is not None):
            want = want.T
        got = matrix.load_tuned().weight
        assert got.shape == want.shape and torch.allclose(got, want.float(), atol=1e-6, rtol=1e-5), matrix.name
        changed += not torch.equal(got, matrix.load_base())
    assert changed == len(plan.matrices)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("base_layout", ["per-expert", "fused"])
def test_a_fine_tune_in_the_other_expert_layout_pairs_expert_by_expert(
    family: str, base_layout: str, tmp_path: Path
) -> None:
    """A base saved in one expert layout and its fine-tune in the other (the hub's
    per-expert Qwen3-MoE or Mixtral against a transformers 5 state dict, or the reverse): the
    fine-tune's experts are cut as the base stores them (gate and up split from, or joined
    into, ``gate_up_proj`` in transformers' order), so every expert matrix is paired, and
    each pair's matrices and result equal those from a fine-tune saved like its base."""
    from analysis.compare import plan_models
    from analysis.pipeline import analyse_plan

    families.quiet()
    model = families.build(family)
    tuned = copy.deepcopy(model)
    families.perturb(tuned)
    saved = {}
    for layout, how in (("per-expert", family), ("fused", "qwen3_moe_fused")):  # fused: the state dict as is
        saved[layout] = (families.save(model, how, tmp_path / f"{layout}-base"),)
        saved[layout] += (families.save(tuned, how, tmp_path / f"{layout}-tuned"),)
    other = "fused" if base_layout == "per-expert" else "per-expert"
    (mixed,) = plan_models(str(saved[base_layout][0]), [str(saved[other][1])])
    (same,) = plan_models(str(saved[base_layout][0]), [str(saved[base_layout][1])])
    assert not mixed.unmatched and not mixed.shape_mismatches and len(mixed.skipped) == len(same.skipped)
    identity = lambda m: (m.layer, m.module, m.expert)  # noqa: E731
    assert sorted(map(identity, mixed.matrices)) == sorted(map(identity, same.matrices))
    expected = {"gate", "up", "down"} if base_layout == "per-expert" else {"gate_up", "down"}
    assert {m.module for m in mixed.matrices if m.expert is not None} == expected
    assert [m.name for m in mixed.matrices] == [m.name for m in same.matrices]  # base tensors
    by_identity = {identity(m): m for m in same.matrices}
    for m in mixed.matrices:
        reference = by_identity[identity(m)]
        assert torch.equal(m.load_base(), reference.load_base())
        assert torch.equal(m.load_tuned().weight, reference.load_tuned().weight)
    results = {identity(r): r for r in analyse_plan(mixed, device="cpu")}
    for r in analyse_plan(same, device="cpu"):
        got = results[identity(r)]
        assert got.delta_singular_values.tobytes() == r.delta_singular_values.tobytes()
        assert got.intruder_scores.tobytes() == r.intruder_scores.tobytes()
