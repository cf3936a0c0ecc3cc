"""Results are bit-identical however the work is split across threads (issue 11, item 5).

LAPACK's results depend on its thread count in the last bits (a QR of a LoRA factor on
one thread and on two differ by up to 2e-7), and a fresh worker thread used to run its
first QR on as many threads as cores. Every matrix is now computed with a thread count
that depends on its shape alone (:func:`analysis.scheduler.matrix_threads`).
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from analysis import scheduler
from analysis.cache import SpectrumCache
from analysis.identity import MatrixId
from analysis.pipeline import analyse_matrix, analyse_plan, model_result
from analysis.plan import ComparisonPlan, LowRankDelta, MatrixPlan, TunedMatrix
from analysis.report import to_report
from analysis.results import ComparisonResult


def _adapter_pairs(count: int, m: int = 384, n: int = 1536, r: int = 64) -> list[MatrixPlan]:
    """The demo's shapes and its largest adapter rank (where the QR of B and A^T is largest)."""
    plans = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        base = torch.randn(m, n, generator=g) / n**0.5
        delta = LowRankDelta(torch.randn(m, r, generator=g) * 0.05, torch.randn(r, n, generator=g) * 0.05, 2.0)
        tuned = TunedMatrix(base + delta.dense(), delta)
        plans.append(
            MatrixPlan(
                MatrixId(f"layer.{i}.w", i, "mlp_in", (m, n)),
                lambda b=base: b.clone(),
                lambda t=tuned: t,
                adapter_rank=r,
            )
        )
    return plans


def _entries(cache: SpectrumCache) -> dict[str, tuple[dict[str, bytes], dict[str, str]]]:
    """Each entry's tensors (as bytes) and metadata. Not the file's bytes: safetensors
    writes the metadata's keys in a hash map's order, which varies from run to run."""
    found = {}
    for path in cache.entries():
        if "pair" in path.parts or "base" in path.parts:
            with safe_open(path, framework="pt") as f:
                tensors = {name: f.get_tensor(name).view(-1).view(torch.uint8).numpy().tobytes() for name in f.keys()}
                found[path.name] = tensors, f.metadata()
    return found


def test_a_pair_recomputed_alone_has_the_bytes_of_a_full_run(tmp_path):
    matrices = _adapter_pairs(4)
    full = SpectrumCache(tmp_path / "full")
    list(analyse_plan(ComparisonPlan("b", "t", "adapter", matrices), device="cpu", cache=full, workers=2))
    written = _entries(full)
    assert len(written) == 8  # a base and a pair entry per matrix
    for matrix in (matrices[0], matrices[3]):  # a worker's first matrix, and a later one
        alone = SpectrumCache(tmp_path / f"alone-{matrix.layer}")
        analyse_matrix(matrix, device="cpu", cache=alone)
        recomputed = _entries(alone)
        assert len(recomputed) == 2
        for name, data in recomputed.items():
            assert data == written[name], f"{name} differs from the full run's entry"


def _report(matrices: list[MatrixPlan], **kwargs) -> str:
    plan = ComparisonPlan("base", "adapter", "adapter", matrices)
    result = ComparisonResult(base="base", top_k=10, epsilons=[0.1, 0.5, 0.9])
    result.models.append(model_result(plan, list(analyse_plan(plan, device="cpu", **kwargs))))
    return json.dumps(to_report(result), sort_keys=True)


def test_report_bytes_do_not_depend_on_the_number_of_workers(monkeypatch):
    matrices = _adapter_pairs(3)
    one = _report(matrices, workers=1)
    two = _report(matrices, workers=2)
    monkeypatch.setattr(scheduler, "available_cores", lambda: 4)  # as on a larger machine
    four = _report(matrices, workers=4)
    assert one == two == four


def test_threads_per_matrix_depend_on_its_shape_alone(monkeypatch):
    monkeypatch.setattr(scheduler, "available_cores", lambda: 2)
    monkeypatch.setattr(scheduler, "_caller_threads", lambda: 2)
    assert scheduler.matrix_threads((384, 1536), "gram") == (1, 1)  # side by side, one thread each
    assert scheduler.matrix_threads((4096, 11008), "gram") == (2, 2)  # alone on every core
    assert scheduler.matrix_threads((1024, 1024), "gram", budget=10**6) == (2, 1)  # fills the budget: alone
