"""A quick stand-in for the offline demo, for the dashboard's tests.

The real demo (``python -m analysis demo``) trains four fine-tunes of all-MiniLM-L6-v2 and
takes minutes on a CPU; the dashboard tests only need *a* demo build in the same layout:
the real base (the packaged all-MiniLM-L6-v2), a full "fine-tune" and LoRA adapters of it
made in seconds by :mod:`tests.factories` (noise and random factors, not training), and a
``manifest.json`` written by :class:`demo.DemoManifest` itself. Task metrics are
NaN (nothing was evaluated) and the labels say "stand-in".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from demo import MANIFEST_NAME, DemoManifest, DemoModel, base_model_path
from tests import factories

NAN_METRICS = {"recall@1": float("nan"), "mrr": float("nan")}


def make_standin_demo(root: Path) -> DemoManifest:
    """Write a demo build into ``root`` (base + full FT + LoRA r=1 and r=8) and return it."""
    root = Path(root)
    base = base_model_path()
    full = factories.make_full_finetune(base, root / "full-ft", relative_noise=0.02)
    r1 = factories.make_lora_adapter(base, root / "lora-r1", r=1, factor_std=0.3)
    r8 = factories.make_lora_adapter(base, root / "lora-r8", r=8, factor_std=0.3)
    manifest = DemoManifest(
        root=root,
        base=DemoModel("base", "all-MiniLM-L6-v2 (base)", base, "full", NAN_METRICS),
        fine_tunes=(
            DemoModel("full-ft", "Full FT (stand-in)", full, "full", NAN_METRICS),
            DemoModel("lora-r1", "LoRA r=1 (stand-in)", r1, "adapter", NAN_METRICS, r=1, lora_alpha=2),
            DemoModel("lora-r8", "LoRA r=8 (stand-in)", r8, "adapter", NAN_METRICS, r=8, lora_alpha=16),
        ),
        steps=0,
        build_seconds=0.0,
        task={"description": "stand-in for tests: random updates, no training"},
    )
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2))
    return manifest


def shown(markdown: str) -> str:
    """What a visitor reads of a Markdown body the dashboard sends: the text of
    :func:`ui.text.escape_markdown` without its backslashes and word joiners."""
    from ui.text import WORD_JOINER

    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown).replace(WORD_JOINER, "")
