"""Resuming a checkpoint with other ProRes settings: say what changed and how far alpha jumps.

Contract: ``resume_changes(args)`` reads the ProRes settings saved with the checkpoint Megatron is
about to resume (``--load``, its tracker or ``--ckpt-step``; none there means a fresh start and
returns None) and compares them with the run's: schedule (a checkpoint without ProRes counts as
``none``), T, ``--prores-arch`` and ``--prores-start-step``. It returns None when they agree, else a
warning that names each old and new value and the alpha of the layer whose alpha jumps most (and of
the deepest layer) at the resumed step, as the saved run would have had it and as this run will;
switching ProRes on for a checkpoint trained without it also names ``--prores-start-step
ITERATION``, which starts the warmup at the resume point (``settings_change`` is the same comparison
for a checkpoint already read). ``resume_check_hook(args)`` is the
post-wrap hook that prints it on global rank 0, once, before Megatron loads the checkpoint.

``vocab_padding_change(args, ckpt, vocab_size)``: Megatron pads the vocabulary to a multiple of
``--make-vocab-size-divisible-by`` x TP and loads a checkpoint padded to another size without a
word (the rows that do not match start from init: +0.68 loss after TP1 -> TP2 at vocabulary 128).
It returns the refusal text, naming both paddings and a ``--make-vocab-size-divisible-by`` that
reproduces the saved one; the hook raises it on every rank (rank 0 reads, then broadcasts), or,
with ``--prores-allow-vocab-padding-change``, prints it as a warning.
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
    return settings_change(ckpt.args, ckpt.iteration, ckpt.directory, args)


def settings_change(saved_args, saved_iteration, directory, args):
    """``resume_changes`` for a checkpoint already read: its arguments (``prores_*`` names), the
    iteration it holds and its directory; ``args`` is the resuming run's (``num_layers``,
    ``prores_*``, ``finetune``). The Megatron-Bridge checkpoint manager calls it too."""
    old, new = _settings(saved_args), _settings(args)
    if old == new:
        return None
    iteration = 0 if getattr(args, "finetune", False) else int(saved_iteration)
    L = args.num_layers
    names = ("--prores-schedule", "--prores-warmup-steps", "--prores-arch", "--prores-start-step")
    changed = [f"{flag} {_fmt(a)} -> {_fmt(b)}" for flag, a, b in zip(names, old, new) if a != b]
    before = alpha_table(old[0], prores_step(iteration, old[3]), old[1], L)
    after = alpha_table(new[0], prores_step(iteration, new[3]), new[1], L)
    worst = max(range(L), key=lambda i: (abs(after[i] - before[i]), i))
    jumps = [f"layer {worst + 1}: alpha {before[worst]:.4g} -> {after[worst]:.4g}"]
    if worst != L - 1:
        jumps.append(f"deepest layer {L}: alpha {before[L - 1]:.4g} -> {after[L - 1]:.4g}")
    text = (f"WARNING: ProRes settings differ from the checkpoint being resumed ({directory}, "
            f"iteration {iteration}): {'; '.join(changed)}. At the next step, {', '.join(jumps)} "
            "(the saved run's value -> this run's).")
    if old[0] == "none" and new[0] != "none" and new[3] == 0 and iteration > 0:
        text += (f" The checkpoint was trained without ProRes: pass --prores-start-step {iteration} to start "
                 "the warmup at the resume point (alpha(l, 0) there) instead of mid-schedule.")
    return text


def _divisor_for(padded: int, vocab: int, tp: int, prefer: int):
    """A --make-vocab-size-divisible-by d with ceil(vocab / (d tp)) d tp == padded (Megatron's
    padding rule), nearest to ``prefer`` (the saved multiple), or None."""
    fits = [d for d in range(1, padded // tp + 1)
            if padded % (d * tp) == 0 and -(-vocab // (d * tp)) * d * tp == padded]
    return min(fits, key=lambda d: (abs(d * tp - prefer), -d)) if fits else None


def vocab_padding_change(args, ckpt, vocab_size):
    """The refusal text when the run pads the vocabulary differently from the checkpoint, else None."""
    saved = getattr(ckpt.args, "padded_vocab_size", None)
    now = getattr(args, "padded_vocab_size", None)
    if saved is None or now is None or saved == now:
        return None
    s_div = getattr(ckpt.args, "make_vocab_size_divisible_by", None)
    s_tp = getattr(ckpt.args, "tensor_model_parallel_size", None)
    tp = args.tensor_model_parallel_size
    text = (f"the checkpoint being resumed ({ckpt.directory}) has its vocabulary padded to {saved} rows "
            f"(--make-vocab-size-divisible-by {s_div} x TP {s_tp}); this run pads the {vocab_size}-token "
            f"vocabulary to {now} (--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} x TP {tp}). "
            "Megatron would load it without a word, and the rows that do not match would start from init.")
    if vocab_size is not None:
        d = _divisor_for(saved, vocab_size, tp, (s_div or 1) * (s_tp or 1))
        text += (f" Pass --make-vocab-size-divisible-by {d} to keep the saved padding at TP {tp}." if d else
                 f" No --make-vocab-size-divisible-by gives {saved} rows at TP {tp}; convert the checkpoint.")
    return text + " (--prores-allow-vocab-padding-change resumes anyway, with this as a warning.)"


def _tokenizer_vocab_size(args):
    try:
        from megatron.training import get_tokenizer

        return get_tokenizer().vocab_size
    except Exception:  # no tokenizer built (a unit test, a custom entry point)
        return getattr(args, "vocab_size", None)


def resume_check_hook(args):
    """post_wrap_hook: print ``resume_changes(args)`` on global rank 0 (see module docstring)."""

    def hook(model_chunks):
        import torch

        distributed = torch.distributed.is_initialized()
        refusal = None
        if not distributed or torch.distributed.get_rank() == 0:
            try:
                message = resume_changes(args)
                ckpt = _resumed_checkpoint(args)
                if ckpt is not None:
                    refusal = vocab_padding_change(args, ckpt, _tokenizer_vocab_size(args))
            except Exception as err:  # only rank 0 reads: an error here must not leave the others hanging
                message = f"WARNING: ProRes could not compare its settings with the checkpoint's ({err!r})"
            if message:
                print(message, flush=True)
        if distributed and torch.distributed.get_world_size() > 1:
            box = [refusal]  # every rank runs this hook at the same point: a safe collective
            torch.distributed.broadcast_object_list(box, src=0)
            refusal = box[0]
        if refusal is not None:
            if getattr(args, "prores_allow_vocab_padding_change", False):
                if not distributed or torch.distributed.get_rank() == 0:
                    print(f"WARNING: {refusal}", flush=True)
            else:
                raise ValueError(f"refusing to resume: {refusal}")
        return model_chunks

    return hook
