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
from analysis.results import DEFAULT_EPSILON, DEFAULT_EPSILONS, DEFAULT_TOP_K
from demo import cli as demo_cli

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
    """The ``python -m analysis`` argument parser, with its ``report`` and ``mitigate`` commands."""
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
        "tuned",
        metavar="TUNED",
        nargs="+",
        help="fine-tunes: folders, .safetensors files, hub ids or LoRA adapters; a folder of checkpoint-N "
        "folders (a Trainer output_dir) or series:org/name@rev1,rev2 is a series: one model per checkpoint, "
        "in step order, each with its step",
    )
    report.add_argument("--out", type=Path, help="where to write the JSON report (needed unless --html is given)")
    report.add_argument(
        "--html",
        type=Path,
        metavar="PATH",
        help="also (or, without --out, only) write an HTML report: one file that opens offline in any browser, "
        "with the overview grids, intruders vs eps, effective rank, the spectra of the matrices that changed most, "
        "the totals and the provenance (stored dtypes, content digests, version, date); about 5 MB, most of it "
        "the embedded plotly.js",
    )
    report.add_argument(
        "--eps",
        type=_unit_interval,
        default=DEFAULT_EPSILON,
        help=f"the eps of the HTML report's grids, totals and matrix charts (default {DEFAULT_EPSILON:g}; "
        "its intruders-vs-eps chart covers --epsilons)",
    )
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
    _add_measure_arguments(report)
    report.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="run the matrix pairs as tasks on a Ray cluster: local (start one on this machine), auto (the "
        "cluster RAY_ADDRESS names) or an address such as ray://head:10001; every node must read the models",
    )

    demo_cli.add_arguments(
        commands.add_parser(
            "demo",
            help="build the offline demo (a real base model, its full fine-tune and LoRA adapters)",
            description=demo_cli.DESCRIPTION,
        )
    )
    _add_mitigate_parser(commands)
    return parser


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_measure_arguments(report: argparse.ArgumentParser) -> None:
    """The RL-versus-SFT measures' settings (docs/metrics.md); checked by ``checked_settings``."""
    from analysis import measures

    group = report.add_argument_group("RL-versus-SFT measures (Zhu et al. 2025, Mukherjee et al. 2025)")
    group.add_argument("--no-measures", action="store_true", help="skip update sparsity, rotation and mask overlap")
    group.add_argument("--sparsity-eta", type=_number, default=measures.DEFAULT_ETA,
                       help="Zhu et al. Eq. 1: unchanged iff |w1-w0| <= eta max(|w0|,|w1|) (default 1e-3)")  # fmt: skip
    group.add_argument("--sparsity-atol", type=_number, default=measures.DEFAULT_ATOL,
                       help="Mukherjee et al.: unchanged iff |w1-w0| <= atol, in bf16 (default 1e-5)")  # fmt: skip
    group.add_argument("--sparsity-rule", choices=measures.RULES, default="relative",
                       help="the rule of the headline sparsity in the HTML report (both are in the JSON)")  # fmt: skip
    group.add_argument("--principal-k", type=_positive_int, default=measures.DEFAULT_PRINCIPAL_K,
                       help="top-k singular subspaces of the rotation and the principal mask (default 16)")  # fmt: skip
    group.add_argument("--mask-alpha", type=_number, default=measures.DEFAULT_MASK_ALPHA,
                       help="fraction of entries in the principal mask (default 0.05)")  # fmt: skip


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value:g}")
    return value


def _add_mitigate_parser(commands) -> None:
    mitigate = commands.add_parser(
        "mitigate",
        help="scale a fine-tune's intruder dimensions down and export the result",
        description=(
            "Intruder mitigation (Shuttleworth et al. 2024, section 6; PEFT's reduce_intruder_dimension): in every "
            "matrix, the intruders among the top-k singular vectors of the tuned weight at eps are scaled by lambda. "
            "An adapter is re-factored to its rank r (or r + n with --exact) and written as a PEFT folder; a full "
            "fine-tune (or an adapter with --merged) is written as a merged model.safetensors folder. "
            "mitigation.json beside it holds the intruders before and after and the re-factorisation error."
        ),
    )
    mitigate.add_argument("base", metavar="BASE", help="the pre-trained model: a folder, a .safetensors file, a hub id")
    mitigate.add_argument("tuned", metavar="TUNED", help="the fine-tune: a PEFT adapter folder or a full model")
    mitigate.add_argument("--out", required=True, type=Path, help="folder to write the mitigated adapter/model to")
    mitigate.add_argument(
        "--lam", type=_unit_interval, default=0.75, help="scale of the intruder components, 0..1 (default 0.75)"
    )
    mitigate.add_argument(
        "--top-k",
        type=_positive_int,
        default=DEFAULT_TOP_K,
        help=f"intruders among the top k (default {DEFAULT_TOP_K})",
    )
    mitigate.add_argument(
        "--eps", type=_unit_interval, default=0.5, help="similarity threshold of an intruder (default 0.5)"
    )
    mitigate.add_argument(
        "--rule",
        choices=["peft", "top1"],
        default="peft",
        help="peft: every intruder among the top k; top1: the top intruder of each matrix (the paper's)",
    )
    mitigate.add_argument("--exact", action="store_true", help="keep rank r + n instead of truncating to rank r")
    mitigate.add_argument("--merged", action="store_true", help="write the merged model even for an adapter")
    mitigate.add_argument(
        "--tradeoff", action="store_true", help="also evaluate the held-out loss/task trade-off over a lambda grid"
    )
    mitigate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run the analysis")
    mitigate.add_argument("--no-cache", action="store_true", help="compute everything afresh and store nothing")
    mitigate.add_argument(
        "--cache-dir", type=Path, default=None, help="cache folder (default $WSE_CACHE_DIR or cache/)"
    )
    mitigate.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_mitigate(args: argparse.Namespace) -> int:
    import json

    from analysis.cache import SpectrumCache, default_cache_dir
    from analysis.mitigation import MitigationSettings, export_adapter, export_merged, run
    from analysis.specs import SpecResolver

    if args.eps == 0:
        raise InputError("--eps", "must be above 0")
    settings = MitigationSettings(lam=args.lam, top_k=args.top_k, eps=args.eps, rule=args.rule, exact=args.exact)
    cache = None if args.no_cache else SpectrumCache((args.cache_dir or default_cache_dir()) / "spectra")
    resolver = SpecResolver(allow_local_paths=True)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(args.out, "exists and is not an empty folder; choose a new --out")
    bar = tqdm(total=None, desc="mitigate", unit="step", file=sys.stderr, disable=args.quiet)

    def progress(done: int, total: int, what: str) -> None:
        bar.total = total
        bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        result = run(
            resolver,
            args.base,
            args.tuned,
            settings,
            device=args.device,
            cache=cache,
            tradeoff=args.tradeoff,
            progress=progress,
        )
    finally:
        bar.close()
    try:
        if result.mitigation.kind == "adapter" and not args.merged:
            export_adapter(result.mitigation, resolver, args.tuned, args.out)
        else:
            export_merged(result.mitigation, resolver, args.base, args.tuned, args.out)
        (args.out / "mitigation.json").write_text(json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise InputError(args.out, f"cannot write the export: {exc.strerror or exc}") from None
    if not args.quiet:
        totals = result.mitigation.totals()
        counts = result.counts([settings.eps])
        print(
            f"wrote {args.out}: {totals['intruders_scaled']} intruders scaled in {totals['matrices_with_intruders']} "
            f"of {totals['matrices']} matrices; intruders at eps {settings.eps:g} among the top {settings.top_k}: "
            f"{counts['before'][0]} -> {counts['after'][0]}; ||dW||_F {totals['delta_fro_before']:.4g} -> "
            f"{totals['delta_fro_after']:.4g} ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
        )
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from analysis.cache import SpectrumCache, default_cache_dir
    from analysis.compare import compare
    from analysis.pair_metrics import AnalysisSettings
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

    if args.out is None and args.html is None:
        raise InputError("--out", "give --out (the JSON report), --html (the HTML report) or both")
    if args.html is not None and args.eps == 0:
        raise InputError("--eps", "must be above 0")
    start = time.perf_counter()
    options = dict(
        top_k=args.top_k,
        epsilons=args.epsilons,
        device=args.device,
        cache=cache,
        progress=progress,
        include_non_block=args.include_non_block,
        settings=AnalysisSettings(
            max_top_k=max(args.top_k, AnalysisSettings.max_top_k),
            side=args.side,
            measures=not args.no_measures,
            sparsity_eta=args.sparsity_eta,
            sparsity_atol=args.sparsity_atol,
            sparsity_rule=args.sparsity_rule,
            principal_k=args.principal_k,
            mask_alpha=args.mask_alpha,
        ),
    )
    result = compare(args.base, args.tuned, ray=args.ray, **options)
    written = []
    if args.out is not None:
        try:
            write_report(to_report(result), args.out)
        except OSError as exc:
            raise InputError(args.out, f"cannot write the report: {exc.strerror or exc}") from None
        written.append(str(args.out))
    if args.html is not None:
        _write_html(args, result, cache)
        written.append(f"{args.html} ({args.html.stat().st_size / 2**20:.1f} MiB)")  # mostly plotly.js
    if not args.quiet:
        elapsed = time.perf_counter() - start
        print(f"wrote {', '.join(written)} ({len(result.models)} models, {elapsed:.1f} s)", file=sys.stderr)
    return 0


def _write_html(args: argparse.Namespace, result, cache) -> None:
    """The HTML report of ``result`` (:func:`charts.html_report.html_report`) at ``args.html``."""
    from analysis.files import atomic_write_text
    from analysis.provenance import comparison_provenance
    from analysis.specs import SpecResolver
    from charts.html_report import html_report, reproduce_command

    # With the cache, every digest is in its fingerprint index already; without, the tensors are hashed again.
    stored = cache.fingerprints.digest if cache is not None else None
    provenance = comparison_provenance(SpecResolver(allow_local_paths=True), result, stored=stored)
    if cache is not None:
        cache.fingerprints.flush()
    settings = {
        "singular vectors compared": f"{args.side} (the {'output' if args.side == 'left' else 'input'} space)",
        "matrices analysed": "every 2-D weight" if args.include_non_block else "the numbered blocks' 2-D weights",
        "command": reproduce_command(
            result, args.eps, side=args.side, include_non_block=args.include_non_block, html_path=str(args.html)
        ),
    }
    text = html_report(result, args.eps, provenance=provenance, settings=settings, cache=cache)
    try:
        atomic_write_text(args.html, text, private=False)
    except OSError as exc:
        raise InputError(args.html, f"cannot write the HTML report: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success; :data:`EXIT_BAD_INPUT` (2) for bad input or a disk error, printed as
        one ``error:`` line; 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mitigate":
            return _run_mitigate(args)
        if args.command == "demo":
            return demo_cli.run(args)
        return _run_report(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # the disk, not a bug: one line (a full disk, a missing permission)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
