"""Intruder mitigation (analysis.mitigation) against PEFT's ``reduce_intruder_dimension``.

References: PEFT 0.21's own procedure on adapters PEFT saved, PEFT's ``merge_and_unload``
of the exported folder, and the papers' intruder count (two float32 ``torch.linalg.svd``)
on the merged weights.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis.cache import SpectrumCache
from analysis.errors import InputError
from analysis.mitigation import (
    TRADEOFF_STEP,
    MitigationSettings,
    export_adapter,
    export_merged,
    find_intruders,
    run,
)
from analysis.mitigation.tradeoff import evaluate_tradeoff, held_out_paragraphs
from analysis.specs import SpecResolver
from cli import main
from tests import factories
from ui.mitigation import zip_folder

EPSILONS = (0.3, 0.5, 0.7)


@pytest.fixture(scope="module")
def resolver() -> SpecResolver:
    return SpecResolver(allow_local_paths=True)


@pytest.fixture(scope="module")
def bert_adapter(tiny_bert: Path, model_root: Path) -> Path:
    """LoRA on every attention and MLP projection of the tiny BERT, large enough to intrude."""
    return factories.make_lora_adapter(tiny_bert, model_root / "mitigate-lora", "mlp", r=4, factor_std=0.3)


def _peft_reduced(base: Path, adapter: Path, settings: MitigationSettings) -> dict[str, torch.Tensor]:
    """PEFT's reduce_intruder_dimension: ``{module: scale * B @ A}`` of the new adapter."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(factories.load_model(base), adapter)
    reduce_intruder_dimension(
        model,
        top_k=settings.top_k,
        threshold_epsilon=settings.eps,
        mitigation_lambda=settings.lam,
        logging_sink=None,
    )
    return {
        name.removeprefix("base_model.model."): layer.get_delta_weight("intruder_reduced").detach().clone()
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def _peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """``{module: get_delta_weight}`` of an adapter folder as PEFT loads it."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(factories.load_model(base), adapter)
    return {
        name.removeprefix("base_model.model."): layer.get_delta_weight("default").detach().clone()
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def _paper_counts(base: torch.Tensor, merged: torch.Tensor, k: int) -> list[int]:
    """Def. 3.1 of Shuttleworth et al. with two float32 torch.linalg.svd."""
    U0 = torch.linalg.svd(base, full_matrices=False)[0]
    U = torch.linalg.svd(merged, full_matrices=False)[0]
    scores = (U[:, :k].T @ U0).abs().max(dim=1).values
    return [int((scores < eps).sum()) for eps in EPSILONS]


@pytest.mark.parametrize("lam", [0.75, 0.3])
def test_exported_update_equals_peft_reduce_intruder_dimension(tmp_path, resolver, tiny_bert, bert_adapter, lam):
    settings = MitigationSettings(lam=lam, top_k=10, eps=0.5, rule="peft")
    result = run(resolver, str(tiny_bert), str(bert_adapter), settings, cache=None)
    assert result.mitigation.totals()["intruders_scaled"] > 0  # the test exercises the scaling
    out = export_adapter(result.mitigation, resolver, str(bert_adapter), tmp_path / "mitigated")
    reference = _peft_reduced(tiny_bert, bert_adapter, settings)
    ours = _peft_deltas(tiny_bert, out)
    assert set(ours) == set(reference) and len(ours) == 12
    for name, delta in reference.items():
        scale = float(delta.abs().max())
        torch.testing.assert_close(ours[name], delta, atol=2e-5 * scale, rtol=0, msg=name)
    # The per-matrix numbers agree with the exported factors.
    merged = factories.peft_merged_state_dict(tiny_bert, out)
    base = load_file(str(tiny_bert / "model.safetensors"))
    for m in result.mitigation.matrices:
        delta = merged[m.name].double() - base[m.name].double()
        assert float(torch.linalg.norm(delta)) == pytest.approx(m.delta_fro_after, rel=1e-5)
        assert m.new_rank == m.rank == 8  # the "mlp" variant doubles r


def test_counts_after_equal_the_papers_procedure_on_the_merged_weights(tmp_path, resolver, tiny_bert, bert_adapter):
    settings = MitigationSettings(lam=0.0, top_k=10, eps=0.5, rule="peft")
    result = run(resolver, str(tiny_bert), str(bert_adapter), settings, cache=None)
    out = export_adapter(result.mitigation, resolver, str(bert_adapter), tmp_path / "mitigated")
    merged = factories.peft_merged_state_dict(tiny_bert, out)  # PEFT's merge_and_unload of the export
    original = factories.peft_merged_state_dict(tiny_bert, bert_adapter)
    base = load_file(str(tiny_bert / "model.safetensors"))
    after = {m.name: m for m in result.after.matrices}
    before = {m.name: m for m in result.before.matrices}
    changed = 0
    for name in after:
        paper_after = _paper_counts(base[name].float(), merged[name], 10)
        paper_before = _paper_counts(base[name].float(), original[name], 10)
        assert after[name].intruder_counts(10, EPSILONS) == paper_after, name
        assert before[name].intruder_counts(10, EPSILONS) == paper_before, name
        changed += paper_after != paper_before
    assert changed > 0  # removing the intruders (lambda = 0) changed some counts
    totals = result.counts(EPSILONS)
    assert sum(totals["after"]) < sum(totals["before"])


def test_top1_rule_scales_one_intruder_per_matrix(resolver, tiny_bert, bert_adapter):
    peft_rule = run(resolver, str(tiny_bert), str(bert_adapter), MitigationSettings(rule="peft"), cache=None)
    top1 = run(resolver, str(tiny_bert), str(bert_adapter), MitigationSettings(rule="top1"), cache=None)
    for a, b in zip(peft_rule.mitigation.matrices, top1.mitigation.matrices, strict=True):
        assert b.intruders == a.intruders[:1]
    assert top1.mitigation.totals()["intruders_scaled"] < peft_rule.mitigation.totals()["intruders_scaled"]


def test_exact_rank_r_plus_n_has_no_truncation_error_and_loads_in_peft(tmp_path, resolver, tiny_bert, bert_adapter):
    settings = MitigationSettings(lam=0.5, exact=True)
    result = run(resolver, str(tiny_bert), str(bert_adapter), settings, cache=None)
    out = export_adapter(result.mitigation, resolver, str(bert_adapter), tmp_path / "exact")
    ours = _peft_deltas(tiny_bert, out)
    for m in result.mitigation.matrices:
        assert m.new_rank == min(m.rank + len(m.intruders), min(m.shape))
        assert m.refactor_rel_error < 1e-5
        assert float(torch.linalg.norm(ours[m.name.removesuffix(".weight")].double())) == pytest.approx(
            m.delta_fro_exact, rel=1e-5
        )
    truncated = run(resolver, str(tiny_bert), str(bert_adapter), MitigationSettings(lam=0.5), cache=None)
    assert truncated.mitigation.totals()["refactor_error"] > 100 * result.mitigation.totals()["refactor_error"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_full_fine_tune_exports_a_merged_model_with_intruders_scaled(tmp_path, resolver, model_root, kind):
    base = factories.make_model(kind, model_root / f"mitigate-{kind}")
    tuned = factories.make_merged_lora(base, model_root / f"mitigate-{kind}-merged", "mlp", factor_std=0.3)
    settings = MitigationSettings(lam=0.25)
    result = run(resolver, str(base), str(tuned), settings, cache=None)
    assert result.mitigation.kind == "full"
    assert result.mitigation.totals()["intruders_scaled"] > 0
    out = export_merged(result.mitigation, resolver, str(base), str(tuned), tmp_path / "merged")
    written = load_file(str(out / "model.safetensors"))
    stored_base, stored_tuned = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert set(written) == set(stored_tuned)
    for m in result.mitigation.matrices:
        conv = kind == "gpt2"  # Conv1D stores in x out
        W = stored_base[m.name].float().T if conv else stored_base[m.name].float()
        Wt = stored_tuned[m.name].float().T if conv else stored_tuned[m.name].float()
        idx, _scores, (U, S, Vh) = find_intruders(W, Wt, 10, 0.5)
        assert idx == m.intruders
        expected = Wt - 0.75 * (U[:, idx] * S[idx]) @ Vh[idx]
        got = written[m.name].float().T if conv else written[m.name].float()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Everything that is not an analysed matrix is the fine-tune's own.
    names = {m.name for m in result.mitigation.matrices}
    for name, tensor in stored_tuned.items():
        if name not in names:
            assert torch.equal(written[name], tensor), name
    model = factories.load_model(out)  # transformers loads the export
    assert model is not None


def test_zip_of_the_adapter_folder_is_what_peft_loads(tmp_path, resolver, tiny_bert, bert_adapter):
    import zipfile

    result = run(resolver, str(tiny_bert), str(bert_adapter), MitigationSettings(), cache=None)
    folder = export_adapter(result.mitigation, resolver, str(bert_adapter), tmp_path / "a")
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_folder(folder))
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "unzipped")
        assert sorted(z.namelist()) == ["MITIGATION.md", "adapter_config.json", "adapter_model.safetensors"]
    merged = factories.peft_merged_state_dict(tiny_bert, tmp_path / "unzipped")
    assert merged  # PEFT loaded and merged it


def test_bad_input_is_an_input_error(tmp_path, resolver, tiny_bert, bert_adapter, model_root):
    with pytest.raises(InputError, match="--lam"):
        MitigationSettings(lam=1.5).check()
    with pytest.raises(InputError, match="--rule"):
        MitigationSettings(rule="all").check()  # type: ignore[arg-type]
    dora = factories.make_lora_adapter(tiny_bert, model_root / "mitigate-dora", "dora")
    with pytest.raises(InputError, match="DoRA"):
        run(resolver, str(tiny_bert), str(dora), MitigationSettings(), cache=None)
    result = run(resolver, str(tiny_bert), str(bert_adapter), MitigationSettings(), cache=None)
    with pytest.raises(InputError, match="full fine-tune"):
        export_adapter(result.mitigation, resolver, str(tiny_bert), tmp_path / "x")


def test_cli_writes_the_peft_folder_and_exits_2_on_bad_input(tmp_path, tiny_bert, bert_adapter, capsys):
    out = tmp_path / "cli"
    code = main(
        ["mitigate", str(tiny_bert), str(bert_adapter), "--lam", "0.5", "--top-k", "10", "--eps", "0.5",
         "--rule", "top1", "--out", str(out), "--no-cache", "--quiet"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "mitigation.json").read_text())
    assert report["settings"] == {"lam": 0.5, "top_k": 10, "eps": 0.5, "rule": "top1", "exact": False}
    assert len(report["matrices"]) == 12 and report["totals"]["intruders_scaled"] > 0
    assert factories.peft_merged_state_dict(tiny_bert, out)
    capsys.readouterr()
    assert main(["mitigate", str(tiny_bert), str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert main(["mitigate", str(tiny_bert), str(bert_adapter), "--out", str(out), "--quiet"]) == 2  # not empty
    assert "not an empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["mitigate", str(tiny_bert), str(bert_adapter), "--out", str(tmp_path / "o3"), "--lam", "3"])
    assert exit_info.value.code == 2


def test_tradeoff_on_a_sentence_embedding_model(tmp_path, resolver, model_root):
    """The held-out loss and curve on a tiny BERT with all-MiniLM-L6-v2's real tokenizer."""
    from demo import base_model_path

    tokenizer_dir = base_model_path()
    base = factories.make_bert(model_root / "mitigate-st", vocab_size=30522)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, base / name)
    adapter = factories.make_lora_adapter(base, model_root / "mitigate-st-lora", "mlp", factor_std=0.3)
    settings = MitigationSettings(lam=0.5)
    result = run(resolver, str(base), str(adapter), settings, cache=None)
    grid = (0.0, 0.5, 1.0)
    curve = evaluate_tradeoff(resolver, str(base), str(adapter), result.mitigation, grid, paragraphs=32)
    assert [p["label"] for p in curve.points] == ["base", "fine-tune", "λ = 0", "λ = 0.5", "λ = 1"]
    losses = {p["label"]: p["loss"] for p in curve.points}
    assert all(v > 0 for v in losses.values())
    assert losses["λ = 1"] == losses["fine-tune"]  # lambda 1 is the fine-tune (not evaluated twice)
    assert losses["λ = 0"] != pytest.approx(losses["fine-tune"], rel=1e-4)
    assert curve.task_name is None  # not the demo: no task metric known
    assert "pydoc_data" in curve.note
    assert len(held_out_paragraphs()) == 128


def test_tradeoff_of_a_causal_lm_full_fine_tune_is_the_same_on_one_worker_or_two(
    tmp_path, resolver, model_root, monkeypatch
):
    """A causal LM's held-out next-token loss along the grid, for a full fine-tune. The
    points run side by side on their own model copies, one torch thread each: one worker
    or two give the same numbers, lambda = 1 repeats the fine-tune's, and lambda = 0 (the
    intruders removed) and the base differ from it."""
    from analysis.mitigation import tradeoff as mitigate_eval
    from demo import base_model_path

    tokenizer_dir = base_model_path()  # a real WordPiece tokenizer (padding token included)
    base = factories.make_llama(model_root / "mitigate-llama", vocab_size=30522)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, base / name)
    tuned = factories.make_full_finetune(base, model_root / "mitigate-llama-ft", relative_noise=0.3)
    result = run(resolver, str(base), str(tuned), MitigationSettings(lam=0.0, top_k=4, eps=0.9), cache=None)
    assert any(m.intruders for m in result.mitigation.matrices)
    grid = (0.0, 0.5, 1.0)
    curves = {}
    shares: dict[int, list[float]] = {1: [], 2: []}
    for workers in (1, 2):
        monkeypatch.setattr(mitigate_eval, "evaluation_workers", lambda points, size, w=workers: w)
        curves[workers] = evaluate_tradeoff(
            resolver, str(base), str(tuned), result.mitigation, grid, paragraphs=24, work=shares[workers].append
        )
    assert curves[1].points == curves[2].points and curves[1].note == curves[2].note
    # The share of the evaluations done (for the job's clock) moves inside the points too
    # (after the first point, whose tokens size the others), and ends at all four.
    assert shares[1] == sorted(shares[1]) and shares[1][-1] == 1.0
    assert any(s not in (0.25, 0.5, 0.75, 1.0) for s in shares[1]), shares[1]
    points = {p["label"]: p for p in curves[2].points}
    assert list(points) == ["base", "fine-tune", "λ = 0", "λ = 0.5", "λ = 1"]
    assert curves[2].loss_name == "held-out LM loss (nats/token)" and curves[2].task_name is None
    assert points["λ = 1"]["loss"] == points["fine-tune"]["loss"]
    assert points["λ = 0"]["loss"] != points["fine-tune"]["loss"] != points["base"]["loss"]
    assert all(4.0 < p["loss"] < 20.0 for p in points.values())  # about ln(30522) = 10.3 for random weights

    # Points are cached by content: a revisit evaluates nothing (no model is even loaded),
    # other settings evaluate only their lambda points (base and fine-tune are reused).
    cache = SpectrumCache(tmp_path / "cache")
    evaluations: list[int] = []
    real_call = mitigate_eval.HeldOut.__call__
    monkeypatch.setattr(mitigate_eval.HeldOut, "__call__", lambda self, m: evaluations.append(1) or real_call(self, m))
    first = evaluate_tradeoff(resolver, str(base), str(tuned), result.mitigation, grid, paragraphs=24, cache=cache)
    assert first.points == curves[2].points and first.note == curves[2].note and len(evaluations) == 4
    monkeypatch.setattr(mitigate_eval, "load_model", lambda *a: pytest.fail("a cached curve loaded a model"))
    again = evaluate_tradeoff(resolver, str(base), str(tuned), result.mitigation, grid, paragraphs=24, cache=cache)
    assert again.points == first.points and again.note == first.note and len(evaluations) == 4
    monkeypatch.undo()
    monkeypatch.setattr(mitigate_eval.HeldOut, "__call__", lambda self, m: evaluations.append(1) or real_call(self, m))
    other = run(resolver, str(base), str(tuned), MitigationSettings(lam=0.0, top_k=4, eps=0.7), cache=None)
    changed = evaluate_tradeoff(resolver, str(base), str(tuned), other.mitigation, grid, paragraphs=24, cache=cache)
    assert len(evaluations) == 6  # lambda 0 and 0.5 only
    assert changed.points[:2] == first.points[:2]

    # The job's progress names the curve's steps, so a page does not extrapolate the time
    # left from the milliseconds of a matrix to the seconds of a model evaluation.
    steps: list[tuple[int, int, str]] = []
    settings = MitigationSettings(lam=0.0, top_k=4, eps=0.9)
    run(resolver, str(base), str(tuned), settings, tradeoff=True, cache=cache, progress=lambda *a: steps.append(a))
    n = len(result.mitigation.matrices)
    curve_steps = [what for done, _total, what in steps if done > 3 * n]
    assert curve_steps and all(what.startswith(TRADEOFF_STEP) for what in curve_steps)
    assert steps[-1][0] == steps[-1][1]


def test_each_expert_of_a_fused_tensor_is_mitigated_and_exported_as_itself(tmp_path, resolver):
    """A fused ``[E, out, in]`` expert tensor holds E matrices under one name: each is
    mitigated, analysed and written back as itself (keyed by name and expert), never as
    another expert of the same tensor."""
    import copy

    from charts import mitigation as fm
    from tests import families

    families.quiet()
    model = families.build("qwen3_moe_fused")
    base = families.save(model, "qwen3_moe_fused", tmp_path / "base")
    tuned_model = copy.deepcopy(model)
    families.perturb(tuned_model, scale=0.5)
    tuned = families.save(tuned_model, "qwen3_moe_fused", tmp_path / "full")
    result = run(resolver, str(base), str(tuned), MitigationSettings(lam=0.0, top_k=4, eps=0.9), cache=None)
    experts = [m for m in result.mitigation.matrices if m.expert is not None]
    assert len(experts) > len({m.name for m in experts})  # several matrices per tensor name
    keys = [m.key for m in result.mitigation.matrices]
    assert len(set(keys)) == len(keys)
    # The analysis "before" is the fine-tune's own matrix, "after" the mitigated one of the same expert.
    before = {m.key: m for m in result.before.matrices}
    after = {m.key: m for m in result.after.matrices}
    assert set(before) == set(after) == set(keys)
    stored_base, stored_tuned = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    scaled = 0
    for m in experts:
        W, Wt = stored_base[m.name][m.expert].float(), stored_tuned[m.name][m.expert].float()
        idx, _scores, (U, S, Vh) = find_intruders(W, Wt, 4, 0.9)
        assert idx == m.intruders, m.key
        expected = Wt - (U[:, idx] * S[idx]) @ Vh[idx]
        torch.testing.assert_close(result.mitigation.tuned(m.key).weight, expected, atol=1e-5, rtol=1e-5)
        assert after[m.key].delta_fro == pytest.approx(float(torch.linalg.norm(expected - W)), rel=1e-4)
        scaled += len(idx)
    assert scaled > 0
    rows = fm.matrices_table(result, 4, 0.9)
    assert rows["matrix"].tolist() == keys
    assert [r["matrix"] for r in result.to_json()["matrices"]] == keys
    # The merged export puts every expert's mitigated matrix back into its slice.
    out = export_merged(result.mitigation, resolver, str(base), str(tuned), tmp_path / "merged")
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(stored_tuned)
    for m in experts:
        torch.testing.assert_close(
            written[m.name][m.expert].float(), result.mitigation.tuned(m.key).weight, atol=1e-5, rtol=1e-5
        )
    # What cannot handle fused experts yet says so: no adapter export.
    adapter, _, _ = families.make_adapter(model, "qwen3_moe_fused", "all", tmp_path / "adapter")
    lora = run(resolver, str(base), str(adapter), MitigationSettings(lam=0.0, top_k=4, eps=0.9), cache=None)
    assert len({m.key for m in lora.mitigation.matrices}) == len(lora.mitigation.matrices)
    with pytest.raises(InputError, match="fused expert tensors; export the merged model instead"):
        export_adapter(lora.mitigation, resolver, str(adapter), tmp_path / "adapter-out")


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_the_curve_puts_every_expert_into_the_model_transformers_loads(tmp_path, resolver, layout):
    """Transformers holds Qwen3-MoE's experts fused (``experts.gate_up_proj [E, 2I, H]``)
    whether the checkpoint stores them per expert (as the hub ships it) or fused: the
    curve puts every mitigated matrix, each expert's gate and up included, into its place
    in the loaded model (checked against the fine-tune's own weights, element for element),
    so lambda = 1 repeats the fine-tune and lambda = 0 moves. A folder without a tokenizer
    (transformers then builds an empty one) gets a reason instead of a crash. A fine-tune
    saved in the other expert layout than its base is mitigated alike, but not written back."""
    import copy

    import transformers as tf

    from analysis.mitigation import tradeoff as mitigate_eval
    from demo import base_model_path
    from tests import families

    families.quiet()
    config = tf.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, vocab_size=30522,
    )  # fmt: skip
    model = tf.Qwen3MoeForCausalLM(config)
    tuned_model = copy.deepcopy(model)
    families.perturb(tuned_model, scale=0.5)
    how = "qwen3_moe" if layout == "per-expert" else "qwen3_moe_fused"
    base = families.save(model, how, tmp_path / "base")
    tuned = families.save(tuned_model, how, tmp_path / "tuned")
    settings = MitigationSettings(lam=0.0, top_k=4, eps=0.9)
    result = run(resolver, str(base), str(tuned), settings, cache=None)
    experts = [m for m in result.mitigation.matrices if m.expert is not None]
    assert any(m.intruders for m in experts)

    curve = evaluate_tradeoff(resolver, str(base), str(tuned), result.mitigation, [0.0, 1.0], paragraphs=4)
    assert curve.points == [] and "no tokenizer" in curve.note

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (base_model_path() / name).is_file():
            shutil.copy2(base_model_path() / name, base / name)
    places = []
    real = mitigate_eval._places
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mitigate_eval, "_places", lambda *a: places.append(real(*a)) or places[-1])
        curve = evaluate_tradeoff(resolver, str(base), str(tuned), result.mitigation, [0.0, 1.0], paragraphs=4)
    assert len(places[0]) == len(result.mitigation.matrices)  # every matrix, experts included, has its place
    assert {p.param.rsplit(".", 1)[-1] for p in places[0].values()} >= {"gate_up_proj", "down_proj"}
    assert f"{len(result.mitigation.matrices)} matrices swapped per point" in curve.note
    points = {p["label"]: p for p in curve.points}
    assert points["λ = 1"]["loss"] == points["fine-tune"]["loss"] != points["λ = 0"]["loss"]

    if layout == "per-expert":
        fused = families.save(tuned_model, "qwen3_moe_fused", tmp_path / "tuned-fused")
        across = run(resolver, str(base), str(fused), settings, cache=None)
        assert [m.intruders for m in across.mitigation.matrices] == [m.intruders for m in result.mitigation.matrices]
        with pytest.raises(InputError, match="another layout than the base"):
            export_merged(across.mitigation, resolver, str(base), str(fused), tmp_path / "merged")
