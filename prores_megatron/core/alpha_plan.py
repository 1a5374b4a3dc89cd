"""The ProRes alpha plan of a run: when each layer reaches alpha = 1, and whether that suits the run.

Contract: ``alpha_plan(schedule, warmup_steps, num_layers, train_iters)`` returns an ``AlphaPlan``:
per layer the first optimizer step t with alpha(l, t) = 1 (None if never, e.g. the fix-* schedules),
the step at which every layer is on, and warnings (plain sentences) when the warmup outlasts
``--train-iters`` (the deepest layers never train at alpha = 1) or when T is so short that layers
switch on within a few steps (the warmup then does nothing). Pure schedule math, no torch.
"""

from dataclasses import asdict, dataclass
from typing import List, Optional

from .schedules import layer_full_step, needs_warmup_steps, warmup_steps_from_total

MIN_USEFUL_WARMUP_STEPS = 10
"""Below this many steps per layer a layer goes from off to on within a few updates (the paper
uses T = 1000, and 500 at >= 96 layers)."""


@dataclass(frozen=True)
class AlphaPlan:
    schedule: str
    warmup_steps: Optional[float]  # per-layer T
    num_layers: int
    train_iters: Optional[int]
    full_step: List[Optional[float]]  # entry l-1: first step with alpha(l, t) = 1
    all_on_step: Optional[float]  # every layer at alpha = 1 from this step (None: never)
    warnings: List[str]

    def as_dict(self):
        return asdict(self)


def alpha_plan(schedule: str, warmup_steps: Optional[float], num_layers: int,
               train_iters: Optional[int] = None) -> AlphaPlan:
    L = num_layers
    full = [layer_full_step(schedule, l, warmup_steps, L) for l in range(1, L + 1)]
    all_on = None if any(s is None for s in full) else max(full)
    warnings = []
    if needs_warmup_steps(schedule):
        end = all_on  # a time-dependent schedule turns every layer fully on at some step
        # Steps t = 0 .. train_iters-1 run; a layer whose alpha first hits 1 at t >= train_iters
        # never trains fully on.
        late = [l for l, s in enumerate(full, start=1) if train_iters and s >= train_iters]
        if late:
            warnings.append(
                f"ProRes warmup ends at step {end:g} but --train-iters is {train_iters}: "
                f"{len(late)} of {L} layers never reach alpha = 1 (layers {late[0]}..{late[-1]} "
                f"under '{schedule}'); lower --prores-warmup-steps below "
                f"{warmup_steps_from_total(schedule, train_iters, L):g} or train longer"
            )
        if warmup_steps < MIN_USEFUL_WARMUP_STEPS:
            warnings.append(
                f"--prores-warmup-steps {warmup_steps:g} is very short: each layer switches from "
                f"alpha = 0 to 1 within {warmup_steps:g} step(s), all {L} layers are on by step "
                f"{end:g}, and the warmup has little effect (the paper uses T = 1000, 500 at "
                ">= 96 layers)"
            )
    return AlphaPlan(
        schedule=schedule,
        warmup_steps=warmup_steps,
        num_layers=L,
        train_iters=train_iters,
        full_step=full,
        all_on_step=all_on,
        warnings=warnings,
    )


def format_alpha_plan(plan: AlphaPlan, max_rows: int = 12) -> str:
    """A few 'layer -> step' lines (all of them for shallow models), then the warnings."""
    L = plan.num_layers
    if L <= max_rows:
        shown = list(range(1, L + 1))
    else:
        shown = sorted({1, 2, 3, *(round(L * k / 8) for k in range(1, 8)), L})
    lines = [
        f"  schedule {plan.schedule}, T = "
        + (f"{plan.warmup_steps:g}" if plan.warmup_steps is not None else "-")
        + f" steps per layer, L = {L}; every layer at alpha = 1 from step "
        + (f"{plan.all_on_step:g}" if plan.all_on_step is not None else "never (static schedule)")
        + (f" (--train-iters {plan.train_iters})" if plan.train_iters else "")
    ]
    cells = [
        f"layer {l}: " + (f"{plan.full_step[l - 1]:g}" if plan.full_step[l - 1] is not None else "never")
        for l in shown
    ]
    for i in range(0, len(cells), 6):
        lines.append("  " + " | ".join(cells[i:i + 6]))
    if len(shown) < L:
        lines.append(f"  ({L - len(shown)} more layers: --json lists every one)")
    return "\n".join(lines)
