"""The engine's front door: model names in, a :class:`~analysis.results.ComparisonResult` out.

:func:`compare` opens every model through the one resolver (:class:`analysis.specs.SpecResolver`),
pairs each fine-tune with the base (:mod:`analysis.pairing`) and analyses every pair with the
cached pipeline (:mod:`analysis.pipeline`); :mod:`analysis.distributed` runs the same plans on
a Ray cluster (``python -m analysis report --ray``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from analysis import distributed
from analysis.cache import SpectrumCache
from analysis.linalg import resolve_device
from analysis.model_sparsity import add_whole_model_sparsity
from analysis.pair_metrics import AnalysisSettings, checked_settings
from analysis.pipeline import ProgressCallback, analyse_plan, model_result
from analysis.plan import ComparisonPlan
from analysis.results import DEFAULT_EPSILONS, DEFAULT_TOP_K, ComparisonResult
from analysis.specs import SpecResolver
from analysis.specs.series import expand

#: ``compare(cache=DEFAULT_CACHE)``: the persistent cache under ``$WSE_CACHE_DIR`` (or ``cache/``).
DEFAULT_CACHE = object()


def plan_models(
    base: str, tuned: Sequence[str], *, allow_local_paths: bool = True, include_non_block: bool = False
) -> list[ComparisonPlan]:
    """:meth:`SpecResolver.plan_models <analysis.specs.SpecResolver.plan_models>` with the command line's resolver.

    Local paths are allowed unless ``allow_local_paths`` is false.
    """
    return SpecResolver(allow_local_paths=allow_local_paths).plan_models(
        base, tuned, include_non_block=include_non_block
    )


def compare(
    base: str,
    tuned: Sequence[str],
    *,
    top_k: int = DEFAULT_TOP_K,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    device: torch.device | str = "auto",
    cache: SpectrumCache | None | object = DEFAULT_CACHE,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    allow_local_paths: bool = True,
    include_non_block: bool = False,
    settings: AnalysisSettings | None = None,
    ray: str | None = None,
) -> ComparisonResult:
    """Compare a base model with one or more fine-tunes: every metric, every matrix.

    Parameters
    ----------
    base : str
        The pre-trained model: a hub id, a local folder, a ``.safetensors`` file or a
        ``demo:`` / ``upload:`` name (:mod:`analysis.specs.names`).
    tuned : sequence of str
        The fine-tunes. One that is a PEFT or kohya LoRA adapter is applied to ``base``;
        one that is a checkpoint series (:mod:`analysis.specs.series`) becomes one model
        per checkpoint, in step order, each with its ``step``.
    top_k : int, default 10
        Intruder counts are reported among the top ``top_k`` tuned singular vectors
        (Shuttleworth et al. 2024, Def. 3.1).
    epsilons : sequence of float, default 0.10, 0.15, ..., 0.90
        The thresholds the counts are reported at.
    device : {"auto", "cpu", "cuda"} or torch.device, default "auto"
        Where the decompositions run (``auto``: CUDA when present).
    cache : SpectrumCache or None, optional
        Default: the persistent cache under ``$WSE_CACHE_DIR`` (or ``cache/``); ``None``
        computes everything afresh and stores nothing.
    progress, should_stop : callable, optional
        See :func:`analysis.pipeline.analyse_plan`.
    allow_local_paths : bool, default True
        Whether local folders and files may be named.
    include_non_block : bool, default False
        Also analyse matrices outside the numbered blocks (embeddings, heads).
    settings : AnalysisSettings, optional
        What is kept per matrix (part of every cache key).
    ray : str, optional
        Run the pairs as tasks on a Ray cluster: ``local``, ``auto`` or an address
        (:func:`analysis.distributed.compare`); ``None`` analyses them here.

    Returns
    -------
    ComparisonResult
        One :class:`~analysis.results.ModelResult` per fine-tune (per checkpoint of a series).

    Raises
    ------
    InputError
        Anything wrong with a name, a file or a setting, named in the message.

    Examples
    --------
    A two-layer "model" and a fine-tune whose update is rank one:

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> g = torch.Generator().manual_seed(0)
    >>> base = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(32, 48, generator=g) for i in range(2)}
    >>> tuned = {name: w + 5 * torch.outer(torch.randn(32, generator=g), torch.randn(48, generator=g))
    ...          for name, w in base.items()}
    >>> folders = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> for folder, weights in zip(folders, (base, tuned)):
    ...     save_file(weights, f"{folder}/model.safetensors")
    >>> result = compare(folders[0], [folders[1]], cache=None, device="cpu")
    >>> [round(m.effective_rank, 3) for m in result.models[0].matrices]
    [1.0, 1.0]
    >>> [m.rank90 for m in result.models[0].matrices]
    [1, 1]
    """
    store = SpectrumCache() if cache is DEFAULT_CACHE else cache
    if ray is not None:
        return distributed.compare(
            base,
            tuned,
            address=ray,
            top_k=top_k,
            epsilons=epsilons,
            device=device,
            cache=store,
            progress=progress,
            should_stop=should_stop,
            allow_local_paths=allow_local_paths,
            include_non_block=include_non_block,
            settings=settings,
        )
    settings = checked_settings(top_k, epsilons, settings)
    device = resolve_device(device)
    members = expand(tuned, allow_local_paths=allow_local_paths)  # a series: each checkpoint, in step order
    specs = [spec for spec, _, _ in members]
    plans = plan_models(base, specs, allow_local_paths=allow_local_paths, include_non_block=include_non_block)
    result = ComparisonResult(base=base, top_k=top_k, epsilons=[float(e) for e in epsilons])
    for plan, (_, step, series_label) in zip(plans, members, strict=True):
        matrices = list(
            analyse_plan(
                plan, settings=settings, device=device, cache=store, progress=progress, should_stop=should_stop
            )
        )
        model = model_result(plan, matrices)
        if settings.measures and plan.kind == "full":
            add_whole_model_sparsity(model, plan, settings, store)
        if step is not None:
            model.step = step
            model.summary["series"] = series_label
        result.models.append(model)
    return result
