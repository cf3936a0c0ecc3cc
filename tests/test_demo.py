"""The offline demo: a real build, the papers' findings on it, and its file contract.

The session fixture builds the real demo once (:mod:`tests.demo_fixture`); the findings
are measured by the engine itself (:func:`analysis.pipeline.compare`), exactly as the
dashboard shows them.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
import demo.build
import demo.training
from analysis.errors import AnalysisCancelled, InputError
from analysis.mitigation.heldout import retrieval_metrics
from analysis.results import ComparisonResult
from demo import DemoManifest, build_demo, demo_manifest
from tests.demo_fixture import DEMO_BUILD_TIMEOUT_S, demo_build  # noqa: F401  (pytest fixture)

# The first test to ask for the demo pays for its build (minutes, longer on a busy machine).
pytestmark = [pytest.mark.timeout(DEMO_BUILD_TIMEOUT_S), pytest.mark.xdist_group("demo")]


@pytest.fixture(scope="module")
def demo_comparison(demo_build: DemoManifest) -> ComparisonResult:  # noqa: F811
    from analysis.compare import compare

    return compare(str(demo_build.base.path), demo_build.tuned_paths, epsilons=[0.5], device="cpu", cache=None)


def _by_name(manifest: DemoManifest, result: ComparisonResult) -> dict:
    assert [m.source for m in result.models] == manifest.tuned_paths
    return {ft.name: model for ft, model in zip(manifest.fine_tunes, result.models, strict=True)}


def _mean_effective_rank(model) -> float:
    return float(np.mean([m.effective_rank for m in model.matrices]))


def test_the_demo_has_the_papers_models(demo_build: DemoManifest) -> None:  # noqa: F811
    assert [m.name for m in demo_build.fine_tunes] == ["full-ft", "lora-r1", "lora-r8", "lora-r64"]
    assert (demo_build.model("full-ft").path / "config.json").is_file()
    assert (demo_build.model("full-ft").path / "model.safetensors").is_file()
    for ft in demo_build.fine_tunes[1:]:
        assert ft.kind == "adapter" and ft.lora_alpha == 2 * ft.r
        assert (ft.path / "adapter_config.json").is_file()
    # Scale alpha / r = 2 at every rank, the learning rate falling as 1 / sqrt(r).
    assert {ft.lora_alpha / ft.r for ft in demo_build.fine_tunes[1:]} == {2}
    products = {ft.lr * ft.r**0.5 for ft in demo_build.fine_tunes[1:]}
    assert max(products) == pytest.approx(min(products))
    # Checkpoints as the Trainer writes them, for the checkpoint-series views.
    for ft in demo_build.fine_tunes:
        assert [step for step, _ in ft.checkpoints] == [10, 20, 30, 40, 50, 60]
        for step, folder in ft.checkpoints:
            assert folder == demo_build.root / "checkpoints" / ft.name / f"checkpoint-{step}"
            weights = "adapter_model.safetensors" if ft.kind == "adapter" else "model.safetensors"
            assert (folder / weights).is_file() and (folder / "trainer_state.json").is_file()


def test_lora_r1_has_more_intruders_than_full_fine_tuning(
    demo_build: DemoManifest,  # noqa: F811
    demo_comparison: ComparisonResult,
) -> None:
    """Shuttleworth et al. 2024: LoRA introduces intruder dimensions, full FT does not."""
    models = _by_name(demo_build, demo_comparison)
    assert len(models["full-ft"].matrices) == len(models["lora-r1"].matrices) == 36
    full = models["full-ft"].total_intruders(k=10, eps=0.5)
    lora_r1 = models["lora-r1"].total_intruders(k=10, eps=0.5)
    assert lora_r1 > full
    assert lora_r1 >= 5, f"LoRA r=1 should show several intruders, got {lora_r1}"


def test_intruders_fall_with_the_lora_rank(
    demo_build: DemoManifest,  # noqa: F811
    demo_comparison: ComparisonResult,
) -> None:
    """Shuttleworth et al. 2024: the lower the rank, the more intruders; a high-rank LoRA
    looks like full fine-tuning (eps 0.5, top 10)."""
    models = _by_name(demo_build, demo_comparison)
    count = {name: model.total_intruders(k=10, eps=0.5) for name, model in models.items()}
    assert count["lora-r1"] > count["lora-r8"] > 0, count
    assert abs(count["lora-r64"] - count["full-ft"]) <= 2, count


def test_full_fine_tuning_learns_a_higher_rank_update_than_lora(
    demo_build: DemoManifest,  # noqa: F811
    demo_comparison: ComparisonResult,
) -> None:
    """Biderman et al. 2024 / Shuttleworth et al. 2024: full FT's update is high rank."""
    models = _by_name(demo_build, demo_comparison)
    full = _mean_effective_rank(models["full-ft"])
    lora_r8 = _mean_effective_rank(models["lora-r8"])
    assert full > lora_r8
    assert lora_r8 <= 8 + 1e-6  # an r = 8 update cannot have more


def test_every_fine_tune_beats_the_base_on_the_held_out_task(demo_build: DemoManifest) -> None:  # noqa: F811
    base = demo_build.base.metrics
    assert 0.05 < base["recall@1"] < 0.9 and base["recall@1"] <= base["mrr"] <= 1
    for ft in demo_build.fine_tunes:
        assert ft.metrics["recall@1"] > base["recall@1"] + 0.02, ft.name
        assert ft.metrics["mrr"] > base["mrr"] + 0.02, ft.name


def test_manifest_round_trips(demo_build: DemoManifest) -> None:  # noqa: F811
    assert demo_manifest(demo_build.root) == demo_build
    data = json.loads((demo_build.root / demo.MANIFEST_NAME).read_text())
    assert DemoManifest.from_json(data, demo_build.root) == demo_build
    # Fine-tunes are stored relative to the root, so the folder can be moved.
    assert [m["path"] for m in data["fine_tunes"]] == [m.name for m in demo_build.fine_tunes]
    assert demo_build.task["train_pairs"] > 1000 and demo_build.task["eval_pairs"] > 200
    assert demo_build.steps == demo.DEFAULT_STEPS


def test_a_second_call_finds_the_build_and_does_not_retrain(demo_build: DemoManifest) -> None:  # noqa: F811
    before = {p: p.stat().st_mtime_ns for p in demo_build.root.rglob("*")}
    start = time.perf_counter()
    again = build_demo(demo_build.root, progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == demo_build
    assert {p: p.stat().st_mtime_ns for p in demo_build.root.rglob("*")} == before


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapters_load_with_peft_and_change_the_model(demo_build: DemoManifest) -> None:  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModel

    ids = torch.tensor([[101, 7592, 2088, 102]])
    reference = AutoModel.from_pretrained(demo_build.base.path).eval()(input_ids=ids).last_hidden_state
    for ft in demo_build.fine_tunes:
        if ft.kind == "full":
            model = AutoModel.from_pretrained(ft.path)
        else:
            model = PeftModel.from_pretrained(AutoModel.from_pretrained(demo_build.base.path), ft.path)
            assert model.peft_config["default"].r == ft.r
            assert model.peft_config["default"].lora_alpha == ft.lora_alpha
            assert model.peft_config["default"].use_rslora == ft.use_rslora
        out = model.eval()(input_ids=ids).last_hidden_state
        assert not torch.allclose(out, reference, atol=1e-3), ft.name


@pytest.fixture
def one_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-model, one-step demo: the file contract without the training time."""
    monkeypatch.setattr(demo.build, "FINE_TUNES", (demo.FINE_TUNES[1],))


def test_an_interrupted_rebuild_keeps_the_finished_build(tmp_path: Path, one_recipe, monkeypatch) -> None:
    root = tmp_path / "demo"
    first = build_demo(root, steps=1, progress=False)
    assert [m.name for m in first.fine_tunes] == ["lora-r1"]
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.build, "fine_tune", crash)
    with pytest.raises(KeyboardInterrupt):
        build_demo(root, steps=1, progress=False, force=True)
    assert demo_manifest(root) == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]


def test_an_interrupted_first_build_leaves_no_demo(tmp_path: Path, one_recipe, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(demo.build, "fine_tune", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        build_demo(tmp_path / "demo", steps=1, progress=False)
    assert demo_manifest(tmp_path / "demo") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock"]


def test_steps_are_reported_and_a_stopped_build_leaves_nothing(tmp_path: Path, one_recipe) -> None:
    seen: list[tuple[int, int, str]] = []
    build_demo(tmp_path / "demo", steps=2, progress=False, on_step=lambda *step: seen.append(step))
    assert [(done, total) for done, total, _ in seen] == [(1, 2), (2, 2)]
    assert all(what.startswith("lora-r1 loss ") for _, _, what in seen)

    with pytest.raises(AnalysisCancelled, match="stopped after 1 of 2 training steps"):
        build_demo(tmp_path / "other", steps=2, progress=False, should_stop=lambda: len(seen) >= 3,
                   on_step=lambda *step: seen.append(step))  # fmt: skip
    assert demo_manifest(tmp_path / "other") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", ".other.lock", "demo"]


def test_other_steps_rebuild_and_builds_are_bit_identical(tmp_path: Path, one_recipe) -> None:
    first = build_demo(tmp_path / "a", steps=1, progress=False)
    again = build_demo(tmp_path / "a", steps=2, progress=False)
    assert (first.steps, again.steps) == (1, 2)
    assert demo_manifest(tmp_path / "a") == again
    # Fixed seeds and deterministic algorithms: a second build is byte for byte the same.
    twin = build_demo(tmp_path / "b", steps=2, progress=False)
    assert twin.model("lora-r1").metrics == again.model("lora-r1").metrics
    adapter = "lora-r1/adapter_model.safetensors"
    assert (tmp_path / "a" / adapter).read_bytes() == (tmp_path / "b" / adapter).read_bytes()


def test_concurrent_builds_train_once(tmp_path: Path, one_recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two callers at once (two dashboard sessions, two processes): one builds, one waits."""
    trained = []
    fine_tune = demo.build.fine_tune

    def counting(recipe, *args, **kwargs):
        trained.append(recipe.name)
        return fine_tune(recipe, *args, **kwargs)

    monkeypatch.setattr(demo.build, "fine_tune", counting)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: build_demo(tmp_path / "demo", steps=1, progress=False), range(2)))
    assert trained == ["lora-r1"]
    assert results[0] == results[1] == demo_manifest(tmp_path / "demo")


def test_default_root_follows_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path))
    assert demo.default_demo_root() == tmp_path / "demo"
    assert demo_manifest() is None


def test_a_corrupt_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / demo.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(InputError, match="manifest.json"):
        demo_manifest(tmp_path)


def test_the_task_is_deterministic_and_held_out_by_package() -> None:
    pairs = demo.harvest_stdlib_pairs()
    assert pairs == demo.harvest_stdlib_pairs.__wrapped__()  # parsed again, same result
    train, held_out = demo.split_pairs(pairs)
    assert {p.package for p in train}.isdisjoint({p.package for p in held_out})
    assert len(held_out) > 200 and len(train) > 2000
    assert len({p.document for p in pairs}) == len(pairs)
    dumps = next(p for p in pairs if p.module == "json" and p.qualname == "dumps")
    assert dumps.query.startswith("json.dumps(obj, *, skipkeys=False")
    assert dumps.document.startswith("Serialize ``obj`` to a JSON formatted ``str``")


def test_steps_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="at least 1"):
        build_demo(tmp_path, steps=0)


def test_a_folder_that_is_not_a_demo_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a demo build"):
        build_demo(tmp_path, steps=1, progress=False, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_retrieval_metrics_by_hand() -> None:
    # Query 0 ranks its document first, query 1 second, query 2 third.
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.5, 0.6, 0.4]])
    scores = retrieval_metrics(similarity)
    assert scores["recall@1"] == pytest.approx(1 / 3)
    assert scores["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


@pytest.fixture
def two_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA r=1 and r=8 only, a checkpoint every step: the publishing contract, quickly."""
    monkeypatch.setattr(demo.build, "FINE_TUNES", demo.FINE_TUNES[1:3])
    monkeypatch.setattr(demo.training, "CHECKPOINT_EVERY", 1)
    monkeypatch.setattr(demo.build, "CHECKPOINT_EVERY", 1)


def test_each_fine_tune_is_published_when_done_and_a_stopped_build_resumes(
    tmp_path: Path, two_recipes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard shows the first fine-tunes while the others train; Cancel keeps them."""
    root = tmp_path / "demo"
    seen: list[int] = []

    def on_step(done: int, total: int, what: str) -> None:
        seen.append(len(demo_manifest(root).fine_tunes) if demo_manifest(root) else 0)

    with pytest.raises(AnalysisCancelled):
        build_demo(root, steps=2, progress=False, on_step=on_step, should_stop=lambda: len(seen) >= 3)
    # r=1 was published (with complete false) before r=8 started; r=8 left nothing behind.
    assert seen == [0, 0, 1]
    partial = demo_manifest(root)
    assert partial is not None and not partial.complete and [m.name for m in partial.fine_tunes] == ["lora-r1"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "heldout.json", "lora-r1", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]

    trained = []
    fine_tune = demo.build.fine_tune

    def counting(recipe, *args, **kwargs):
        trained.append(recipe.name)
        return fine_tune(recipe, *args, **kwargs)

    monkeypatch.setattr(demo.build, "fine_tune", counting)
    done = build_demo(root, steps=2, progress=False)
    assert trained == ["lora-r8"] and done.complete
    assert [m.name for m in done.fine_tunes] == ["lora-r1", "lora-r8"]
    assert done.model("lora-r1") == partial.model("lora-r1") and done.base == partial.base


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_checkpoints_are_saved_as_the_trainer_does(tmp_path: Path, two_recipes) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    built = build_demo(tmp_path / "demo", steps=2, progress=False)
    r1 = built.model("lora-r1")
    assert [(step, path.relative_to(built.root).as_posix()) for step, path in r1.checkpoints] == [
        (1, "checkpoints/lora-r1/checkpoint-1"),
        (2, "checkpoints/lora-r1/checkpoint-2"),
    ]
    for step, folder in r1.checkpoints:
        assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == step and [h["step"] for h in state["log_history"]] == list(range(1, step + 1))
    # The last checkpoint is the final adapter; the first differs from it.
    final = load_file(r1.path / "adapter_model.safetensors")
    last = load_file(r1.checkpoints[-1][1] / "adapter_model.safetensors")
    first = load_file(r1.checkpoints[0][1] / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert any(not torch.equal(final[k], first[k]) for k in final)
    PeftModel.from_pretrained(AutoModel.from_pretrained(built.base.path), r1.checkpoints[0][1])
    # Paths are stored relative to the root, so the folder can be moved.
    data = json.loads((built.root / demo.MANIFEST_NAME).read_text())
    assert data["complete"] is True
    assert data["fine_tunes"][0]["checkpoints"] == [
        [1, "checkpoints/lora-r1/checkpoint-1"],
        [2, "checkpoints/lora-r1/checkpoint-2"],
    ]


def test_models_page_writes_the_demos_learning_rates_in_few_digits(
    demo_build: DemoManifest,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The demo's table wrote LoRA r=8's learning rate as 0.005303300858899106: ``%g`` without
    a precision is, in the browser's sprintf, every digit of the float. Each rate is
    written with an explicit precision, in at most 8 characters."""
    import re

    from streamlit.testing.v1 import AppTest

    assert demo_build.root.name == "demo"  # the app finds it as <WSE_CACHE_DIR>/demo
    monkeypatch.setenv("WSE_CACHE_DIR", str(demo_build.root.parent))
    monkeypatch.setenv("WSE_DEMO_AUTOBUILD", "0")
    app = Path(__file__).resolve().parent.parent / "app.py"
    at = AppTest.from_file(str(app), default_timeout=60)
    at.switch_page("pages/models.py").run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0]
    lr_format = json.loads(table.proto.columns)["lr"]["type_config"]["format"]
    assert re.fullmatch(r"%\.\d+[ef]", lr_format), lr_format
    rates = [ft.lr for ft in demo_build.fine_tunes]
    assert any(len(repr(r)) > 8 for r in rates)  # what the test is about: a rate with many digits
    assert all(len(lr_format % r) <= 8 for r in rates), [lr_format % r for r in rates]
