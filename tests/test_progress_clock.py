"""The mitigation's time left: a prior cost per step, paced by measured time (analysis.mitigation.clock).

The unit tests drive :class:`StepClock` with a fake clock; the last test runs the real
mitigation job on the offline demo and holds its estimate to the real time left.
"""

from __future__ import annotations

import time

import pytest

from analysis.mitigation.clock import EVALUATION_WEIGHT, Phase, StepClock, mitigation_phases, svd_units
from hosting.jobs import Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_steps(phases: list[Phase], seconds_per_unit: list[float]) -> list[tuple[float, float, float]]:
    """Step through ``phases`` at each phase's pace; (time, estimate, real remaining) after each step."""
    fake = FakeClock()
    clock = StepClock(fake)
    clock.start(phases)
    durations = [w * pace for phase, pace in zip(phases, seconds_per_unit, strict=True) for w in phase.weights]
    end = sum(durations)
    readings = []
    for done, seconds in enumerate(durations, start=1):
        fake.now += seconds
        clock.mark(done)
        estimate = clock.estimate()
        readings.append((fake.now, estimate.remaining_s, end - fake.now, estimate.fraction))
    return readings


def test_a_run_at_its_priors_pace_is_estimated_exactly() -> None:
    phases = [Phase("a", (1.0, 2.0, 3.0)), Phase("b", (4.0, 4.0)), Phase("c", (10.0, 0.0, 10.0))]
    for _, estimate, real, _ in run_steps(phases, [0.5, 0.5, 0.5]):
        assert estimate == pytest.approx(real)


def test_each_phase_is_paced_by_its_own_measured_steps() -> None:
    """The curve runs three times slower per unit than its prior says: after its first
    point the estimate is exact again, and the fraction done never goes back."""
    phases = [Phase("matrices", (1.0,) * 10), Phase("curve", (20.0,) * 4)]
    readings = run_steps(phases, [0.1, 0.3])
    after_first_point = readings[11:]
    for _, estimate, real, _ in after_first_point:
        assert estimate == pytest.approx(real)
    at_boundary = readings[9]  # the curve not started: paced like the matrices, a third of the truth
    assert at_boundary[1] == pytest.approx(at_boundary[2] / 3)
    fractions = [f for *_, f in readings]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_step_running_long_raises_the_estimate_before_it_finishes() -> None:
    fake = FakeClock()
    clock = StepClock(fake)
    clock.start([Phase("curve", (1.0, 1.0, 1.0, 1.0))])
    fake.now = 10.0
    clock.mark(1)  # 10 s a step: 30 s left
    assert clock.estimate().remaining_s == pytest.approx(30.0)
    fake.now = 25.0  # the second step is on time: 5 s of it and two more steps left
    assert clock.estimate().remaining_s == pytest.approx(25.0)
    fake.now = 40.0  # it has run 30 s: were it to finish now, 20 s a step, two more after it
    assert clock.estimate().remaining_s == pytest.approx(40.0)


def test_work_inside_a_step_paces_the_phase() -> None:
    """A model evaluation reports the share of its batches done: the clock paces the curve by
    it between points, so a slow machine shows before the point finishes."""
    fake = FakeClock()
    clock = StepClock(fake)
    clock.start([Phase("matrices", (1.0,)), Phase("curve", (1.0, 1.0))])
    fake.now = 1.0
    clock.mark(1)
    fake.now = 11.0
    clock.credit(0.25)  # a quarter of the curve in 10 s: 30 s more
    assert clock.estimate().remaining_s == pytest.approx(30.0)
    fake.now = 31.0  # no more news for 20 s: at least as slow as a quarter per 30 s
    assert clock.estimate().remaining_s == pytest.approx(90.0)
    clock.mark(2)  # a mark replaces the credit: half the curve in 30 s
    assert clock.estimate().remaining_s == pytest.approx(30.0)


def test_the_curves_work_counts_tokens_of_the_points_under_way() -> None:
    import torch

    from analysis.mitigation.clock import EvaluationWork

    shares: list[float] = []
    work = EvaluationWork(4, shares.append)
    work.end()  # one point from the cache
    assert shares[-1] == 0.25

    class Model(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    model = Model()
    model.register_forward_hook(work.hook, with_kwargs=True)
    work.begin(1)
    model(input_ids=torch.zeros(2, 8))  # 16 tokens of a point of unknown size: not counted yet
    assert shares[-1] == 0.25
    model(input_ids=torch.zeros(2, 8))
    work.end(1)  # a whole point is 32 tokens
    assert shares[-1] == 0.5 and work.per_point == 32
    work.begin(2)
    model(input_ids=torch.zeros(2, 8))
    assert shares[-1] == pytest.approx(0.625)  # half of the third point


def test_steps_found_in_a_cache_do_not_set_the_pace() -> None:
    """Base, fine-tune and three lambdas of the curve come from the cache at once: the one
    point evaluated is paced by the work before the curve, from after the cached ones."""
    fake = FakeClock()
    clock = StepClock(fake)
    clock.start([Phase("matrices", (1.0, 1.0)), Phase("curve", (5.0,) * 6)])
    fake.now = 2.0
    clock.mark(2)  # 1 s per unit
    fake.now = 2.01
    clock.mark(7)  # five points from the cache
    assert clock.estimate().remaining_s == pytest.approx(5.0, abs=0.02)
    fake.now = 6.01
    assert clock.estimate().remaining_s == pytest.approx(1.0, abs=0.02)
    fake.now = 12.01  # overrunning: nothing after it, so "taking longer" (0), never a runaway
    assert clock.estimate().remaining_s == 0.0


def test_points_run_side_by_side_overrun_together() -> None:
    """Two points at once: 20 s into the first round, were both to finish now, 20 s a round."""
    fake = FakeClock()
    clock = StepClock(fake)
    clock.start([Phase("matrices", (1.0,)), Phase("curve", (5.0,) * 6, side_by_side=2)])
    fake.now = 1.0
    clock.mark(1)  # 1 s per unit: a round of two points 5 s
    fake.now = 21.0  # the first round is 15 s late: two rounds of 20 s after it, at least
    assert clock.estimate().remaining_s == pytest.approx(40.0)


def test_nothing_is_estimated_before_the_first_step() -> None:
    clock = StepClock(FakeClock())
    assert clock.estimate() is None
    clock.start([Phase("a", (1.0,))])
    assert clock.estimate() is None


def test_the_phases_priors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix costs its SVD's order; a curve point a forward pass over the plan's weights,
    shared by the points run side by side (two cores); lambda = 1 (a repeat) nothing."""
    from analysis.mitigation import clock as clock_module
    from analysis.plan import ComparisonPlan

    class Matrix:
        def __init__(self, shape):
            self.shape = shape

    plan = ComparisonPlan.__new__(ComparisonPlan)
    plan.matrices = [Matrix((384, 384)), Matrix((1536, 384))]
    monkeypatch.setattr(clock_module, "available_cores", lambda: 2)
    # grid 0, .25, .5, .75, 1: 7 steps (base, fine-tune, 5 lambdas), 6 evaluations.
    scaling, analysing, curve = mitigation_phases(plan, curve_steps=7, evaluations=6)
    assert scaling.weights == (svd_units((384, 384)), svd_units((1536, 384)))
    assert len(analysing.weights) == 4
    point = EVALUATION_WEIGHT * (384 * 384 + 1536 * 384)
    assert curve.weights == (point / 2, point / 2, 0.0, point / 2, point / 2, point / 2, point / 2)
    assert mitigation_phases(plan)[-1].name == "analysing before and after"


def test_progress_counts_down_the_phase_under_way_only() -> None:
    p = Progress(5, 10, "trade-off curve: base", 20.0, remaining_s=30.0, step_s=12.0, work=0.4, at=100.0)
    assert p.eta_s == 30.0 and p.fraction == 0.4
    assert p.eta_at(105.0) == pytest.approx(25.0)
    assert p.eta_at(130.0) == pytest.approx(18.0)  # the later phases are not counted down
    assert p.fraction_at(105.0) == pytest.approx(25.0 / 50.0)
    assert p.fraction_at(90.0) == 0.4  # never below what was reported
    plain = Progress(2, 8, "x", 4.0)
    assert plain.eta_at(1e9) == plain.eta_s == 12.0 and plain.fraction_at(1e9) == 0.25


@pytest.mark.timeout(900)
def test_the_demo_mitigations_estimate_is_within_a_factor_of_two(tmp_path) -> None:
    """The real job on the demo's LoRA r=8 with the trade-off curve, from an empty cache:
    read every half second, the time left it shows is within a factor of two of the time
    that really was left (or 5 s of it near the end), and the bar never goes back."""
    import os

    from analysis.cache import SpectrumCache
    from analysis.mitigation import MitigationSettings
    from analysis.scheduler import available_cores
    from analysis.specs import SpecResolver
    from hosting.jobs import JobManager
    from hosting.mitigation_jobs import mitigation_job
    from tests.demo_fixture import DEMO_ROOT

    if not (DEMO_ROOT / "manifest.json").exists():
        pytest.skip("the offline demo is not built (python -m analysis demo)")
    if os.getloadavg()[0] > 1.5 * available_cores():
        # Other work on the cores changes every phase's speed by different factors (measured
        # 2.7x to 12x between the matrices and the curve): the time left cannot be foretold.
        pytest.skip(f"the machine is busy (load {os.getloadavg()[0]:.1f}): a timing test needs idle cores")
    resolver = SpecResolver(demo_root=DEMO_ROOT, allow_local_paths=False)
    settings = MitigationSettings(lam=0.75, top_k=10, eps=0.5)
    fn = mitigation_job(
        resolver, "demo:base", "demo:lora-r8", settings, tradeoff=True, cache=SpectrumCache(tmp_path / "spectra")
    )
    manager = JobManager()
    readings = []
    job = manager.submit("demo-mitigation", fn)
    shown = 0.0
    while not job.wait(0.5):
        p, now = job.progress, time.time()
        if p is not None and p.remaining_s is not None:
            shown = max(shown, p.fraction_at(now))  # as the page shows it
            readings.append((now, p.eta_at(now), p.work, shown))
    end = time.time()
    manager.shutdown()
    assert job.error is None and job.result.tradeoff.points
    assert len(readings) > 10
    works = [w for _, _, w, _ in readings]
    assert works == sorted(works)
    misses = [
        (round(end - t, 1), round(eta, 1))
        for t, eta, _, _ in readings
        if not (0.5 * (end - t) <= eta <= 2 * (end - t) or abs(eta - (end - t)) <= 5.0)
    ]
    assert not misses, f"(real s left, estimate) outside a factor of two, of {len(readings)}: {misses}"
