"""Resuming a checkpoint with other ProRes settings: say what changed and how far alpha jumps.

Contract: ``resume_changes(args)`` reads the ProRes settings saved with the checkpoint Megatron is
about to resume (``--load``, its tracker or ``--ckpt-step``; none there means a fresh start and
returns None) and compares them with the run's: schedule (a checkpoint without ProRes counts as
``none``), T, ``--prores-arch`` and ``--prores-start-step``. It returns None when they agree, else a
warning that names each old and new value and the alpha of the layer whose alpha jumps most (and of
the deepest layer) at the resumed step, as the saved run would have had it and as this run will;
switching ProRes on for a checkpoint trained without it also names ``--prores-start-step
ITERATION``, which starts the warmup at the resume point. ``resume_check_hook(args)`` is the
post-wrap hook that prints it on global rank 0, once, before Megatron loads the checkpoint.
Only the saved arguments are read (torch_dist: the common state; legacy: rank 0's file, mapped).
"""

from pathlib import Path

from ..checkpoint.base import CheckpointError
from ..checkpoint.reader import open_checkpoint
from ..core.schedules import alpha_table, canonical_schedule, needs_warmup_steps, prores_step


def _settings(ns):
    """(schedule, T, arch, start step) of a run's arguments; no ProRes flags is the plain model."""
    schedule = getattr(ns, "prores_schedule", None)
    schedule = "none" if schedule is None else canonical_schedule(schedule)
    T = getattr(ns, "prores_warmup_steps", None) if needs_warmup_steps(schedule) else None
    return schedule, T, getattr(ns, "prores_arch", None) or "pre", int(getattr(ns, "prores_start_step", 0) or 0)


def _fmt(value) -> str:
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _resumed_checkpoint(args):
    if not getattr(args, "load", None) or not Path(args.load).is_dir():
        return None
    path = Path(args.load)
    if getattr(args, "ckpt_step", None) is not None:
        path = path / f"iter_{int(args.ckpt_step):07d}"
    try:
        return open_checkpoint(path)
    except CheckpointError:
        return None  # nothing to resume (Megatron starts afresh), or Megatron's own load reports it


def resume_changes(args):
    """The warning text, or None (see module docstring)."""
    ckpt = _resumed_checkpoint(args)
    if ckpt is None:
        return None
    old, new = _settings(ckpt.args), _settings(args)
    if old == new:
        return None
    iteration = 0 if getattr(args, "finetune", False) else ckpt.iteration
    L = args.num_layers
    names = ("--prores-schedule", "--prores-warmup-steps", "--prores-arch", "--prores-start-step")
    changed = [f"{flag} {_fmt(a)} -> {_fmt(b)}" for flag, a, b in zip(names, old, new) if a != b]
    before = alpha_table(old[0], prores_step(iteration, old[3]), old[1], L)
    after = alpha_table(new[0], prores_step(iteration, new[3]), new[1], L)
    worst = max(range(L), key=lambda i: (abs(after[i] - before[i]), i))
    jumps = [f"layer {worst + 1}: alpha {before[worst]:.4g} -> {after[worst]:.4g}"]
    if worst != L - 1:
        jumps.append(f"deepest layer {L}: alpha {before[L - 1]:.4g} -> {after[L - 1]:.4g}")
    text = (f"WARNING: ProRes settings differ from the checkpoint being resumed ({ckpt.directory}, "
            f"iteration {iteration}): {'; '.join(changed)}. At the next step, {', '.join(jumps)} "
            "(the saved run's value -> this run's).")
    if old[0] == "none" and new[0] != "none" and new[3] == 0 and iteration > 0:
        text += (f" The checkpoint was trained without ProRes: pass --prores-start-step {iteration} to start "
                 "the warmup at the resume point (alpha(l, 0) there) instead of mid-schedule.")
    return text


def resume_check_hook(args):
    """post_wrap_hook: print ``resume_changes(args)`` on global rank 0 (see module docstring)."""

    def hook(model_chunks):
        import torch

        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            try:
                message = resume_changes(args)
            except Exception as err:  # only rank 0 reads: an error here must not leave the others hanging
                message = f"WARNING: ProRes could not compare its settings with the checkpoint's ({err!r})"
            if message:
                print(message, flush=True)
        return model_chunks

    return hook
