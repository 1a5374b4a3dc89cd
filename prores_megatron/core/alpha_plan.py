"""The ProRes alpha plan of a run: when each layer reaches alpha = 1, and whether that suits the run.

Contract: ``alpha_plan(schedule, warmup_steps, num_layers, train_iters, unit, tokens_per_layer)``
returns an ``AlphaPlan`` (``unit="samples"``: the warmup S and the run length count samples):
per layer the first optimizer step t with alpha(l, t) = 1 (None if never, e.g. the fix-* schedules),
the step at which every layer is on, and warnings (plain sentences) when the warmup outlasts
``--train-iters`` (the deepest layers never train at alpha = 1) or when T is so short that layers
switch on within a few steps (the warmup then does nothing). Pure schedule math, no torch.
"""

from dataclasses import asdict, dataclass
from typing import List, Optional

from .schedules import layer_full_step, needs_warmup_steps, warmup_steps_from_total

PAPER_TOKENS_PER_LAYER = 1000 * 512 * 1024
"""The paper's reference warmup in tokens per layer: T = 1000 steps x 512 sequences x 1024 tokens
(about 0.52 B tokens per layer, docs/method.md §7)."""

MIN_USEFUL_WARMUP_STEPS = 10
"""Below this many steps per layer a layer goes from off to on within a few updates (the paper
uses T = 1000, and 500 at >= 96 layers)."""


@dataclass(frozen=True)
class AlphaPlan:
    schedule: str
    warmup_steps: Optional[float]  # per-layer T
    num_layers: int
    train_iters: Optional[int]
    full_step: List[Optional[float]]  # entry l-1: first step (or sample count) with alpha(l, t) = 1
    all_on_step: Optional[float]  # every layer at alpha = 1 from this step (None: never)
    warnings: List[str]
    unit: str = "steps"  # "samples" for --prores-warmup-samples: T, full_step and train_iters count samples
    tokens_per_layer: Optional[float] = None  # the warmup per layer in tokens, when the batch is known

    def as_dict(self):
        return asdict(self)


def warmup_tokens_per_layer(warmup: Optional[float], unit: str, seq_length: Optional[int],
                            global_batch_size: Optional[int] = None) -> Optional[float]:
    """T x global batch x sequence length (steps), or S x sequence length (samples); None if unknown."""
    if warmup is None or not seq_length or (unit == "steps" and not global_batch_size):
        return None
    return float(warmup) * seq_length * (global_batch_size if unit == "steps" else 1)


def format_tokens(plan: AlphaPlan) -> Optional[str]:
    """'warmup per layer: X tokens (the paper's reference: 1000 steps x 512 x 1024 = 0.52 B)'."""
    if plan.tokens_per_layer is None:
        return None
    ratio = plan.tokens_per_layer / PAPER_TOKENS_PER_LAYER
    return (f"  warmup per layer: {plan.tokens_per_layer / 1e9:.3g} B tokens = {ratio:.3g} x the paper's reference "
            f"(T = 1000 steps x 512 sequences x 1024 tokens = {PAPER_TOKENS_PER_LAYER / 1e9:.2f} B tokens per layer)")


def alpha_plan(schedule: str, warmup_steps: Optional[float], num_layers: int,
               train_iters: Optional[int] = None, unit: str = "steps",
               tokens_per_layer: Optional[float] = None) -> AlphaPlan:
    """``unit="samples"``: ``warmup_steps`` is S and ``train_iters`` the run's --train-samples."""
    L = num_layers
    run_flag = "--train-samples" if unit == "samples" else "--train-iters"
    warmup_flag = "--prores-warmup-samples" if unit == "samples" else "--prores-warmup-steps"
    full = [layer_full_step(schedule, l, warmup_steps, L) for l in range(1, L + 1)]
    all_on = None if any(s is None for s in full) else max(full)
    warnings = []
    if needs_warmup_steps(schedule):
        end = all_on  # a time-dependent schedule turns every layer fully on at some step
        # Steps t = 0 .. train_iters-1 run; a layer whose alpha first hits 1 at t >= train_iters
        # never trains fully on.
        late = [l for l, s in enumerate(full, start=1) if train_iters and s >= train_iters]
        if late:
            where = f"{end:g} samples" if unit == "samples" else f"step {end:g}"
            warnings.append(
                f"ProRes warmup ends at {where} but {run_flag} is {train_iters}: "
                f"{len(late)} of {L} layers never reach alpha = 1 (layers {late[0]}..{late[-1]} "
                f"under '{schedule}'); lower {warmup_flag} below "
                f"{warmup_steps_from_total(schedule, train_iters, L):g} or train longer"
            )
        if unit == "steps" and warmup_steps < MIN_USEFUL_WARMUP_STEPS:
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
        unit=unit,
        tokens_per_layer=tokens_per_layer,
    )


def format_alpha_plan(plan: AlphaPlan, max_rows: int = 12) -> str:
    """A few 'layer -> step' lines (all of them for shallow models), then the warnings."""
    L = plan.num_layers
    if L <= max_rows:
        shown = list(range(1, L + 1))
    else:
        shown = sorted({1, 2, 3, *(round(L * k / 8) for k in range(1, 8)), L})
    samples = plan.unit == "samples"
    lines = [
        f"  schedule {plan.schedule}, {'S' if samples else 'T'} = "
        + (f"{plan.warmup_steps:g}" if plan.warmup_steps is not None else "-")
        + f" {plan.unit} per layer, L = {L}; every layer at alpha = 1 from "
        + ("consumed samples " if samples else "step ")
        + (f"{plan.all_on_step:g}" if plan.all_on_step is not None else "never (static schedule)")
        + (f" ({'--train-samples' if samples else '--train-iters'} {plan.train_iters})" if plan.train_iters else "")
    ]
    tokens = format_tokens(plan)
    if tokens:
        lines.append(tokens)
    cells = [
        f"layer {l}: " + (f"{plan.full_step[l - 1]:g}" if plan.full_step[l - 1] is not None else "never")
        for l in shown
    ]
    for i in range(0, len(cells), 6):
        lines.append("  " + " | ".join(cells[i:i + 6]))
    if len(shown) < L:
        lines.append(f"  ({L - len(shown)} more layers: --json lists every one)")
    return "\n".join(lines)
