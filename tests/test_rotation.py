"""Fine-tunes that rotate the base's principal directions (issue 23).

``W1 = G W0`` with ``G`` a plane rotation by a known angle of ``W0``'s top left singular
vector toward its last one: the update ``(G - I) W0`` has rank 2 and one dominant
singular value, which once made the tridiagonal vector provider hand ``torch.from_numpy``
an array with a negative stride (``report`` exited with a traceback).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis import lapack
from cli.main import main
from tests.factories import make_llama

ANGLE_DEG = 3.0


def plane_rotation(u: torch.Tensor, w: torch.Tensor, degrees: float) -> torch.Tensor:
    """The rotation by ``degrees`` in the plane of orthonormal ``u``, ``w`` (``u`` turns toward ``w``)."""
    theta = math.radians(degrees)
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    plane = torch.outer(u, u) + torch.outer(w, w)
    return eye + (math.cos(theta) - 1.0) * plane + math.sin(theta) * (torch.outer(w, u) - torch.outer(u, w))


def rotated(weight: torch.Tensor, degrees: float) -> torch.Tensor:
    """``G W0``: ``W0``'s top left singular vector turned toward its last one (float64 maths)."""
    w = weight.double()
    U, _, _ = torch.linalg.svd(w, full_matrices=False)
    return (plane_rotation(U[:, 0], U[:, -1], degrees) @ w).to(weight.dtype)


def make_rotation_finetune(base: Path, out: Path, degrees: float = ANGLE_DEG) -> Path:
    """Every 2-D block weight of ``base`` rotated by ``degrees``; everything else unchanged."""
    tensors = load_file(base / "model.safetensors")
    tuned = {
        name: (rotated(w, degrees) if w.ndim == 2 and ".layers." in name else w).contiguous()
        for name, w in tensors.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy2(base / "config.json", out / "config.json")
    return out


@pytest.fixture(scope="module")
def rotation_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rotation")
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
    base = make_llama(root / "base", **shape)
    return base, make_rotation_finetune(base, root / "rotated")


def test_top_one_vector_has_positive_strides():
    g = np.random.default_rng(0).standard_normal((40, 60))
    reduced = lapack.Tridiagonal(g @ g.T)
    one = reduced.top(1)
    assert one is not None and all(stride > 0 for stride in one.strides)
    assert torch.from_numpy(one).shape == (40, 1)
    reference = np.linalg.eigh(g @ g.T).eigenvectors[:, -1]
    assert abs(float(one[:, 0] @ reference)) == pytest.approx(1.0, abs=1e-10)


def test_report_on_a_rotation_finetune_exits_0(rotation_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WSE_CACHE_DIR", str(tmp_path / "cache"))
    base, tuned = rotation_pair
    out = tmp_path / "report.json"
    assert main(["report", str(base), str(tuned), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    matrices = report["models"][0]["matrices"]
    assert len(matrices) == 14
    for m in matrices:
        # The update (G - I) W0 has rank 2: two nonzero singular values.
        assert m["rank90"] in (1, 2) and m["intruders"][-1] == 0
        assert m["update_rank_fraction"] == pytest.approx(2 / min(m["shape"]))
        if min(m["shape"]) > 16:  # else the top-16 subspace is the whole space: nothing turns
            assert m["principal_angle_max"]["left"] == pytest.approx(ANGLE_DEG, abs=1e-5)
    totals = report["models"][0]["totals"]
    every = sum(t.numel() for t in load_file(base / "model.safetensors").values())
    whole = totals["sparsity_whole_model"]
    assert whole["parameters"] == every and whole["other_tensors"] == 7  # norms and the embedding too
    # every 1-D tensor and the embedding are unchanged
    analysed = totals["sparsity_analysed_matrices"]
    unchanged_analysed = round(analysed["sparsity_relative"] * analysed["parameters"])
    assert whole["unchanged_relative"] == unchanged_analysed + (every - analysed["parameters"])


def test_a_rotation_by_a_known_angle_gives_that_angle(rotation_pair, tmp_path):
    from analysis.compare import compare
    from analysis.pair_metrics import AnalysisSettings

    base, tuned = rotation_pair
    result = compare(str(base), [str(tuned)], cache=None, device="cpu", settings=AnalysisSettings(principal_k=8))
    for m in result.models[0].matrices:
        angles = m.rl.angles_left
        # W1 = G W0 turns W0's top left vector by 3 degrees, out of its top-8 span; the
        # other angles are float32 storage round-off; the right subspace does not move.
        assert angles[-1] == pytest.approx(ANGLE_DEG, abs=1e-5), m.name
        assert angles[:-1].max() < 1e-4 and m.rl.angles_right.max() < 1e-4
        assert m.update_rank_fraction == pytest.approx(2 / min(m.shape))
