"""Held-out evaluation of text models: what a mitigated fine-tune forgot, and its own task.

- :class:`HeldOut`: the loss on text standing for the pre-training distribution, Python's
  documentation topics (``pydoc_data.topics``): next-token cross-entropy for a causal LM,
  the contrastive loss it was trained with for a sentence-embedding model;
- :class:`RetrievalTask`: a retrieval task's mean reciprocal rank (the offline demo's
  held-out split, :mod:`analysis.specs.demo`);
- the sentence-embedding pieces both use, which the demo also trains with:
  :class:`TokenizedTexts`, :func:`embed` (mean pooling), :func:`contrastive_loss`
  (sentence-transformers' ``MultipleNegativesRankingLoss``), :func:`retrieval_metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis import scheduler
from analysis.files import atomic_write_text

#: Similarity scale of MultipleNegativesRankingLoss (sentence-transformers' default),
#: i.e. a softmax temperature of 0.05.
SIMILARITY_SCALE = 20.0


class TokenizedTexts:
    """Texts tokenized once (truncated, unpadded); batches are padded on demand."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_tokens: int) -> None:
        self.ids: list[list[int]] = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
        self.pad_id = int(tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The texts ``indices`` as one padded batch: ``input_ids``, ``attention_mask``, ``token_type_ids``."""
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised (all-MiniLM-L6-v2's own pooling)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def contrastive_loss(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """MultipleNegativesRankingLoss: cross-entropy over in-batch cosine similarities.

    Row ``i`` of ``queries @ documents.T * SIMILARITY_SCALE`` should pick document ``i``;
    every other document of the batch is a negative.
    """
    logits = queries @ documents.transpose(0, 1) * SIMILARITY_SCALE
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(queries)))


def retrieval_metrics(similarity: torch.Tensor) -> dict[str, float]:
    """Recall@1 and mean reciprocal rank when query ``i``'s right document is ``i``.

    ``similarity[i, j]`` scores query ``i`` against document ``j``. The rank of the
    right document is one plus the number of documents scored strictly higher (ties go
    the query's way).
    """
    right = similarity.diagonal().unsqueeze(1)
    ranks = (similarity > right).sum(dim=1).double() + 1
    return {"recall@1": float((ranks == 1).double().mean()), "mrr": float((1.0 / ranks).mean())}


@torch.no_grad()
def evaluate_retrieval(model: torch.nn.Module, queries: TokenizedTexts, documents: TokenizedTexts) -> dict[str, float]:
    """:func:`retrieval_metrics` of the held-out queries against all held-out documents."""
    model.eval()

    def encode(tokens: TokenizedTexts) -> torch.Tensor:
        # Length-sorted batches waste little on padding; rows are put back in order.
        order = sorted(range(len(tokens)), key=lambda i: len(tokens.ids[i]))
        out = torch.empty(len(tokens), model.config.hidden_size)
        for start in range(0, len(order), 128):
            chunk = order[start : start + 128]
            out[chunk] = embed(model, tokens.batch(chunk))
        return out

    return retrieval_metrics(encode(queries) @ encode(documents).transpose(0, 1))


HELD_OUT_SOURCE = "pydoc_data.topics"
#: Paragraphs of the held-out text used (spread evenly over the topics).
HELD_OUT_PARAGRAPHS = 128
HELD_OUT_MAX_TOKENS = 64
_BATCH = 32


def held_out_paragraphs(count: int = HELD_OUT_PARAGRAPHS) -> list[str]:
    """``count`` paragraphs of at least 16 words from Python's documentation topics.

    Whitespace-normalised, taken evenly from all of them in sorted order (deterministic).
    """
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
    """The model family of ``folder``, which decides its held-out loss.

    ``causal`` (a ``*ForCausalLM``/``*LMHeadModel``), ``embedding`` (a sentence-transformers
    folder), or ``None``: no held-out loss is defined here.
    """
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


def load_model(folder: Path, family: str) -> torch.nn.Module:
    """The model in ``folder`` loaded by transformers in float32, in eval mode, for ``family``."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if family == "causal" else AutoModel
    model = cls.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


class HeldOut:
    """The held-out text of the module docstring, tokenized once.

    A fast tokenizer must not be called from several threads at once. Calling it gives a
    model's held-out loss.
    """

    def __init__(self, tokenizer, family: str, paragraphs: Sequence[str]) -> None:
        self.family = family
        if family == "causal":
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            self.batches = [
                tokenizer(
                    list(paragraphs[start : start + _BATCH]),
                    truncation=True,
                    max_length=HELD_OUT_MAX_TOKENS,
                    padding=True,
                    return_tensors="pt",
                )
                for start in range(0, len(paragraphs), _BATCH)
            ]
            return
        halves = [p.split() for p in paragraphs]
        self.count = len(paragraphs)
        self.first = TokenizedTexts(tokenizer, [" ".join(w[: len(w) // 2]) for w in halves], HELD_OUT_MAX_TOKENS // 2)
        self.second = TokenizedTexts(tokenizer, [" ".join(w[len(w) // 2 :]) for w in halves], HELD_OUT_MAX_TOKENS // 2)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        """The held-out loss of ``model``.

        ``causal``: the next-token cross-entropy per token; ``embedding``: the mean
        :func:`contrastive_loss` of each paragraph's first half against its second half,
        over batches of more than one paragraph.
        """
        if self.family == "causal":
            total, tokens = 0.0, 0
            for batch in self.batches:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
                )
                total += float(loss)
                tokens += int((labels != -100).sum())
            return total / max(1, tokens)
        losses = []
        for start in range(0, self.count, _BATCH):
            rows = list(range(start, min(start + _BATCH, self.count)))
            if len(rows) < 2:
                continue
            first, second = embed(model, self.first.batch(rows)), embed(model, self.second.batch(rows))
            losses.append(float(contrastive_loss(first, second)))
        return sum(losses) / max(1, len(losses))


def evaluation_workers(points: int, model_bytes: int) -> int:
    """How many points are evaluated at once.

    One per core, at most one per point, and as many model copies as fit in a quarter of
    the memory available now.
    """
    import psutil

    fit = max(1, psutil.virtual_memory().available // 4 // max(1, model_bytes))
    return max(1, min(scheduler.available_cores(), points, fit))


@dataclass(frozen=True)
class RetrievalTask:
    """A held-out retrieval task: query ``i``'s right document is document ``i``.

    Stored as JSON (``{"queries", "documents", "query_max_tokens", "doc_max_tokens"}``,
    :meth:`write`); :meth:`from_file` tokenizes it for a model, and calling the result
    gives the model's mean reciprocal rank (:func:`evaluate_retrieval`).
    """

    queries: TokenizedTexts
    documents: TokenizedTexts

    @staticmethod
    def write(path: Path, queries: Sequence[str], documents: Sequence[str], query_max: int, doc_max: int) -> None:
        """Write a task file atomically (readers never see half a file)."""
        data = {
            "queries": list(queries),
            "documents": list(documents),
            "query_max_tokens": query_max,
            "doc_max_tokens": doc_max,
        }
        atomic_write_text(path, json.dumps(data, indent=1) + "\n", private=False)

    @classmethod
    def from_file(cls, tokenizer: Any, path: Path) -> RetrievalTask:
        """The task in ``path``, tokenized with ``tokenizer``."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            TokenizedTexts(tokenizer, data["queries"], int(data["query_max_tokens"])),
            TokenizedTexts(tokenizer, data["documents"], int(data["doc_max_tokens"])),
        )

    def __call__(self, model: torch.nn.Module) -> float:
        """The mean reciprocal rank of ``model`` on this task (:func:`evaluate_retrieval`)."""
        return evaluate_retrieval(model, self.queries, self.documents)["mrr"]
