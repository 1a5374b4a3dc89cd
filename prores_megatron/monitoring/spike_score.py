"""Spike score of a training curve (paper §4.4 after OLMo 2; docs/method.md §8), offline and online.

Contract: ``y_t`` is the value logged at training iteration ``t`` (Megatron counts from 1; the
loss, or the global gradient norm before clipping), one value per iteration. For a run of ``N``
iterations, every ``t`` with ``start*N <= t <= end*N`` (defaults 0.1 and 0.9, bounds included and
taken as exact decimals) is a candidate. A non-finite (or missing) y_t is always an evaluated
spike. Otherwise its history is the finite values among the ``window`` iterations before it
(t-window .. t-1, default 1000; fewer at the start of a run); with fewer than ``min_history`` of
them (default 100) the candidate is skipped (neither a spike nor counted), else it is *evaluated*
and is a spike when

    |y_t - mean| >= threshold * std  and  |y_t - mean| > 0

with the population (ddof = 0) mean and std of its history and ``threshold`` 7 by default.
score = 100 * spikes / evaluated (a percentage); None when nothing was evaluated.

Project choices the paper leaves open (docs/method.md §8): two-sided deviation; no outlier removal in
the window. Beyond the doc: non-finite history values are left out of the mean and std (one NaN
would otherwise blind the detector for a whole window; it was already counted as a spike at its own
step), and a value equal to the mean is never a spike (else a constant history, std 0, would flag
every following step). ``window_used`` is the shortest history behind any decision on a finite
value: equal to ``window`` for runs of at least about 10 windows, smaller for short runs.

An iteration Megatron did not train (``--iterations-to-skip``: no forward, no optimizer step, no
value) is no candidate and holds a NaN place in later windows (``not_trained``); it is not a spike.

``spike_score(values, ...)`` is the offline form; ``OnlineSpikeDetector`` keeps a bounded deque of
the last ``window`` values and gives, step by step, exactly the same decisions and result: both
hand the same values, in the same order, to one decision function (``_Tally.decide``). Pure numpy.
"""

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class SpikeConfig:
    window: int = 1000
    threshold: float = 7.0
    min_history: int = 100
    start: float = 0.1
    end: float = 0.9

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"spike score {name}={getattr(self, name)!r}: {why}")

        for name in ("window", "min_history"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "must be an integer >= 1")
        if self.min_history > self.window:
            bad("min_history", f"must be <= window={self.window} (the history never holds more)")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            bad("threshold", "must be a positive, finite number of standard deviations")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                bad(name, "must be a fraction of the run in [0, 1]")
        if self.start > self.end:
            bad("start", f"must be <= end={self.end}")

    def as_dict(self):
        return asdict(self)


@dataclass
class SpikeResult:
    score: Optional[float]  # percent of evaluated iterations that spiked; None if none evaluated
    spikes: int
    evaluated: int
    skipped: int  # candidates with fewer than min_history finite history values
    window_used: int  # shortest history behind a decision on a finite value (0: none)
    window_max: int  # longest such history
    num_steps: int  # N
    first_candidate: int  # ceil(start*N): the evaluated range, before skipping
    last_candidate: int  # floor(end*N)
    spike_iterations: List[int] = field(default_factory=list)
    config: SpikeConfig = field(default_factory=SpikeConfig)

    def as_dict(self):
        return asdict(self)


def candidate_range(num_steps: int, config: SpikeConfig) -> Tuple[int, int]:
    """Iterations t with start*N <= t <= end*N, exactly: Fraction('0.1') is 1/10, so 0.1*30 is 3
    (float arithmetic gives 3.0000000000000004 and would drop t = 3)."""
    lo = math.ceil(Fraction(repr(float(config.start))) * num_steps)
    hi = math.floor(Fraction(repr(float(config.end))) * num_steps)
    return lo, hi


class _Tally:
    """Counts decisions; the one place both forms turn a history into a verdict."""

    def __init__(self, num_steps: int, config: SpikeConfig):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"spike score num_steps={num_steps!r}: must be an integer >= 0 (N, the run's iterations)")
        self.config, self.num_steps = config, num_steps
        self.lo, self.hi = candidate_range(num_steps, config)
        self.spikes, self.evaluated, self.skipped = 0, 0, 0
        self.window_used, self.window_max = None, 0
        self.spike_iterations: List[int] = []

    def is_candidate(self, t: int) -> bool:
        return self.lo <= t <= self.hi

    def decide(self, t: int, y: float, history: np.ndarray) -> Optional[bool]:
        """``history``: float64 array of the previous <= window values, oldest first. Boolean
        indexing always copies, so both forms reduce a fresh contiguous array of the same values in
        the same order, and the sums are bit-identical."""
        if not math.isfinite(y):
            # Needs no history: a diverged run (NaN from some step on) must score every such step.
            spike = True
        else:
            finite = history[np.isfinite(history)]
            n = int(finite.size)
            if n < self.config.min_history:
                self.skipped += 1
                return None
            # Population mean and std (ddof = 0), spelled out: 3x faster than np.std, same numbers.
            mean = float(np.add.reduce(finite)) / n
            centred = finite - mean
            std = math.sqrt(float(np.add.reduce(centred * centred)) / n)
            deviation = abs(y - mean)
            spike = deviation > 0.0 and deviation >= self.config.threshold * std
            self.window_used = n if self.window_used is None else min(self.window_used, n)
            self.window_max = max(self.window_max, n)
        self.evaluated += 1
        if spike:
            self.spikes += 1
            self.spike_iterations.append(t)
        return spike

    def result(self) -> SpikeResult:
        return SpikeResult(
            score=100.0 * self.spikes / self.evaluated if self.evaluated else None,
            spikes=self.spikes,
            evaluated=self.evaluated,
            skipped=self.skipped,
            window_used=self.window_used or 0,
            window_max=self.window_max,
            num_steps=self.num_steps,
            first_candidate=self.lo,
            last_candidate=self.hi,
            spike_iterations=list(self.spike_iterations),
            config=self.config,
        )


def _as_float(value) -> float:
    # A missing value (JSON null: not logged that step) counts like a non-finite one.
    return float("nan") if value is None else float(value)


def _offline(values: Sequence, first_iteration: int, tally: _Tally,
             not_trained=()) -> Iterator[Tuple[int, Optional[bool]]]:
    not_trained = frozenset(not_trained)
    y = np.array([float("nan") if first_iteration + i in not_trained else _as_float(v) for i, v in enumerate(values)],
                 dtype=np.float64)
    w = tally.config.window
    for i in range(len(y)):
        t = first_iteration + i
        if tally.is_candidate(t) and t not in not_trained:
            # The slice is a view; _Tally.decide's finite filter makes the fresh array.
            yield t, tally.decide(t, float(y[i]), y[max(0, i - w):i])


def _num_steps(values, num_steps, first_iteration) -> int:
    return first_iteration + len(values) - 1 if num_steps is None else num_steps


def iter_decisions(values: Sequence, num_steps: Optional[int] = None, first_iteration: int = 1,
                   config: SpikeConfig = SpikeConfig(), not_trained=()) -> Iterator[Tuple[int, Optional[bool]]]:
    """(t, decision) for every candidate iteration t covered by ``values`` (values[i] is iteration
    first_iteration + i); decision None means skipped for short history."""
    tally = _Tally(_num_steps(values, num_steps, first_iteration), config)
    return _offline(values, first_iteration, tally, not_trained)


def spike_score(values: Sequence, num_steps: Optional[int] = None, first_iteration: int = 1,
                config: SpikeConfig = SpikeConfig(), not_trained=()) -> SpikeResult:
    """Offline spike score (module docstring). ``values[i]`` is iteration first_iteration + i;
    ``num_steps`` (N) defaults to the last iteration covered. Give the run's --train-iters to
    score a run that is still going against its full length. ``not_trained``: the iterations
    Megatron skipped (their values are ignored)."""
    tally = _Tally(_num_steps(values, num_steps, first_iteration), config)
    for _ in _offline(values, first_iteration, tally, not_trained):
        pass
    return tally.result()


class OnlineSpikeDetector:
    """The same score, one iteration at a time, holding only the last ``window`` values.

    ``update(iteration, value)`` (or ``not_trained(iteration)``) must see consecutive iterations
    (first_iteration, +1, ...) and returns the decision for that iteration (None: not a candidate,
    or skipped for short history).
    To restore it after a resume, replay the logged values up to the checkpointed iteration.
    """

    def __init__(self, num_steps: int, config: SpikeConfig = SpikeConfig(), first_iteration: int = 1):
        self.config = config
        self._tally = _Tally(num_steps, config)
        self._history = deque(maxlen=config.window)
        self._next = first_iteration

    @property
    def next_iteration(self) -> int:
        return self._next

    def _advance(self, iteration: int, what: str) -> None:
        if iteration != self._next:
            raise ValueError(
                f"OnlineSpikeDetector.{what}: got iteration {iteration}, expected {self._next} "
                "(the spike score needs every iteration, in order)"
            )
        self._next += 1

    def not_trained(self, iteration: int) -> None:
        """``iteration`` was skipped by Megatron: no decision, a NaN place in the window."""
        self._advance(iteration, "not_trained")
        self._history.append(float("nan"))

    def update(self, iteration: int, value) -> Optional[bool]:
        self._advance(iteration, "update")
        y = _as_float(value)
        decision = None
        if self._tally.is_candidate(iteration):
            decision = self._tally.decide(iteration, y, np.array(self._history, dtype=np.float64))
        self._history.append(y)
        return decision

    def result(self) -> SpikeResult:
        return self._tally.result()
