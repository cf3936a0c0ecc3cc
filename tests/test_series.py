"""Checkpoint series (analysis.specs.series): detection, steps, the CLI, cache reuse, figures.

Every series here is real: tiny BERT checkpoints saved with safetensors (full fine-tunes
whose update grows with the step) or PEFT adapters saved by ``save_pretrained``, each
beside the ``trainer_state.json`` the transformers Trainer writes into a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analysis.cache import SpectrumCache
from analysis.compare import compare
from analysis.errors import InputError
from analysis.specs.series import (
    checkpoint_step,
    expand,
    is_series_folder,
    resolve_series,
    step_from_name,
)
from charts import series, series_tables
from cli import main
from tests import factories

FULL_STEPS = (20, 5, 10)  # written out of order: the series must sort them numerically
LORA_STEPS = (2, 4)


def _trainer_state(folder: Path, step: int) -> None:
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


def make_full_series(base: Path, out: Path, steps=FULL_STEPS) -> Path:
    """A Trainer output_dir of full checkpoints; the update grows with the step."""
    for step in steps:
        folder = factories.make_full_finetune(base, out / f"checkpoint-{step}", seed=step, relative_noise=0.004 * step)
        _trainer_state(folder, step)
    return out


def make_lora_series(base: Path, out: Path, steps=LORA_STEPS) -> Path:
    for step in steps:
        folder = factories.make_lora_adapter(base, out / f"checkpoint-{step}", r=2, seed=step, factor_std=0.05 * step)
        _trainer_state(folder, step)
    return out


@pytest.fixture(scope="module")
def full_series(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_full_series(tiny_bert, tmp_path_factory.mktemp("series") / "full-run")


@pytest.fixture(scope="module")
def lora_series(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_series(tiny_bert, tmp_path_factory.mktemp("series") / "lora-run")


def test_detection_and_steps(full_series: Path, tiny_bert: Path, tmp_path: Path) -> None:
    assert is_series_folder(full_series)
    assert not is_series_folder(full_series / "checkpoint-5")  # a checkpoint holds weights
    assert not is_series_folder(tiny_bert)
    series = resolve_series(f"series:{full_series}")
    assert series.steps == [5, 10, 20]
    assert [c.name for c in series.checkpoints] == ["checkpoint-5", "checkpoint-10", "checkpoint-20"]
    # trainer_state.json wins over the name; a name alone gives the step
    renamed = tmp_path / "final"
    shutil.copytree(full_series / "checkpoint-20", renamed)
    assert checkpoint_step(renamed) == 20
    (renamed / "trainer_state.json").unlink()
    assert checkpoint_step(renamed) is None
    assert step_from_name("checkpoint-300") == 300
    assert step_from_name("step120") == 120
    assert step_from_name("main") is None


def test_listed_and_hub_series(full_series: Path, tmp_path: Path) -> None:
    # a user-ordered list whose members all state their step is sorted by it
    listed = resolve_series(f"series:{full_series / 'checkpoint-20'},{full_series / 'checkpoint-5'}")
    assert listed.steps == [5, 20]
    # without steps, the user's order is kept and positions are the steps
    a, b = tmp_path / "b-model", tmp_path / "a-model"
    a.mkdir()
    b.mkdir()
    listed = resolve_series(f"series:{a},{b}")
    assert [c.spec for c in listed.checkpoints] == [str(a), str(b)] and listed.steps == [1, 2]
    hub = resolve_series("series:org/run@step100,step20,step300")
    assert [c.spec for c in hub.checkpoints] == ["org/run@step20", "org/run@step100", "org/run@step300"]
    assert hub.steps == [20, 100, 300] and hub.label == "org/run"


def test_bad_series_are_input_errors(full_series: Path, tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="single model"):
        resolve_series(f"series:{tiny_bert}")
    # an output_dir that also holds the final model is one model on its own, a series when named so
    both = tmp_path / "both"
    shutil.copytree(full_series, both)
    shutil.copy(full_series / "checkpoint-20" / "model.safetensors", both / "model.safetensors")
    assert not is_series_folder(both) and expand([str(both)]) == [(str(both), None, None)]
    assert resolve_series(f"series:{both}").steps == [5, 10, 20]
    with pytest.raises(InputError, match="no checkpoint-N"):
        resolve_series(f"series:{tmp_path}")
    with pytest.raises(InputError, match="local paths are disabled"):
        resolve_series(f"series:{full_series}", allow_local_paths=False)
    with pytest.raises(InputError, match="names no checkpoints"):
        resolve_series("series:")
    bad = tmp_path / "bad"
    shutil.copytree(full_series, bad)
    (bad / "checkpoint-5" / "trainer_state.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        resolve_series(f"series:{bad}")


def test_cli_reports_each_checkpoint_in_step_order(
    tiny_bert: Path, tiny_bert_full_ft: Path, full_series: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    args = ["report", str(tiny_bert), str(tiny_bert_full_ft), str(full_series), "--out", str(out), "--quiet"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads(out.read_text())
    models = report["models"]
    assert [m["step"] for m in models] == [None, 5, 10, 20]
    assert [Path(m["source"]).name for m in models[1:]] == ["checkpoint-5", "checkpoint-10", "checkpoint-20"]
    assert all(m["summary"]["series"] == "full-run" for m in models[1:])
    # the update grows with the step in this series, and the report says so
    norms = [sum(x["delta_fro"] ** 2 for x in m["matrices"]) for m in models[1:]]
    assert norms == sorted(norms) and norms[0] < norms[-1]


def test_adding_a_checkpoint_computes_only_that_checkpoint(tiny_bert: Path, full_series: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(full_series, run)
    cache = SpectrumCache(tmp_path / "cache")
    first = compare(str(tiny_bert), [str(run)], cache=cache)
    matrices = len(first.models[0].matrices)
    assert matrices > 0
    assert cache.stats.computed["pair"] == 3 * matrices  # each checkpoint once
    bases = cache.stats.computed["base"]
    assert bases == matrices  # the base once, shared by every checkpoint

    make_full_series(tiny_bert, run, steps=(15,))
    again = SpectrumCache(tmp_path / "cache")
    second = compare(str(tiny_bert), [str(run)], cache=again)
    assert [m.step for m in second.models] == [5, 10, 15, 20]
    assert again.stats.computed.get("pair", 0) == matrices  # only the new checkpoint
    assert again.stats.computed.get("base", 0) == 0
    old = {m.step: m for m in first.models}
    for model in second.models:
        if model.step in old:
            assert [x.delta_fro for x in model.matrices] == [x.delta_fro for x in old[model.step].matrices]


def test_adapter_series(tiny_bert: Path, lora_series: Path) -> None:
    result = compare(str(tiny_bert), [str(lora_series)], cache=None)
    assert [m.step for m in result.models] == list(LORA_STEPS)
    assert all(m.kind == "adapter" for m in result.models)
    assert all(x.adapter_rank == 2 for m in result.models for x in m.matrices)
    assert [s for s, _, _ in expand([str(lora_series)])] == [str(lora_series / f"checkpoint-{s}") for s in LORA_STEPS]


def test_series_figures_show_every_checkpoint(tiny_bert: Path, full_series: Path) -> None:
    models = compare(str(tiny_bert), [str(full_series)], cache=None).models
    steps = [5, 10, 20]
    for by in series_tables.SERIES_GROUPINGS:
        table = series_tables.series_table(models, k=10, eps=0.5, by=by)
        assert sorted(table["step"].unique()) == steps
        fig = series.series_trend_figure(table, by)
        groups = table["group"].nunique()
        assert len(fig.data) == 4 * groups
        assert all(list(trace.x) == steps for trace in fig.data)
    whole = series_tables.series_table(models, k=10, eps=0.5)
    assert whole["matrices"].tolist() == [len(models[0].matrices)] * 3
    assert whole["intruders"].tolist() == [m.total_intruders(10, 0.5) for m in models]
    for metric in series_tables.SERIES_METRICS:
        grid = series.series_grid_figure(series_tables.series_grid_table(models, metric, 10, 0.5), metric)
        assert not grid.frames and not grid.layout.sliders  # one step control: the page's
        assert f"at step {steps[-1]}" in grid.layout.title.text
        assert grid.data[0].z.shape == (2, len(set(m.module for m in models[0].matrices)))
    name = models[0].matrices[0].name
    sim = series.series_similarity_figure(models, name)
    assert not sim.frames and f"at step {steps[-1]}" in sim.layout.title.text
    assert f"at step {steps[0]}" in series.series_similarity_figure(models, name, step=steps[0]).layout.title.text


def test_demo_series_opens_checkpoints_the_demo_saved(tiny_bert: Path, lora_series: Path, tmp_path: Path) -> None:
    """``series:demo:<name>`` names the checkpoint-N folders the demo builder saves in
    ``<root>/checkpoints/<name>/`` (here a demo manifest over tiny models, with the
    checkpoints of a real PEFT series)."""
    from analysis.adapters import LoraAdapter
    from analysis.specs import SpecResolver
    from demo import MANIFEST_NAME, DemoManifest, DemoModel
    from hosting.uploads import UploadStore

    root = tmp_path / "demo"
    final = factories.make_lora_adapter(tiny_bert, root / "lora-r2", r=2, seed=9)
    shutil.copytree(lora_series, root / "checkpoints" / "lora-r2")
    nan = {"recall@1": float("nan")}
    manifest = DemoManifest(
        root=root,
        base=DemoModel("base", "tiny base", tiny_bert, "full", nan),
        fine_tunes=(DemoModel("lora-r2", "LoRA r=2", final, "adapter", nan, r=2, lora_alpha=4),),
        steps=4,
        build_seconds=0.0,
    )
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2))
    resolver = SpecResolver(uploads=UploadStore(tmp_path / "uploads"), demo_root=root, allow_local_paths=False)
    series = resolve_series("series:demo:lora-r2", resolver)
    assert [c.spec for c in series.checkpoints] == ["demo:lora-r2/checkpoint-2", "demo:lora-r2/checkpoint-4"]
    assert series.steps == [2, 4] and series.label == "LoRA r=2"
    assert resolver.label("demo:lora-r2/checkpoint-4") == "LoRA r=2 · step 4"
    assert isinstance(resolver.open("demo:lora-r2/checkpoint-4"), LoraAdapter)
    assert resolver.resolve("series:demo:lora-r2").label == "LoRA r=2 (series of 2)"
    with pytest.raises(InputError, match="expected checkpoint-N"):
        resolver.resolve("demo:lora-r2/../../etc")
    with pytest.raises(InputError, match="no such checkpoint"):
        resolver.resolve("demo:lora-r2/checkpoint-99")


def test_hub_revisions_series_through_the_hub_client(
    tiny_bert: Path, full_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``series:org/name@rev1,rev2`` opens each revision with huggingface_hub, offline, from a
    hub cache whose refs name the checkpoints (as a repo pushed at every save would)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--run"
    for step in FULL_STEPS:
        factories.make_hub_cache(cache, "tiny-org/run", full_series / f"checkpoint-{step}")
        (repo / "refs" / "main").rename(repo / "refs" / f"step{step}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    result = compare(str(tiny_bert), ["series:tiny-org/run@step20,step5,step10"], cache=None, allow_local_paths=True)
    assert [m.source for m in result.models] == ["tiny-org/run@step5", "tiny-org/run@step10", "tiny-org/run@step20"]
    assert [m.step for m in result.models] == [5, 10, 20]
    local = compare(str(tiny_bert), [str(full_series)], cache=None)
    for hub_model, local_model in zip(result.models, local.models, strict=True):
        assert [m.delta_fro for m in hub_model.matrices] == [m.delta_fro for m in local_model.matrices]
    with pytest.raises(InputError, match="revision does not|not in the local hub cache"):
        compare(str(tiny_bert), ["series:tiny-org/run@step5,step99"], cache=None)
