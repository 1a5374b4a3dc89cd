"""The alpha(l, t) heatmap of an alpha plan (``prores-megatron plan`` and ``report``).

Contract: ``alpha_steps(plan)`` picks the steps shown: 0 .. max(--train-iters, the step at which
every layer is on), at most ``max_columns`` of them, evenly spread and always including the steps
at which layers reach 1; ``alpha_grid(plan, steps)`` is alpha from ``schedules.alpha_table`` at
those steps (grid[l-1, j]); ``write_alpha_heatmap(plan, path)`` draws it (``plots.alpha_heatmap``)
with the schedule, T and L in the title.
"""

from typing import Optional

import numpy as np

from ..core.alpha_plan import AlphaPlan
from ..core.schedules import alpha_table
from .plots import alpha_heatmap

# Static schedules without --train-iters have no natural horizon: show this many steps.
STATIC_HORIZON = 100


def horizon(plan: AlphaPlan) -> int:
    """Last step shown: the run, and the whole warmup even when it outlasts the run."""
    ends = [plan.train_iters or 0, plan.all_on_step or 0]
    ends += [s for s in plan.full_step if s is not None]
    end = max(ends)
    return int(np.ceil(end)) if end > 0 else STATIC_HORIZON


def alpha_steps(plan: AlphaPlan, max_columns: int = 800) -> np.ndarray:
    end = horizon(plan)
    steps = np.unique(np.round(np.linspace(0, end, min(end + 1, max_columns))).astype(np.int64))
    # The steps where layers reach 1, so each ramp's end is drawn at its exact step.
    marks = [int(np.ceil(s)) for s in plan.full_step if s is not None and s <= end]
    return np.unique(np.concatenate([steps, np.asarray(marks, dtype=np.int64)]))


def alpha_grid(plan: AlphaPlan, steps: np.ndarray) -> np.ndarray:
    columns = [alpha_table(plan.schedule, int(t), plan.warmup_steps, plan.num_layers) for t in steps]
    return np.asarray(columns, dtype=np.float64).T


def describe(plan: AlphaPlan) -> str:
    T = "static" if plan.warmup_steps is None else f"T = {plan.warmup_steps:g} steps per layer"
    on = ("every layer at α = 1 from step " + f"{plan.all_on_step:g}") if plan.all_on_step is not None \
        else "some layers never reach α = 1 (static scaling)"
    run = f"; run: {plan.train_iters} steps" if plan.train_iters else ""
    return f"schedule {plan.schedule}, {T}, L = {plan.num_layers}: {on}{run}"


def write_alpha_heatmap(plan: AlphaPlan, path, label: Optional[str] = None):
    steps = alpha_steps(plan)
    title = "ProRes α per layer and step" + (f": {label}" if label else "")
    return alpha_heatmap(path, steps, alpha_grid(plan, steps), plan.full_step, plan.train_iters,
                         title=title, subtitle=describe(plan))
