"""Cost of the RL-versus-SFT measures (issue 23): ``python -m benchmarks.rl_measures``.

Same process, same run, alternating: the analysis with the measures (``measures=True``, the
default) against the analysis without them (``measures=False``), on

- the offline demo (``demo:base`` against ``demo:full-ft``; needs ``WSE_CACHE_DIR`` naming a
  cache folder that holds the built demo), the report as the command line makes it (compare,
  then the JSON report's bytes): cold (empty cache), a cache written before the measures
  (pairs and bases cached, measures not), and fully cached -- the last timed in ``--rounds``
  alternating rounds, each round's ratio printed for the analysis and for the whole report
  (the noise of a shared machine shows in them);
- one 7B-shaped matrix (4096 x 11008, Llama-2-7B's ``down_proj`` transposed... as
  ``gate_proj``: ``out x in`` = 11008 x 4096), bf16-valued, with an RL-like sparse update:
  cold (no cache) and fully cached.

Prints a markdown table; ``--out FILE`` writes it too. Times are wall seconds, best of
``--repeat`` (fully cached: the median of the rounds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from analysis.cache import SpectrumCache
from analysis.compare import compare
from analysis.identity import MatrixId
from analysis.pair_metrics import AnalysisSettings
from analysis.pipeline import analyse_matrix
from analysis.plan import MatrixPlan, TunedMatrix
from analysis.report import to_report

ON, OFF = AnalysisSettings(), AnalysisSettings(measures=False)


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _report(settings: AnalysisSettings, folder: Path) -> tuple[float, float]:
    """Seconds of the cached report as the command line makes it: the analysis (compare, a fresh cache
    object as a new process opens it), then the JSON report's bytes (``write_report``'s ``json.dumps``)."""
    start = time.perf_counter()
    result = compare("demo:base", ["demo:full-ft"], cache=SpectrumCache(folder), device="cpu", settings=settings)
    analysed = time.perf_counter()
    json.dumps(to_report(result), indent=2, allow_nan=False, default=str).encode()
    return analysed - start, time.perf_counter() - analysed


def demo_rows(repeat: int, rounds: int) -> tuple[list[tuple[str, float, float]], dict[str, list[float]]]:
    """(scenario, seconds without the measures, seconds with them) on the demo's full fine-tune, and the
    fully cached run's ratios (with / without) of the analysis and of the whole report, per alternating round."""
    rows = []
    for scenario in ("cold", "cache from before the measures"):
        best = {}
        for settings in (OFF, ON) * repeat:
            folder = Path(tempfile.mkdtemp(prefix="wse-rl-bench-"))
            try:
                if scenario != "cold":
                    compare("demo:base", ["demo:full-ft"], cache=SpectrumCache(folder), device="cpu", settings=OFF)
                seconds = sum(_report(settings, folder))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            best[settings.measures] = min(best.get(settings.measures, float("inf")), seconds)
        rows.append((f"demo full-ft, {scenario} (report)", best[False], best[True]))
        print(rows[-1], flush=True)
    # Fully cached: one cache holding both analyses' entries, the two timed in turn, round after round.
    folder = Path(tempfile.mkdtemp(prefix="wse-rl-bench-"))
    try:
        _report(ON, folder)
        _report(ON, folder)  # the second run writes what the first read per pair (the plan's measures-set)
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(rounds):
            for settings in (OFF, ON):
                times[settings.measures].append(_report(settings, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ratios = {"analysis": [], "report": []}
    for (off_a, off_j), (on_a, on_j) in zip(times[False], times[True], strict=True):
        ratios["analysis"].append(on_a / off_a)
        ratios["report"].append((on_a + on_j) / (off_a + off_j))
    for what, pick in (("analysis", lambda t: t[0]), ("report", sum)):
        off, on = (statistics.median(map(pick, times[m])) for m in (False, True))
        rows.append((f"demo full-ft, fully cached ({what}, median)", off, on))
        print(rows[-1], "ratios", [round(r, 2) for r in ratios[what]], flush=True)
    return rows, ratios


def _seven_b_plan() -> MatrixPlan:
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(11008, 4096, generator=g) * 0.02).to(torch.bfloat16).float()
    changed = torch.rand(base.shape, generator=g) < 0.3  # an RL-like update: 70% of entries unchanged
    tuned = torch.where(changed, base + 1e-3 * torch.randn(base.shape, generator=g), base)
    tuned = tuned.to(torch.bfloat16).float()
    identity = MatrixId("model.layers.0.mlp.gate_proj.weight", 0, "gate", (11008, 4096))
    return MatrixPlan(identity, lambda: base, lambda: TunedMatrix(tuned))


def seven_b_rows(repeat: int) -> list[tuple[str, float, float]]:
    """The same for one 7B-shaped matrix, cold (no cache) and fully cached."""
    plan = _seven_b_plan()
    cold, cached = {}, {}
    for settings in (OFF, ON) * repeat:
        folder = Path(tempfile.mkdtemp(prefix="wse-rl-bench-"))

        def run(s: AnalysisSettings = settings, f: Path = folder) -> None:
            analyse_matrix(plan, settings=s, device="cpu", cache=SpectrumCache(f))

        try:
            seconds, again = _timed(run), _timed(run)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        cold[settings.measures] = min(cold.get(settings.measures, float("inf")), seconds)
        cached[settings.measures] = min(cached.get(settings.measures, float("inf")), again)
    return [("7B-shaped 11008 x 4096, cold", cold[False], cold[True]),
            ("7B-shaped 11008 x 4096, fully cached", cached[False], cached[True])]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds of the fully cached report")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows, ratios = ([], {}) if args.skip_demo else demo_rows(args.repeat, args.rounds)
    rows += [] if args.skip_7b else seven_b_rows(args.repeat)
    lines = ["| scenario | without measures (s) | with measures (s) | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {off:.3f} | {on:.3f} | {on / off:.2f} |" for name, off, on in rows]
    for what, each in ratios.items():
        quartiles = statistics.quantiles(each, n=4)
        lines += ["", f"Fully cached {what}, with / without the measures, {len(each)} alternating rounds: "
                  f"median {statistics.median(each):.2f} (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}; "
                  f"each: {', '.join(f'{r:.2f}' for r in each)})"]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
