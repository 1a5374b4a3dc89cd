"""ProRes schedules: alpha(l, t) as pure host-side math.

Contract: ``alpha(schedule, layer, step, warmup_steps, num_layers)`` returns the residual-branch scale
of 1-based global layer ``layer`` after ``step`` completed optimizer steps, for per-layer warmup
length ``warmup_steps`` (the paper's T, any positive finite float) and ``num_layers`` (L).
Every formula is the docs/method.md §3.2 line for line; nothing here imports torch or Megatron, so it
can be checked against the doc by eye. All arithmetic is Python float (IEEE float64).
"""

import math
from typing import Dict, List, Optional

# Canonical names (project spelling) -> the reference implementation's spelling.
_REFERENCE_ALIASES: Dict[str, str] = {
    "linear": "linear",
    "linear-sqrt": "sqrt",
    "linear-square": "square",
    "equal": "linear_equal",
    "reverse": "linear_reverse",
    "stagewise-0": "stagewise_0",
    "stagewise-inv-depth": "stagewise_L",
    "stagewise-inv-sqrt-depth": "stagewise_sqrt_L",
    "stagewise-inv-sqrt-layer": "stagewise_sqrt_l",
    "fix-inv-depth": "fix_L",
    "fix-inv-sqrt-depth": "fix_sqrt_L",
    "fix-inv-sqrt-layer": "fix_sqrt_l",
}

SCHEDULES: tuple = tuple(_REFERENCE_ALIASES) + ("none",)
"""Canonical schedule names, in the order of docs/method.md §3.1, plus ``none`` (alpha == 1)."""

# Case-sensitive on purpose: fix_L (1/L) and fix_sqrt_l (1/sqrt(l)) differ only by case (doc §10.1).
_BY_NAME: Dict[str, str] = {name: name for name in SCHEDULES}
_BY_NAME.update({ref: canonical for canonical, ref in _REFERENCE_ALIASES.items()})

STATIC_SCHEDULES = frozenset({"none", "fix-inv-depth", "fix-inv-sqrt-depth", "fix-inv-sqrt-layer"})
"""Schedules that do not depend on the step, so they need no warmup length."""


def canonical_schedule(schedule: str) -> str:
    """Canonical name of ``schedule`` (an alias is accepted); ValueError for anything else."""
    if not isinstance(schedule, str) or schedule not in _BY_NAME:
        raise ValueError(
            f"schedule={schedule!r} is not a ProRes schedule; valid choices: "
            f"{', '.join(SCHEDULES)} (reference-implementation aliases: "
            f"{', '.join(_REFERENCE_ALIASES.values())}; names are case-sensitive)"
        )
    return _BY_NAME[schedule]


def needs_warmup_steps(schedule: str) -> bool:
    """True when alpha of ``schedule`` changes with the step, i.e. T must be given."""
    return canonical_schedule(schedule) not in STATIC_SCHEDULES


def total_warmup_steps(schedule: str, warmup_steps: float, num_layers: int) -> Optional[float]:
    """Step at which every layer has reached alpha == 1: T*L (T for ``equal``); None if never."""
    name = canonical_schedule(schedule)
    if name in STATIC_SCHEDULES:
        return None if name != "none" else 0.0
    check_warmup_steps(warmup_steps)
    _check_num_layers(num_layers)
    return float(warmup_steps) if name == "equal" else float(warmup_steps) * num_layers


def warmup_steps_from_total(schedule: str, total_steps: float, num_layers: int) -> float:
    """Per-layer T from a total warmup (the reference implementation's input): inverse of above."""
    name = canonical_schedule(schedule)
    _check_positive_finite("total_warmup_steps", total_steps)
    _check_num_layers(num_layers)
    return float(total_steps) if name == "equal" else float(total_steps) / num_layers


def prores_step(iteration: int, start_step: int = 0) -> int:
    """The ProRes step t of a run after ``iteration`` completed optimizer steps, when its warmup
    started at ``start_step`` (``--prores-start-step``; docs/method.md §4): max(iteration - N, 0)."""
    iteration = _check_int("iteration", iteration, low=0, hint="an integer >= 0")
    start_step = _check_int("start_step", start_step, low=0, hint="an integer >= 0 (--prores-start-step)")
    return max(iteration - start_step, 0)


def alpha(schedule: str, layer: int, step: int, warmup_steps: Optional[float], num_layers: int) -> float:
    """alpha(l, t) of docs/method.md §3.2. ``layer`` is 1-based and global; ``step`` >= 0."""
    name = canonical_schedule(schedule)
    L = _check_num_layers(num_layers)
    l = _check_int("layer", layer, low=1, high=L, hint=f"1..num_layers={L}")
    t = _check_int("step", step, low=0, hint="completed optimizer steps, >= 0")
    if name in STATIC_SCHEDULES:
        if warmup_steps is not None:
            check_warmup_steps(warmup_steps)
        if name == "none":
            return 1.0
        if name == "fix-inv-depth":
            return 1.0 / L
        if name == "fix-inv-sqrt-depth":
            return 1.0 / math.sqrt(L)
        return 1.0 / math.sqrt(l)  # fix-inv-sqrt-layer
    T = check_warmup_steps(warmup_steps)

    def r(end: float) -> float:
        return min(t / end, 1.0)

    s = min(max((t - T * (l - 1)) / T, 0.0), 1.0)
    if name == "linear":
        return r(T * l)
    if name == "linear-sqrt":
        return math.sqrt(r(T * l))
    if name == "linear-square":
        return r(T * l) ** 2
    if name == "equal":
        return r(T)
    if name == "reverse":
        return r(T * (L - l + 1))
    if name == "stagewise-0":
        return s
    if name == "stagewise-inv-depth":
        m = 1.0 / L
    elif name == "stagewise-inv-sqrt-depth":
        m = 1.0 / math.sqrt(L)
    else:  # stagewise-inv-sqrt-layer
        m = 1.0 / math.sqrt(l)
    return m + (1.0 - m) * s


def alpha_table(schedule: str, step: int, warmup_steps: Optional[float], num_layers: int) -> List[float]:
    """[alpha(schedule, l, step, T, L) for l in 1..L]: entry l-1 is layer l."""
    L = _check_num_layers(num_layers)
    return [alpha(schedule, l, step, warmup_steps, L) for l in range(1, L + 1)]


def layer_full_step(schedule: str, layer: int, warmup_steps: Optional[float], num_layers: int) -> Optional[float]:
    """First step at which layer ``layer`` has alpha == 1 (None if it never does, e.g. fix-*)."""
    name = canonical_schedule(schedule)
    L = _check_num_layers(num_layers)
    l = _check_int("layer", layer, low=1, high=L, hint=f"1..num_layers={L}")
    if name == "none":
        return 0.0
    if name in STATIC_SCHEDULES:
        return 0.0 if alpha(name, l, 0, None, L) == 1.0 else None
    T = check_warmup_steps(warmup_steps)
    if alpha(name, l, 0, T, L) == 1.0:
        return 0.0  # stagewise-inv-sqrt-layer's layer 1 has floor 1/sqrt(1) = 1
    if name == "equal":
        return T
    if name == "reverse":
        return T * (L - l + 1)
    return T * l  # linear family and stagewise-*: layer l is done at T*l


def check_schedule(schedule, warmup_steps):
    """(canonical schedule, T) or ValueError: T is required exactly when alpha depends on the step."""
    schedule = canonical_schedule(schedule)
    if needs_warmup_steps(schedule) or warmup_steps is not None:
        warmup_steps = check_warmup_steps(warmup_steps)
    return schedule, warmup_steps


def check_warmup_steps(warmup_steps) -> float:
    """T as a float, or ValueError naming what is wrong with it."""
    if warmup_steps is None:
        raise ValueError(
            "warmup_steps=None: this schedule changes with the step and needs the per-layer "
            "warmup length T (a positive, finite number of optimizer steps)"
        )
    return _check_positive_finite("warmup_steps", warmup_steps)


def _check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number; valid: a positive, finite float")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name}={value!r} is not allowed; valid: a positive, finite float")
    return value


def _check_num_layers(num_layers) -> int:
    return _check_int("num_layers", num_layers, low=1, hint="an integer >= 1")


def _check_int(name: str, value, low: int, high: Optional[int] = None, hint: str = "") -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and hasattr(value, "__index__") and not isinstance(value, bool):
        value, ok = int(value.__index__()), True  # numpy / 0-dim integer types
    if not ok or value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is out of range; valid: {hint}")
    return value
