"""How long a mitigation has left: a prior cost per step, paced by the time measured so far.

A mitigation's steps cost very different amounts: scaling the intruders of one matrix (a
full SVD of ``W + dW``), analysing the fine-tune and its mitigation (more SVDs per matrix),
and each point of the trade-off curve (an evaluation of the whole model on held-out text).
Counted as equal steps, the curve's few points look like the last 5 % of the work while they
take most of the time (on the demo: 7 s scaling, 8 s analysing, 65 s for the curve).

Each step gets a *prior* cost in reference units, from what it computes:

- a matrix ``m x n``: ``m n min(m, n)``, the order of its thin SVD (Golub & Van Loan 2013,
  sec. 8.6), times :data:`ANALYSE_WEIGHT` while analysing;
- a trade-off point: :data:`EVALUATION_WEIGHT` times the sum of ``m n`` over the plan's
  matrices (a forward pass multiplies each weight once per token, and the held-out text is
  fixed), divided by the points run side by side (one per core); the lambda = 1 point, which
  repeats the fine-tune's, costs nothing. Between points the curve reports the share of its
  evaluations done, points under way included (:class:`EvaluationWork`).

The two weights were measured on the offline demo (two cores) and set only the *ratio*
between phases. Seconds come from the clock: a phase's remaining steps are paced by the
seconds per unit measured in that phase, a phase not started yet by the pace of everything
done so far; a step running longer than expected slows its phase's pace at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analysis.plan import ComparisonPlan
from analysis.scheduler import available_cores

#: Seconds of one analysed matrix per second of one mitigated matrix (demo: 72 analysed in
#: 8.0 s, 36 mitigated in 7.0 s).
ANALYSE_WEIGHT = 0.55
#: Steps of a phase done in less than this many seconds in all were found in a cache: they
#: say nothing of the pace, and the phase's time is counted from after them.
FREE_S = 1.0
#: One evaluated point's units per ``m n`` of the plan, in units of a matrix SVD. The demo's
#: curve (LoRA r=8, six points, two at a time) took 2.5 to 12 times as long as its matrices
#: over eight runs on a shared two-core machine, 3.4 times on two idle cores (2026-12-07:
#: 7.6 s of matrices, 25.7 s of curve). The prior is set for the idle machine (1000: the
#: curve's estimate at its start came out 26.5 s there; 1700, set for the middle of the busy
#: runs, said 45 s and stayed at twice the real time until the first point finished): an
#: estimate that is too low is raised as soon as the points under way overrun it (``slowest``
#: in :meth:`StepClock.estimate`), one that is too high only when a point finishes.
EVALUATION_WEIGHT = 1000.0


@dataclass(frozen=True)
class Phase:
    """A run of steps of one kind: each step's prior cost (reference units), how many run at once."""

    name: str
    weights: tuple[float, ...]
    side_by_side: int = 1


@dataclass(frozen=True)
class Estimate:
    """The clock's reading.

    Seconds left, the part of them in the phase under way, and the fraction of the work done
    (never lower than an earlier reading's).
    """

    remaining_s: float
    step_s: float
    fraction: float


def svd_units(shape: Sequence[int]) -> float:
    """The prior cost of a thin SVD of an ``m x n`` matrix: ``m n min(m, n)``."""
    m, n = int(shape[0]), int(shape[1])
    return float(m) * n * min(m, n)


def mitigation_phases(plan: ComparisonPlan, curve_steps: int = 0, evaluations: int = 0) -> list[Phase]:
    """The phases of :func:`analysis.mitigation.run` for ``plan``.

    Scaling each matrix, analysing the fine-tune and its mitigation (each matrix twice), and
    the trade-off curve's ``curve_steps`` points, ``evaluations`` of which run the model (the
    others repeat one; none without a curve).
    """
    units = [svd_units(m.shape) for m in plan.matrices]
    phases = [
        Phase("scaling intruders", tuple(units)),
        Phase("analysing before and after", tuple(ANALYSE_WEIGHT * u for u in units * 2)),
    ]
    if curve_steps:
        per_point = EVALUATION_WEIGHT * sum(float(m.shape[0]) * m.shape[1] for m in plan.matrices)
        side_by_side = max(1, min(available_cores(), evaluations))
        weights: list[float] = []  # base, fine-tune and its repeats (free), the lambdas
        for e in range(evaluations):
            weights.append(per_point / side_by_side)
            if e == 1:
                weights += [0.0] * (curve_steps - evaluations)
        phases.append(Phase("trade-off curve", tuple(weights), side_by_side))
    return phases


class StepClock:
    """Times the steps of a run and estimates what is left (:mod:`analysis.mitigation.clock`).

    Call :meth:`start` with the phases once they are known, :meth:`mark` with the number of
    steps done as they finish (one thread), and read :meth:`estimate` (any thread).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._weights: list[float] = []
        self._phase: list[int] = []
        self._start: float | None = None
        self._side: list[int] = []
        self._marks: list[float] = []
        self._credit: tuple[int, float, float] | None = None
        self._fraction = 0.0

    @property
    def total(self) -> int:
        """Steps in all phases."""
        return len(self._weights)

    def start(self, phases: Sequence[Phase]) -> None:
        """Begin timing ``phases`` now."""
        self._weights = [w for phase in phases for w in phase.weights]
        self._phase = [i for i, phase in enumerate(phases) for _ in phase.weights]
        self._side = [max(1, phase.side_by_side) for phase in phases]
        self._start = self._clock()
        self._marks = []
        self._credit = None
        self._fraction = 0.0

    def mark(self, done: int) -> None:
        """``done`` steps have finished (steps reported together finished together)."""
        now = self._clock()
        while len(self._marks) < min(done, self.total):
            self._marks.append(now)

    def credit(self, fraction: float) -> None:
        """``fraction`` of the phase under way is done, steps in flight included (until the next mark)."""
        self._credit = (len(self._marks), float(fraction), self._clock())

    def estimate(self, now: float | None = None) -> Estimate | None:
        """Seconds left and the fraction done, or ``None`` before the first step is timed.

        ``step_s`` is what is left of the phase under way: it counts down with the time
        until the phase's next step is marked (:meth:`hosting.jobs.Progress.eta_at`); the
        phases after it are paced by everything measured so far.
        """
        marks = list(self._marks)  # a copy: the job's thread may mark while another reads
        done = len(marks)
        if self._start is None or done == 0:
            return None
        if done >= self.total:
            self._fraction = 1.0
            return Estimate(0.0, 0.0, 1.0)
        now = self._clock() if now is None else now
        current = self._phase[done]
        first = self._phase.index(current)  # the current phase's first step
        began = marks[first - 1] if first > 0 else self._start
        spent_before, units_before = began - self._start, sum(self._weights[:first])
        units_in, last = sum(self._weights[first:done]), marks[-1]
        phase_units = sum(w for w, p in zip(self._weights, self._phase, strict=True) if p == current)
        if units_before > 0 < units_in and last - began < FREE_S:  # found in a cache: free; the phase starts after
            began, phase_units, units_in = last, phase_units - units_in, 0.0
        credit = self._credit
        full_units = sum(w for w, p in zip(self._weights, self._phase, strict=True) if p == current)
        free = full_units - phase_units  # the credit counts the free steps too
        # A credit read before the latest mark still counts while it says more than the marks do: when
        # one of the points run side by side finishes, the others' work so far is in it, not in the marks.
        same_phase = credit is not None and credit[0] <= done and self._phase[credit[0]] == current
        credited = same_phase and credit[1] * full_units - free > units_in
        if credited:  # work inside the steps under way (a model evaluation's batches)
            units_in, last = credit[1] * full_units - free, max(credit[2], last)
        overall = (last - self._start) / max(units_before + units_in, 1e-300)
        pace = (last - began) / units_in if units_in > 0 else (
            spent_before / units_before if units_before > 0 else overall)  # fmt: skip
        running = now - began
        # A phase overrunning its estimate is at least as slow as if the steps under way (as many as
        # run side by side) finished now.
        through = units_in if credited else units_in + sum(self._weights[done : done + self._side[current]])
        slowest = running / max(through, 1e-300) * (phase_units - through)
        left = max(pace * phase_units - running, slowest, 0.0)
        later = overall * sum(w for w, p in zip(self._weights, self._phase, strict=True) if p > current)
        remaining = left + later
        elapsed = now - self._start
        self._fraction = max(self._fraction, elapsed / (elapsed + remaining) if elapsed + remaining > 0 else 0.0)
        return Estimate(remaining, left, self._fraction)


class EvaluationWork:
    """The share of a trade-off curve's evaluations done, inside the points too, for ``report(share)``.

    Each model's forward passes count their tokens; a whole point's tokens are learned from
    the first point to finish (every point reads the same text), so a point under way counts
    for the share of them it has read. Points found in the cache count as done.
    """

    def __init__(self, points: int, report: Callable[[float], None] | None) -> None:
        self.points = max(1, points)
        self.report = report
        self.finished = 0
        self.running: dict[int, int] = {}
        self.per_point = 0
        self.local = threading.local()
        self.lock = threading.Lock()

    def hook(self, module, args: tuple, kwargs: dict, output) -> None:
        """A forward hook (``with_kwargs``): count the batch's tokens for the point this thread evaluates."""
        index = getattr(self.local, "index", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if index is None or not hasattr(ids, "numel"):
            return
        with self.lock:
            self.running[index] = self.running.get(index, 0) + ids.numel()
        self._report()

    def begin(self, index: int) -> None:
        """Start counting point ``index`` (on the thread that evaluates it)."""
        self.local.index = index
        with self.lock:
            self.running[index] = 0

    def end(self, index: int | None = None) -> None:
        """A point finished (``None``: one found in the cache)."""
        self.local.index = None
        with self.lock:
            tokens = self.running.pop(index, 0) if index is not None else 0
            self.per_point = self.per_point or tokens
            self.finished += 1
        self._report()

    def _report(self) -> None:
        if self.report is None:
            return
        with self.lock:
            inside = sum(min(t / self.per_point, 0.95) for t in self.running.values()) if self.per_point else 0.0
            share = min(1.0, (self.finished + inside) / self.points)
        self.report(share)
