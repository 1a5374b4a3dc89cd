"""``prores-megatron plan``: the alpha plan of a launch, as text (or JSON) and a heatmap PNG.

Contract: the configuration comes either from flags (``--num-layers``, the training run's own
``--prores-*`` flags, ``--train-iters``) or from a launch script's dry run (``--from-script PATH``:
the script runs with ``DRY_RUN=1 DRY_RUN_ARGS=--json``, which makes the repository's launch
scripts call ``python -m prores_megatron.training.dry_run`` instead of training, and its ``alpha_plan`` is
used; the script's environment variables such as ``TRAIN_ITERS`` apply). Prints, per layer, the
first step at which alpha = 1 and the warnings of ``alpha_plan`` (warmup longer than the run; T so
short that layers switch on within a few steps), and writes ``--png``. Validation, the plan and
its wording are those of ``arguments``/``alpha_plan``/``dry_run``; nothing is recomputed here.
"""

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from ..core.alpha_plan import AlphaPlan, alpha_plan, format_alpha_plan, warmup_tokens_per_layer
from ..training.arguments import ProResArgumentError, add_prores_args, validate_prores_args, warmup_length
from .alpha_figure import write_alpha_heatmap
from .usage import UsageError

PLAN_FLAGS = ("prores_schedule", "prores_warmup_steps", "prores_total_warmup_steps", "prores_warmup_samples")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("configuration (flags, or --from-script)")
    src.add_argument("--from-script", metavar="PATH",
                     help="a launch script with a DRY_RUN mode (examples/scripts/*.sh); it is run with "
                          "DRY_RUN=1 DRY_RUN_ARGS=--json and its environment (TRAIN_ITERS=..., etc.)")
    src.add_argument("--num-layers", type=int, help="L, the number of decoder layers")
    src.add_argument("--train-iters", type=int, help="the run's --train-iters (checks the warmup fits)")
    src.add_argument("--train-samples", type=int, help="the run's --train-samples (with --prores-warmup-samples)")
    src.add_argument("--global-batch-size", type=int, help="sequences per step: the warmup in tokens per layer")
    src.add_argument("--seq-length", type=int, help="tokens per sequence: the warmup in tokens per layer")
    add_prores_args(p)  # the training run's own --prores-* flags, same names and help
    for action in p._actions:  # argparse lists its actions only here
        # The other --prores-* flags are accepted, so a launch's flags can be pasted, but they do
        # not change the plan: keep them out of --help.
        if action.dest.startswith("prores_") and action.dest not in PLAN_FLAGS:
            action.help = argparse.SUPPRESS
    out = p.add_argument_group("output")
    out.add_argument("--png", default="alpha_plan.png", help="heatmap PNG to write (default: %(default)s)")
    out.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    out.add_argument("--all-layers", action="store_true", help="list every layer in the text output")


_FLAG_DESTS = ("num_layers", "train_iters", "train_samples", "global_batch_size", "seq_length",
               "prores_warmup_steps", "prores_total_warmup_steps", "prores_warmup_samples")


def plan_from_flags(args) -> tuple:
    if args.num_layers is None:
        raise UsageError("--num-layers is required (or give --from-script PATH)")
    if args.num_layers < 1:
        raise UsageError(f"--num-layers {args.num_layers} must be >= 1")
    if args.train_iters is not None and args.train_iters < 1:
        raise UsageError(f"--train-iters {args.train_iters} must be >= 1")
    # train_iters stays out of validate_prores_args: alpha_plan words the same warning per layer.
    ns = argparse.Namespace(**{**vars(args), "train_iters": None, "train_samples": None})  # normalised in place
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            validate_prores_args(ns)
        except ProResArgumentError as err:
            raise UsageError(str(err)) from None
    if not ns.prores_enabled:
        raise UsageError("--prores-schedule is required: ProRes is off without it (e.g. --prores-schedule linear)")
    T, unit, _ = warmup_length(ns)
    tokens = warmup_tokens_per_layer(T, unit, args.seq_length, args.global_batch_size)
    plan = alpha_plan(ns.prores_schedule, T, args.num_layers,
                      args.train_samples if unit == "samples" else args.train_iters, unit=unit, tokens_per_layer=tokens)
    return plan, list(dict.fromkeys([str(w.message) for w in caught] + plan.warnings))


def plan_from_script(script: str) -> tuple:
    path = Path(script)
    if not path.is_file():
        raise UsageError(f"--from-script {script}: no such file")
    if "DRY_RUN" not in path.read_text(errors="replace"):
        # Running a script without a dry-run mode would start the training itself.
        raise UsageError(f"--from-script {script}: the script has no DRY_RUN mode, so it cannot be "
                         "checked without launching it; give --num-layers and the --prores-* flags instead")
    env = dict(os.environ, DRY_RUN="1")
    env["DRY_RUN_ARGS"] = (env.get("DRY_RUN_ARGS", "") + " --json").strip()
    env.setdefault("PYTHON", sys.executable)  # this interpreter has the package; no venv rebuild
    env.setdefault("MASTER_ADDR", "plan-host")  # the plan needs no rendezvous; multi-node scripts refuse none
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = None
    if report is None or not report.get("ok"):
        reason = (report or {}).get("error") or proc.stderr.strip()[-2000:] or proc.stdout.strip()[-2000:]
        raise UsageError(f"--from-script {script}: the dry run failed (exit status {proc.returncode}): {reason}")
    plan = AlphaPlan(**report["alpha_plan"])
    return plan, list(dict.fromkeys(report.get("warnings", []) + plan.warnings))


def run(args) -> int:
    if args.from_script:
        given = [f"--{d.replace('_', '-')}" for d in _FLAG_DESTS if getattr(args, d) is not None]
        if given:
            raise UsageError(f"--from-script takes the configuration from the script; drop {', '.join(given)}")
        plan, warns = plan_from_script(args.from_script)
    else:
        plan, warns = plan_from_flags(args)
    png = write_alpha_heatmap(plan, args.png, label=Path(args.from_script).name if args.from_script else None)
    if args.json:
        print(json.dumps(dict(alpha_plan=plan.as_dict(), warnings=warns, png=str(png)), indent=1))
        return 0
    print("Alpha plan (first optimizer step at which a layer has alpha = 1):")
    print(format_alpha_plan(plan, max_rows=plan.num_layers if args.all_layers else 12))
    for w in warns:
        print(f"WARNING: {w}")
    print(f"heatmap: {png}")
    return 0
