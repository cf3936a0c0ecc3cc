"""Tensors of two devices meeting in one operation: the CUDA path's seams, checked on the CPU.

No GPU is at hand here or in CI (``tests/test_cuda.py`` skips). PyTorch's ``meta`` device
stands in for the second device: an operation that mixes a ``meta`` tensor with a CPU one
raises as a CUDA one mixed with a CPU one does ("Expected all tensors to be on the same
device"), and a tensor left on the CPU where the device's was due is seen by its
``.device``. Only what does no arithmetic on the values can run on ``meta``.
"""

from __future__ import annotations

import torch

from analysis import pipeline
from analysis.linalg import Spectrum
from analysis.pair_metrics import AnalysisSettings
from analysis.pairs import base_entry, base_from_entry, stored_base_spectrum
from analysis.plan import LowRankDelta, TunedMatrix

OTHER = torch.device("meta")


def _cached_base_spectrum(m: int) -> Spectrum:
    """A base spectrum as :func:`analysis.pairs.prepare` reads it from the cache: on the CPU."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    values = torch.linspace(2.0, 0.1, m, dtype=torch.float64)
    stored = stored_base_spectrum(Spectrum(values, left=q))
    return base_from_entry(base_entry(stored), torch.device("cpu"))


def test_seeds_from_a_cached_base_spectrum_are_on_the_device():
    """A pair whose entry is cached but not its measures gets its measures computed on their
    own (``_attach_measures``), seeded from the base spectrum ``prepare`` read from the cache
    onto the CPU. The seeds joined an adapter's ``B`` moved to the device: on CUDA,
    ``torch.cat`` of a CUDA and a CPU tensor raised (a 7B adapter's 4096-order matrices,
    whose top vectors come from seeded subspace iteration); without an adapter the seeds
    stayed on the CPU. Fails before the fix: "Tensor on device cpu is not on the expected
    device meta!" for the adapter, ``cpu`` for the full fine-tune."""
    m, n, r, wanted = 24, 40, 3, 5
    base = _cached_base_spectrum(m)
    assert base.values.device.type == "cpu"
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(m, n, generator=g)
    adapter = LowRankDelta(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), 2.0)
    for tuned, columns in ((TunedMatrix(weight, adapter), r + 2 * wanted), (TunedMatrix(weight), 2 * wanted)):
        seeds = pipeline._seeds(base, tuned, wanted, OTHER)()
        assert seeds.device == OTHER
        assert seeds.dtype == torch.float64 and tuple(seeds.shape) == (m, columns)


def test_the_elementwise_measures_run_where_the_weights_are():
    """The RL measures' elementwise parts (both unchanged rules, the principal mask) used to
    copy a GPU's weights to the host and compare them there in float64 and bf16: 3-5 s per
    7B-sized pair on one thread (measured on the 2-core machine: 11008 x 4096, counts 2.7 s,
    mask 1.3 s), more than the pair's decompositions on a GPU. They now stay on the weights'
    device; on the CPU nothing changes (``tests/test_measures.py``). Fails before the fix:
    "Cannot copy out of meta tensor"."""
    from analysis import measures

    w0, w1 = torch.empty(6, 5, device=OTHER), torch.empty(6, 5, device=OTHER)
    assert measures.unchanged_relative(w0, w1).device == OTHER
    assert measures.unchanged_absolute(w0, w1).device == OTHER
    left, values, right = torch.empty(6, 2, device=OTHER), torch.empty(2, device=OTHER), torch.empty(5, 2, device=OTHER)
    mask = measures.principal_mask(left, values, right, 0.2)
    assert mask.device == OTHER and mask.dtype == torch.bool and tuple(mask.shape) == (6, 5)


def test_gpu_products_are_full_float32_whatever_the_process_set(monkeypatch) -> None:
    """A process that let CUDA multiply float32 in TF32 (``set_float32_matmul_precision("high")``,
    Hugging Face's ``Trainer(tf32=True)``, where the training callback runs) would score cosines
    to about 1e-3: the engine's work on a CUDA device runs at "highest" and the process gets its
    setting back; the CPU (no TF32) is left alone."""
    seen = []
    monkeypatch.setattr(pipeline, "_group_results", lambda *a, **k: seen.append(torch.get_float32_matmul_precision()))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        pipeline._compute_group([], AnalysisSettings(), torch.device("cuda"), "eig", None)
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "high"
        pipeline._compute_group([], AnalysisSettings(), torch.device("cpu"), "gram", None)
        assert seen == ["highest", "high"]
    finally:
        torch.set_float32_matmul_precision(previous)
