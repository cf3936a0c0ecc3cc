"""The forgetting / task trade-off of intruder mitigation (Shuttleworth et al. 2024, Fig. 8).

For a model that ``transformers`` loads, :func:`evaluate_tradeoff` measures the base, the
fine-tune and the mitigated fine-tune at each lambda of a grid on two things:

- a held-out text's loss, standing for the pre-training distribution (what the model
  forgets). The text is Python's own documentation topics, ``pydoc_data.topics`` (English
  prose shipped with every CPython; the demo's task is built from function docstrings and
  leaves ``pydoc_data`` out). For a causal language model the loss is the mean next-token
  cross-entropy; for a sentence-embedding model (a sentence-transformers folder, like the
  demo's all-MiniLM-L6-v2) it is the contrastive loss the base was trained with
  (:func:`demo.contrastive_loss`, in-batch negatives) on pairs made of the two
  halves of each paragraph;
- the fine-tune's own metric where it is known: for the offline demo the held-out
  retrieval task's MRR and recall@1, computed by the demo's own evaluation.

Weights are swapped into one loaded model in place, so each point costs one evaluation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from analysis.errors import AnalysisCancelled
from analysis.mitigate import Mitigation, Tradeoff, _fused, _key, _orient_like

HELD_OUT_SOURCE = "pydoc_data.topics"
#: Paragraphs of the held-out text used (spread evenly over the topics).
HELD_OUT_PARAGRAPHS = 128
HELD_OUT_MAX_TOKENS = 64
_BATCH = 32


def held_out_paragraphs(count: int = HELD_OUT_PARAGRAPHS) -> list[str]:
    """``count`` paragraphs of at least 16 words from Python's documentation topics,
    whitespace-normalised, taken evenly from all of them in sorted order (deterministic)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            words = block.split()
            if len(words) >= 16 and not block.startswith(" "):  # prose, not code or grammar
                paragraphs.append(" ".join(words))
    if len(paragraphs) <= count:
        return paragraphs
    stride = len(paragraphs) / count
    return [paragraphs[int(i * stride)] for i in range(count)]


def model_family(folder: Path) -> str | None:
    """``causal`` (a ``*ForCausalLM``/``*LMHeadModel``), ``embedding`` (a
    sentence-transformers folder), or ``None``: no held-out loss is defined here."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    if (folder / "modules.json").is_file() or (folder / "config_sentence_transformers.json").is_file():
        return "embedding"
    return None


def _load(folder: Path, family: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if family == "causal" else AutoModel
    model = cls.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, tokenizer, family: str, paragraphs: Sequence[str]) -> float:
    """The held-out loss of the module docstring for ``model``."""
    if family == "causal":
        total, tokens = 0.0, 0
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        for start in range(0, len(paragraphs), _BATCH):
            batch = tokenizer(
                list(paragraphs[start : start + _BATCH]),
                truncation=True,
                max_length=HELD_OUT_MAX_TOKENS,
                padding=True,
                return_tensors="pt",
            )
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
            )
            total += float(loss)
            tokens += int((labels != -100).sum())
        return total / max(1, tokens)
    from demo import _embed, _Tokens, contrastive_loss

    halves = [p.split() for p in paragraphs]
    first = _Tokens(tokenizer, [" ".join(w[: len(w) // 2]) for w in halves], HELD_OUT_MAX_TOKENS // 2)
    second = _Tokens(tokenizer, [" ".join(w[len(w) // 2 :]) for w in halves], HELD_OUT_MAX_TOKENS // 2)
    losses = []
    for start in range(0, len(paragraphs), _BATCH):
        rows = list(range(start, min(start + _BATCH, len(paragraphs))))
        if len(rows) < 2:
            continue
        losses.append(float(contrastive_loss(_embed(model, first.batch(rows)), _embed(model, second.batch(rows)))))
    return sum(losses) / max(1, len(losses))


class _DemoTask:
    """The demo's held-out retrieval task, evaluated by the demo's own code."""

    def __init__(self, tokenizer) -> None:
        from demo import DOC_MAX_TOKENS, QUERY_MAX_TOKENS, _Tokens, harvest_stdlib_pairs, split_pairs

        _train, held_out = split_pairs(harvest_stdlib_pairs())
        self.queries = _Tokens(tokenizer, [p.query for p in held_out], QUERY_MAX_TOKENS)
        self.documents = _Tokens(tokenizer, [p.document for p in held_out], DOC_MAX_TOKENS)

    def __call__(self, model: torch.nn.Module) -> float:
        from demo import _evaluate

        return _evaluate(model, self.queries, self.documents)["mrr"]


def _folder(source) -> Path | None:
    root = Path(source.root)
    return root if root.is_dir() else None


def evaluate_tradeoff(
    resolver,
    base: str,
    tuned: str,
    mitigation: Mitigation,
    grid: Sequence[float],
    *,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    paragraphs: int = HELD_OUT_PARAGRAPHS,
) -> Tradeoff:
    """Held-out loss and task metric of base, fine-tune and mitigated fine-tune per lambda
    (``paragraphs`` of the held-out text)."""
    from transformers import AutoTokenizer

    from analysis.pairing import match_names

    start = time.perf_counter()
    base_folder = _folder(resolver.open(base))
    adapter = mitigation.kind == "adapter"
    tuned_folder = base_folder if adapter else _folder(resolver.open(tuned))
    family = model_family(base_folder) if base_folder is not None else None
    if base_folder is None or tuned_folder is None or family is None:
        return Tradeoff(
            "held-out loss",
            None,
            [],
            "No trade-off curve: it needs model folders that transformers loads as a causal language model or a "
            "sentence-transformers embedding model.",
        )
    if _fused(mitigation.plan):
        return Tradeoff(
            "held-out loss",
            None,
            [],
            "No trade-off curve: the model stores its experts in fused tensors, which the curve does not swap yet.",
        )
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    texts = held_out_paragraphs(paragraphs)
    is_demo = "demo" in resolver.resolve(tuned).summary
    task = _DemoTask(tokenizer) if is_demo and family == "embedding" else None
    loss_name = "held-out contrastive loss" if family == "embedding" else "held-out LM loss (nats/token)"
    total = len(grid) + 2
    done = 0
    points: list[dict] = []

    def measure(model: torch.nn.Module, label: str, lam: float | None) -> None:
        nonlocal done
        if should_stop is not None and should_stop():
            raise AnalysisCancelled(f"trade-off cancelled after {done} of {total} evaluations")
        loss = held_out_loss(model, tokenizer, family, texts)
        points.append({"label": label, "lam": lam, "loss": loss, "task": task(model) if task else None})
        done += 1
        if progress is not None:
            progress(done, total, label)

    model = _load(base_folder, family)
    measure(model, "base", None)
    if not adapter:
        model = _load(tuned_folder, family)
    params = dict(model.named_parameters())
    plans = {m.name: m for m in mitigation.plan.matrices}
    keys = {m.name: _key(m) for m in mitigation.plan.matrices}
    mapping = match_names(list(plans), list(params))
    oriented: dict[str, bool] = {}
    for name, param_name in mapping.items():
        plan = plans[name]
        reference = plan.load_base() if adapter else plan.load_tuned().weight
        oriented[name] = _orient_like(params[param_name].data, reference, reference) is not reference

    def install(weights: Callable[[str], torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param_name in mapping.items():
                weight = weights(name)
                params[param_name].data.copy_((weight.T if oriented[name] else weight).to(params[param_name].dtype))

    install(lambda name: plans[name].load_tuned().weight)
    measure(model, "fine-tune", 1.0)
    fine_tune = points[-1]
    for lam in grid:
        if lam == 1.0:
            # lambda = 1 changes nothing (the rank-r re-factorisation of dW is dW itself).
            points.append({**fine_tune, "label": "λ = 1"})
            done += 1
            if progress is not None:
                progress(done, total, "λ = 1")
            continue
        install(lambda name, lam=lam: mitigation.tuned_at(keys[name], lam))
        measure(model, f"λ = {lam:g}", float(lam))
    note = (
        f"{loss_name} on {len(texts)} paragraphs of Python's documentation topics ({HELD_OUT_SOURCE}), "
        "standing for the pre-training distribution"
        + ("; task: MRR on the demo's held-out retrieval split" if task else "; no task metric known for this model")
        + f"; {len(mapping)} matrices swapped per point."
    )
    return Tradeoff(loss_name, "MRR (demo retrieval)" if task else None, points, note, time.perf_counter() - start)
