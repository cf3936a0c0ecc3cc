"""The demo's command-line options, shared by ``python -m demo`` and ``python -m analysis demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from demo.build import build_demo

#: What the ``demo`` command does, for its ``--help``.
DESCRIPTION = (
    "Fine-tune the bundled all-MiniLM-L6-v2 on a retrieval task built from the Python standard library, fully "
    "and with LoRA at several ranks, into the cache folder. Finds an existing build and returns at once."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options (``--root``, ``--steps``, ``--force``, ``--quiet``) to ``parser``."""
    parser.add_argument("--root", type=Path, default=None, help="where to build (default <cache dir>/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's own)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Build (or find) the demo as ``args`` ask and print what it holds.

    Parameters
    ----------
    args : argparse.Namespace
        The options of :func:`add_arguments`.

    Returns
    -------
    int
        0; bad input raises :class:`~analysis.errors.InputError` for the caller to print.
    """
    manifest = build_demo(args.root, steps=args.steps, progress=not args.quiet, force=args.force)
    print(manifest.describe())
    return 0
