"""Where a comparison's numbers come from: the tool's version, how each model is stored, what it holds.

A report that travels without its models (the HTML report, ``python -m analysis report
--html``) says what is needed to reproduce it: every model as it was named, the dtypes its
files store, a content digest of what was analysed, the tool's version and the date.

The content digest of a model is BLAKE3 over the sorted lines ``matrix key=digest`` of the
matrices analysed, where each matrix's digest is the one the spectrum cache is keyed by
(:attr:`analysis.plan.MatrixPlan.digests`): :func:`analysis.cache.tensor_digest` of a stored
tensor (BLAKE3 of its dtype, shape and bytes), or for a matrix made from several stored
tensors (a LoRA adapter applied to its base, a slice of a fused tensor)
:func:`analysis.cache.derived_digest` of theirs. Equal digests mean the same matrices were
analysed; with the cache's fingerprint index they cost no read of the weights.
"""

from __future__ import annotations

import datetime
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from analysis.adapters import LoraAdapter
from analysis.cache import content_hasher, tensor_digest
from analysis.pairing import plan_comparison
from analysis.plan import ComparisonPlan, StoredDigest
from analysis.results import ComparisonResult, ModelResult
from analysis.sources import WeightSource
from analysis.specs import SpecResolver

PACKAGE = "weight-spectrum-explorer"
#: What :attr:`StoredModel.digest` is, in words a reader of a report understands.
DIGEST_RULE = (
    "BLAKE3 over the sorted lines 'matrix key=digest' of the analysed matrices; each matrix digest is the "
    "spectrum cache's content key: BLAKE3 of the stored tensor's dtype, shape and bytes, or for a matrix made "
    "from several stored tensors (an adapter applied to its base, a slice of a fused tensor) BLAKE3 of theirs"
)

#: Short names of stored dtypes ("bf16", "fp32"), as model cards write them.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8_e4m3",
    torch.float8_e5m2: "fp8_e5m2",
}


@dataclass(frozen=True)
class StoredModel:
    """One model of a comparison as stored.

    ``spec`` is the model's name as given, ``role`` ``base``, ``full`` (a fine-tuned
    checkpoint) or ``adapter``; ``dtypes`` counts the tensors of each stored dtype the
    file headers report (``{"bf16": 290, "fp32": 2}``); ``digest`` is the content digest
    of its analysed ``matrices`` (:data:`DIGEST_RULE`).
    """

    spec: str
    role: str
    dtypes: dict[str, int]
    digest: str
    matrices: int


@dataclass(frozen=True)
class Provenance:
    """The tool's ``version``, when the report was ``created`` (ISO 8601, UTC) and every model, base first."""

    version: str
    created: str
    models: list[StoredModel] = field(default_factory=list)
    digest_rule: str = DIGEST_RULE

    def to_json(self) -> dict:
        """Plain JSON-ready data."""
        return {
            "version": self.version,
            "created": self.created,
            "digest_rule": self.digest_rule,
            "models": [vars(m) for m in self.models],
        }


def tool_version() -> str:
    """The tool's version: ``pyproject.toml``'s beside the package, else the installed one, else ``unknown``."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    """``bf16``, ``fp32``, ... (other dtypes by torch's name: ``int8``)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def stored_dtypes(source: WeightSource | LoraAdapter) -> dict[str, int]:
    """How many tensors of each dtype the files of ``source`` store (from the headers), most first."""
    counts = Counter(dtype_name(d) for d in source.tensor_dtypes().values())
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def combined_digest(digests: dict[str, str]) -> str:
    """BLAKE3 over the sorted lines ``key=digest`` (:data:`DIGEST_RULE`)."""
    return content_hasher("\n".join(f"{key}={digests[key]}" for key in sorted(digests)).encode()).hexdigest()


def hash_stored(file: Path, name: str, load) -> str:
    """A :data:`~analysis.plan.StoredDigest` without an index: reads and hashes the tensor."""
    return tensor_digest(load())


def matrix_digests(plan: ComparisonPlan, keys: set[str], stored: StoredDigest) -> tuple[dict[str, str], dict[str, str]]:
    """The base and the tuned content digests of the plan's matrices whose key is in ``keys``."""
    base: dict[str, str] = {}
    tuned: dict[str, str] = {}
    for matrix in plan.matrices:
        if matrix.key not in keys:
            continue
        if matrix.digests is not None:
            base[matrix.key], tuned[matrix.key] = matrix.digests(stored)
        else:
            base[matrix.key] = tensor_digest(matrix.load_base())
            tuned[matrix.key] = tensor_digest(matrix.load_tuned().weight)
    return base, tuned


def _model_digests(
    base_source: WeightSource, tuned_source: WeightSource | LoraAdapter, model: ModelResult, stored: StoredDigest
) -> tuple[dict[str, str], dict[str, str]]:
    """Digests of ``model``'s analysed matrices, paired again from the headers as the analysis paired them."""
    keys = {m.key for m in model.matrices}
    base, tuned = matrix_digests(plan_comparison(base_source, tuned_source), keys, stored)
    if len(tuned) < len(keys):  # analysed with --include-non-block
        base, tuned = matrix_digests(plan_comparison(base_source, tuned_source, include_non_block=True), keys, stored)
    return base, tuned


def comparison_provenance(
    resolver: SpecResolver,
    result: ComparisonResult,
    *,
    stored: StoredDigest | None = None,
    models: Sequence[ModelResult] | None = None,
) -> Provenance:
    """The provenance of ``result``: every model's stored dtypes and content digest, the version, now.

    Parameters
    ----------
    resolver : SpecResolver
        Opens the models by the names in ``result`` (headers only, unless a digest is unknown).
    result : ComparisonResult
        The comparison; ``models`` defaults to ``result.models``.
    stored : StoredDigest, optional
        Digests of stored tensors, e.g. ``SpectrumCache.fingerprints.digest``: after an analysis
        with the cache they are all known there, so nothing is read. ``None`` reads and hashes
        every analysed tensor (as ``--no-cache`` does).
    models : sequence of ModelResult, optional
        The fine-tunes to describe (default: all of ``result``).

    Returns
    -------
    Provenance
        The base first, then each fine-tune in order.
    """
    stored = stored or hash_stored
    base_source = resolver.open(result.base)
    base_digests: dict[str, str] = {}
    described = []
    for model in result.models if models is None else models:
        tuned_source = resolver.open(model.source)
        base, tuned = _model_digests(base_source, tuned_source, model, stored)
        base_digests.update(base)
        described.append(
            StoredModel(model.source, model.kind, stored_dtypes(tuned_source), combined_digest(tuned), len(tuned))
        )
    base_model = StoredModel(
        result.base, "base", stored_dtypes(base_source), combined_digest(base_digests), len(base_digests)
    )
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return Provenance(tool_version(), created, [base_model, *described])
