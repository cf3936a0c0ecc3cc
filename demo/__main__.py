"""``python -m demo``: build the offline demo (a real base model, its full fine-tune and LoRA adapters)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.errors import InputError
from demo.build import build_demo

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Fine-tune the bundled all-MiniLM-L6-v2 on a retrieval task built from the Python standard "
        "library, fully and with LoRA at several ranks, into the cache folder. Finds an existing build and "
        "returns at once.",
    )
    parser.add_argument("--root", type=Path, default=None, help="where to build (default <cache dir>/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's own)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or find) the demo and print what it holds; exit 2 with one line on bad input."""
    args = build_parser().parse_args(argv)
    try:
        manifest = build_demo(args.root, steps=args.steps, progress=not args.quiet, force=args.force)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(manifest.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
