"""``python -m analysis``: the command line (docs/metrics.md, "Command line and report contract").

Exit status 0 on success; 2 on bad input with one plain line on stderr naming the file
and the problem (no traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from analysis.errors import InputError
from analysis.results import DEFAULT_EPSILONS, DEFAULT_TOP_K

EXIT_BAD_INPUT = 2


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.1,0.5,0.9, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"every eps must lie in (0, 1], got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Weight-spectrum explorer: what did a fine-tune (or a LoRA adapter) do to a model's weights?",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = commands.add_parser(
        "report",
        help="compare a base model with fine-tunes and write a JSON report",
        description=(
            "Compare BASE with each TUNED model, matrix by matrix: intruder dimensions (Shuttleworth et al. 2024), "
            "effective rank, rank90 (Biderman et al. 2024), stable rank and the update's Frobenius norm. "
            "A TUNED that is a PEFT adapter folder (holds adapter_config.json) or a kohya LoRA file is applied "
            "to BASE. Base SVDs are cached, so later runs against the same base are much faster."
        ),
    )
    report.add_argument(
        "base", metavar="BASE", help="the pre-trained model: a local folder, a .safetensors file or a hub id"
    )
    report.add_argument(
        "tuned", metavar="TUNED", nargs="+", help="fine-tunes: folders, .safetensors files, hub ids or LoRA adapters"
    )
    report.add_argument("--out", required=True, type=Path, help="where to write the JSON report")
    report.add_argument(
        "--top-k",
        type=_positive_int,
        default=DEFAULT_TOP_K,
        help=f"intruders are sought among the top-k tuned singular vectors (default {DEFAULT_TOP_K})",
    )
    report.add_argument(
        "--epsilons",
        type=_epsilons,
        default=list(DEFAULT_EPSILONS),
        help="comma-separated thresholds eps; a tuned vector whose best |cosine| with every base vector is "
        "below eps is an intruder (default 0.10,0.15,...,0.90)",
    )
    report.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to run the SVDs: auto uses CUDA when present (default auto)",
    )
    report.add_argument("--no-cache", action="store_true", help="compute everything afresh and store nothing")
    report.add_argument(
        "--cache-dir", type=Path, default=None, help="cache folder (default $WSE_CACHE_DIR or cache/ in the repo)"
    )
    report.add_argument(
        "--include-non-block",
        action="store_true",
        help="also analyse 2-D weights outside the numbered blocks (embeddings, heads, poolers)",
    )
    report.add_argument(
        "--side",
        choices=["left", "right"],
        default="left",
        help="singular vectors to compare: left (output space, the paper's default) or right (input space)",
    )
    report.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = commands.add_parser(
        "demo",
        help="build the offline demo (a real base model, its full fine-tune and LoRA adapters)",
        description="Fine-tune the bundled all-MiniLM-L6-v2 on a retrieval task built from the Python standard "
        "library, fully and with LoRA at several ranks, into the cache folder. Finds an existing build and "
        "returns at once.",
    )
    demo.add_argument("--root", type=Path, default=None, help="where to build (default <cache dir>/demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's own)")
    demo.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _run_report(args: argparse.Namespace) -> int:
    from analysis.cache import SpectrumCache, default_cache_dir
    from analysis.pipeline import AnalysisSettings, compare
    from analysis.report import to_report, write_report

    cache = None if args.no_cache else SpectrumCache((args.cache_dir or default_cache_dir()) / "spectra")
    bars: dict[str, tqdm] = {}

    def progress(event) -> None:
        if args.quiet:
            return
        bar = bars.get(event.model)
        if bar is None:
            bar = bars[event.model] = tqdm(
                total=event.total, desc=Path(event.model).name or event.model, unit="matrix", file=sys.stderr
            )
        bar.update(event.done - bar.n)
        if event.done == event.total:
            bar.close()

    start = time.perf_counter()
    result = compare(
        args.base,
        args.tuned,
        top_k=args.top_k,
        epsilons=args.epsilons,
        device=args.device,
        cache=cache,
        progress=progress,
        include_non_block=args.include_non_block,
        settings=AnalysisSettings(max_top_k=max(args.top_k, AnalysisSettings.max_top_k), side=args.side),
    )
    try:
        write_report(to_report(result), args.out)
    except OSError as exc:
        raise InputError(args.out, f"cannot write the report: {exc.strerror or exc}") from None
    if not args.quiet:
        print(f"wrote {args.out} ({len(result.models)} models, {time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from demo import build_demo

    manifest = build_demo(args.root, steps=args.steps, progress=not args.quiet, force=args.force)
    print(manifest.describe())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            return _run_report(args)
        return _run_demo(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
