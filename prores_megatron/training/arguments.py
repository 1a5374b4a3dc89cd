"""ProRes command-line flags for Megatron-LM, and their validation.

Contract: ``add_prores_args(parser)`` is a Megatron ``extra_args_provider``; ``validate_prores_args(
args)`` runs right after Megatron parses, before any model is built, and either raises
``ProResArgumentError`` naming the flag and what to do, or normalises ``args`` in place:
``args.prores_schedule`` becomes the canonical name and ``args.prores_warmup_steps`` the per-layer T
(derived from ``--prores-total-warmup-steps`` when that was given), or ``args.prores_warmup_samples``
the per-layer S of a sample-counted warmup; ``args.prores_enabled`` says whether ProRes is on.

ProRes is opt-in (docs/usage.md, "Training with ProRes"): without ``--prores-schedule`` (and with no other ``--prores-*``
flag) ``args.prores_enabled`` is False, ``args.prores_schedule`` stays None and the run is stock
Megatron-LM; any other ``--prores-*`` flag without ``--prores-schedule`` is refused, naming it.
Fine-tuning (``--finetune``, ``--pretrained-checkpoint``, a release checkpoint: Megatron-LM starts
those at iteration 0) with a schedule that changes over time is refused unless
``--prores-rewarm-pretrained`` asks for it. Plain argparse: no Megatron import.
"""

import argparse
import os
import warnings

from ..core.depth_scaling import ARCHS, INITS
from ..core.schedules import (
    SCHEDULES,
    canonical_schedule,
    needs_warmup_steps,
    total_warmup_steps,
    warmup_steps_from_total,
)


class ProResArgumentError(ValueError):
    """A ProRes flag is missing, malformed or inconsistent."""


def add_prores_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="ProRes (progressive residual warmup)")
    group.add_argument(
        "--prores-schedule",
        type=str,
        default=None,
        help=f"Turns ProRes on (default: off, the stock Megatron-LM model; every other --prores-* flag "
        f"needs this one). alpha(l, t) schedule: {', '.join(SCHEDULES)} (the reference "
        "implementation's names are accepted too). 'none' is the plain architecture (alpha = 1) with "
        "ProRes's residual modules, monitor and checks.",
    )
    group.add_argument(
        "--prores-warmup-steps",
        type=float,
        default=None,
        help="Per-layer warmup length T in optimizer steps (the paper's T; may be fractional). "
        "Layer l reaches alpha = 1 at step T*l under 'linear'.",
    )
    group.add_argument(
        "--prores-total-warmup-steps",
        type=float,
        default=None,
        help="Total warmup T*L (T for 'equal'): the step at which every layer has reached "
        "alpha = 1, the reference implementation's convention. Excludes --prores-warmup-steps.",
    )
    group.add_argument(
        "--prores-warmup-samples",
        type=float,
        default=None,
        help="Per-layer warmup length S in samples (like --lr-warmup-samples): alpha(l) = min(s / (S*l), "
        "1), s = samples consumed by completed optimizer steps (Megatron's consumed_train_samples), "
        "so it follows --rampup-batch-size exactly. Excludes --prores-warmup-steps.",
    )
    group.add_argument(
        "--prores-rewarm-pretrained",
        action="store_true",
        help="Fine-tuning (--finetune, --pretrained-checkpoint, a release checkpoint) starts at "
        "iteration 0, where a time-dependent schedule has alpha = 0: the pretrained trunk becomes an "
        "identity and re-warms. Refused unless this flag says it is meant (else: --prores-schedule none).",
    )
    group.add_argument(
        "--prores-start-step",
        type=int,
        default=0,
        help="Iteration N at which the warmup starts: alpha uses t = iteration - N (alpha(l, 0) "
        "before it). Default 0. Set it to the checkpoint's iteration to switch ProRes on when "
        "resuming a run trained without it.",
    )
    group.add_argument(
        "--prores-arch",
        choices=ARCHS,
        default="pre",
        help="Residual architecture: pre (Pre-LN, Llama), post (Post-LN), sandwich (Sandwich-LN), "
        "deepnorm (DeepNorm, skip x (2L)^(1/4)), lns (LayerNorm Scaling, pre-norm / sqrt(l)). "
        "The model's final norm is kept for every arch, as in the paper's models.",
    )
    group.add_argument(
        "--prores-init",
        choices=INITS,
        default="megatron",
        help="Weight init: megatron (megatron-core's default: normal, output layers "
        "std/sqrt(2L)), plain (truncated normal, --init-method-std, no depth scaling), scaled "
        "(std/sqrt(2L) on attention-output and MLP-down), ds (std/sqrt(2l) on those of layer l), "
        "deepnorm (Xavier-normal, gain (8L)^(-1/4) on v/o/MLP, 1 on q/k).",
    )
    group.add_argument(
        "--prores-monitor-interval",
        type=int,
        default=0,
        help="Every N iterations, log per-layer alpha, branch and residual-stream RMS and "
        "gradient norms (0: off). Loss and grad norm are then recorded every iteration, with "
        "online spike scores.",
    )
    group.add_argument(
        "--prores-monitor-file",
        type=str,
        default=None,
        help="JSONL file for the monitor (default: prores_monitor.jsonl in --save, else in "
        "--tensorboard-dir, else in the working directory).",
    )
    group.add_argument("--prores-spike-window", type=int, default=1000,
                       help="Spike score: trailing window in steps (the paper: 1000).")
    group.add_argument("--prores-spike-threshold", type=float, default=7.0,
                       help="Spike score: deviation from the trailing mean, in std (the paper: 7).")
    group.add_argument("--prores-spike-min-history", type=int, default=100,
                       help="Spike score: fewest trailing points needed to judge a step.")
    group.add_argument("--prores-log-interval", type=int, default=None,
                       help="Log alpha every N iterations (default: --log-interval), only while some layer "
                       "is still warming up; then one line says the warmup is complete.")
    group.add_argument("--prores-log-alpha-per-layer", action="store_true",
                       help="Also write alpha of every layer to TensorBoard/W&B (prores/alpha/layer_NNN); "
                       "by default only the summary: min, mean and max alpha and layers warming.")
    group.add_argument("--prores-trust-checkpoint", action="store_true",
                       help="Load checkpoints (--load, --pretrained-checkpoint) without ProRes's pickle "
                       "allow-list, as stock Megatron-LM does: only for checkpoints of trusted origin.")
    group.add_argument("--prores-allow-vocab-padding-change", action="store_true",
                       help="Resume a checkpoint whose vocabulary was padded to another size (another "
                       "--make-vocab-size-divisible-by x TP) with a warning instead of a refusal; the "
                       "rows that do not match start from init.")
    return parser


def prores_flags_given(args, parser=None) -> list:
    """The ``--prores-*`` flags whose value differs from the default, by flag name."""
    defaults = _DEFAULTS if parser is None else {a.dest: a.default for a in parser._actions}
    return [f"--{dest.replace('_', '-')}" for dest, default in defaults.items()
            if dest.startswith("prores_") and getattr(args, dest, default) != default]


_DEFAULTS = {a.dest: a.default for a in add_prores_args(argparse.ArgumentParser(add_help=False))._actions}


def validate_prores_args(args) -> None:
    if getattr(args, "prores_schedule", None) is None:
        others = [f for f in prores_flags_given(args) if f != "--prores-schedule"]
        if others:
            raise ProResArgumentError(
                f"{', '.join(others)} given without --prores-schedule: ProRes is off unless "
                "--prores-schedule names a schedule (e.g. --prores-schedule linear --prores-warmup-steps "
                "1000; --prores-schedule none for the plain model with ProRes's monitor and checks)")
        args.prores_enabled = False
        args.prores_warmup_samples = getattr(args, "prores_warmup_samples", None)
        return
    args.prores_enabled = True
    try:
        args.prores_schedule = canonical_schedule(args.prores_schedule)
    except ValueError as err:
        raise ProResArgumentError(f"--prores-schedule: {err}") from None
    per_layer, total = args.prores_warmup_steps, args.prores_total_warmup_steps
    samples = getattr(args, "prores_warmup_samples", None)
    args.prores_warmup_samples = samples
    given = [flag for flag, value in (("--prores-warmup-steps", per_layer), ("--prores-total-warmup-steps", total),
                                      ("--prores-warmup-samples", samples)) if value is not None]
    if len(given) > 1:
        raise ProResArgumentError(
            f"{' and '.join(given)} are mutually exclusive: give one warmup length (the per-layer T in "
            "steps, the total T*L in steps, or the per-layer S in samples)"
        )
    for flag, value in (("--prores-warmup-steps", per_layer), ("--prores-total-warmup-steps", total),
                        ("--prores-warmup-samples", samples)):
        if value is not None and not (value > 0 and value != float("inf")):
            unit = "samples" if "samples" in flag else "steps"
            raise ProResArgumentError(f"{flag}={value} must be a positive, finite number of {unit}")
    if samples is not None and getattr(args, "prores_start_step", 0):
        raise ProResArgumentError(
            "--prores-start-step counts iterations and --prores-warmup-samples counts samples: with a "
            "sample-counted warmup drop --prores-start-step (switching ProRes on mid-run is step-counted only)")
    L = args.num_layers
    if args.prores_start_step < 0:
        raise ProResArgumentError(f"--prores-start-step={args.prores_start_step} must be >= 0 (an iteration)")
    _validate_arch(args)
    _validate_monitor(args)
    _validate_logging(args)
    if needs_warmup_steps(args.prores_schedule):
        if not given:
            raise ProResArgumentError(
                f"--prores-schedule {args.prores_schedule} warms layers up over time and needs "
                "--prores-warmup-steps T (per layer; the paper uses 1000, 500 at >= 96 layers), "
                "--prores-total-warmup-steps T*L or --prores-warmup-samples S (per layer, in samples)"
            )
        _refuse_finetuning(args)
    elif given:
        warnings.warn(
            f"--prores-schedule {args.prores_schedule} does not depend on the step; the warmup "
            "length given is ignored",
            stacklevel=2,
        )
    if total is not None:
        args.prores_warmup_steps = warmup_steps_from_total(args.prores_schedule, total, L)
    if needs_warmup_steps(args.prores_schedule) and samples is not None:
        end = total_warmup_steps(args.prores_schedule, samples, L)
        train_samples = getattr(args, "train_samples", None)
        if train_samples and end >= train_samples:
            warnings.warn(
                f"ProRes warmup ends at {end:g} samples (schedule {args.prores_schedule}, S = {samples:g} "
                f"samples per layer, L = {L}) but --train-samples is {train_samples}: the deepest layers "
                "never reach alpha = 1 in this run",
                stacklevel=2,
            )
    elif needs_warmup_steps(args.prores_schedule):
        end = total_warmup_steps(args.prores_schedule, args.prores_warmup_steps, L)
        train_iters = getattr(args, "train_iters", None)
        if train_iters and end >= train_iters:
            warnings.warn(
                f"ProRes warmup ends at step {end:g} (schedule {args.prores_schedule}, T = "
                f"{args.prores_warmup_steps:g}, L = {L}) but --train-iters is {train_iters}: "
                f"the deepest layers never reach alpha = 1 in this run",
                stacklevel=2,
            )


def warmup_length(args):
    """(length per layer, unit, the count t it is compared with) of a validated run: (T, "steps",
    "step t") or (S, "samples", "consumed samples s"); (None, "steps", "step t") for static schedules."""
    if getattr(args, "prores_warmup_samples", None) is not None:
        return args.prores_warmup_samples, "samples", "consumed samples s"
    return getattr(args, "prores_warmup_steps", None), "steps", "step t"


def loads_trained_model_at_iteration_zero(args):
    """The flags that make Megatron-LM load a trained model and start at iteration 0, as a phrase, or
    None: ``--finetune`` with a checkpoint to load, ``--pretrained-checkpoint`` while ``--load``
    holds no checkpoint (Megatron-LM's load_checkpoint then loads it with finetune set), and a
    release checkpoint (its ``latest_checkpointed_iteration.txt`` says ``release``)."""
    load, pretrained = getattr(args, "load", None), getattr(args, "pretrained_checkpoint", None)
    load_tracker = _tracker(load)
    if getattr(args, "finetune", False) and (load or pretrained):
        return f"--finetune (loading {load or pretrained})"
    if pretrained and load_tracker is None:
        return f"--pretrained-checkpoint {pretrained} (no checkpoint in --load {load or '(unset)'})"
    if load_tracker == "release":
        return f"a release checkpoint (--load {load}: latest_checkpointed_iteration.txt says 'release')"
    return None


def _tracker(directory):
    """The stripped text of ``directory``'s latest_checkpointed_iteration.txt, or None."""
    if not directory:
        return None
    path = os.path.join(directory, "latest_checkpointed_iteration.txt")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _refuse_finetuning(args) -> None:
    how = loads_trained_model_at_iteration_zero(args)
    if how is None or getattr(args, "prores_rewarm_pretrained", False):
        return
    raise ProResArgumentError(
        f"--prores-schedule {args.prores_schedule} with {how}: Megatron-LM starts that run at iteration 0, "
        "where alpha(l, 0) = 0 turns every pretrained layer into an identity, which then re-warms over "
        "T*L steps. For fine-tuning use --prores-schedule none (or drop the --prores-* flags); to "
        "re-warm the pretrained model on purpose pass --prores-rewarm-pretrained "
        "(flags that load at iteration 0: --finetune, --pretrained-checkpoint, a release checkpoint)")


# Megatron-LM flags whose layers only Pre-LN (the stock layer) supports (docs/megatron.md §2,
# "What each architecture supports"): (args attribute, flag, why the other architectures cannot).
_PRE_ONLY_FLAGS = (
    ("num_experts", "--num-experts", "supports dense MLPs only"),
    ("use_transformer_engine_op_fuser", "--use-transformer-engine-op-fuser",
     "moves or adds norms, which the TE op fuser's fused MLP cannot express"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path", "needs one layer spec for every layer"),
    ("heterogeneous_layers_config_encoded_json", "--heterogeneous-layers-config-encoded-json",
     "needs one layer spec for every layer"),
    ("use_kitchen", "--use-kitchen", "builds its norms from TE or local classes, not kitchen's"),
    ("use_grouped_gemm_for_dense_mlp", "--use-grouped-gemm-for-dense-mlp", "needs the plain MLP's fc1 to un-fuse its norm"),
)


def _validate_arch(args) -> None:
    """Combinations ProRes or an architecture cannot express, named by their flags."""
    impl = getattr(args, "transformer_impl", "local")
    if impl not in ("local", "transformer_engine"):
        raise ProResArgumentError(
            f"--transformer-impl {impl}: ProRes supports 'local' and 'transformer_engine' (the "
            "inference-optimized layer adds residuals inside its linears, where alpha cannot reach)"
        )
    if getattr(args, "spec", None) is not None:
        raise ProResArgumentError(
            "--spec replaces the layer spec; with ProRes wrap your spec with "
            "prores_megatron.with_prores(spec, schedule, warmup_steps) and drop --spec"
        )
    if getattr(args, "multi_latent_attention", False) or getattr(args, "experimental_attention_variant", None):
        raise ProResArgumentError(
            "ProRes is tested with standard (GQA/MHA) attention only: drop --multi-latent-attention "
            "/ --experimental-attention-variant"
        )
    if getattr(args, "sequence_parallel", False) and impl == "local":
        raise ProResArgumentError(
            "--sequence-parallel needs norms that can be sharded over the sequence, which the "
            "local (torch) norms cannot: use --transformer-impl transformer_engine, or drop "
            "--sequence-parallel"
        )
    if getattr(args, "prores_init", "megatron") != "megatron" and getattr(args, "mtp_num_layers", None):
        raise ProResArgumentError(
            f"--prores-init {args.prores_init} re-draws decoder layers 1..L and the embedding/output layer, "
            "but has no rules for the MTP layers (--mtp-num-layers): use --prores-init megatron with MTP"
        )
    if args.prores_arch == "pre":
        return
    for attr, flag, why in _PRE_ONLY_FLAGS:
        if getattr(args, attr, None):
            raise ProResArgumentError(
                f"--prores-arch {args.prores_arch} {why}: drop {flag} or use --prores-arch pre"
            )


def _validate_logging(args) -> None:
    interval = getattr(args, "prores_log_interval", None)
    if interval is not None and interval < 1:
        raise ProResArgumentError(f"--prores-log-interval={interval} must be >= 1 (iterations)")


def _validate_monitor(args) -> None:
    for flag, attr, low in (
        ("--prores-monitor-interval", "prores_monitor_interval", 0),
        ("--prores-spike-window", "prores_spike_window", 1),
        ("--prores-spike-min-history", "prores_spike_min_history", 1),
    ):
        value = getattr(args, attr, low)
        if value < low:
            raise ProResArgumentError(f"{flag}={value} must be >= {low}")
    if getattr(args, "prores_spike_min_history", 1) > getattr(args, "prores_spike_window", 1000):
        raise ProResArgumentError(
            f"--prores-spike-min-history={args.prores_spike_min_history} must be <= "
            f"--prores-spike-window={args.prores_spike_window}"
        )
    graphs = getattr(args, "cuda_graph_impl", "none") or "none"
    if getattr(args, "prores_monitor_interval", 0) > 0 and graphs != "none":
        raise ProResArgumentError(
            f"--prores-monitor-interval with --cuda-graph-impl {graphs}: a replayed graph skips the monitor's "
            "recorders, so its activation statistics would be empty; monitor a run without CUDA graphs"
        )
    if not getattr(args, "prores_spike_threshold", 7.0) > 0:
        raise ProResArgumentError(f"--prores-spike-threshold={args.prores_spike_threshold} must be > 0")


def describe_prores_args(args) -> str:
    """The start-up lines for the training log: the settings, and what ProRes leaves unscaled."""
    if not getattr(args, "prores_enabled", args.prores_schedule is not None):
        return "ProRes: off (no --prores-schedule): the stock Megatron-LM model and loop"
    arch = f"arch {getattr(args, 'prores_arch', 'pre')}, init {getattr(args, 'prores_init', 'megatron')}"
    start = getattr(args, "prores_start_step", 0)
    samples = getattr(args, "prores_warmup_samples", None)
    if not needs_warmup_steps(args.prores_schedule):
        line = f"ProRes: {arch}, schedule {args.prores_schedule} (static), L = {args.num_layers}"
    elif samples is not None:
        end = total_warmup_steps(args.prores_schedule, samples, args.num_layers)
        line = (
            f"ProRes: {arch}, schedule {args.prores_schedule}, S = {samples:g} samples per layer "
            f"(s = consumed samples of completed steps), L = {args.num_layers}, every layer at alpha = 1 "
            f"from {end:g} consumed samples"
        )
    else:
        end = total_warmup_steps(args.prores_schedule, args.prores_warmup_steps, args.num_layers)
        line = (
            f"ProRes: {arch}, schedule {args.prores_schedule}, T = {args.prores_warmup_steps:g} steps "
            f"per layer, L = {args.num_layers}, every layer at alpha = 1 from step {end:g}"
        )
        if start:
            line += f" (t = iteration - {start}: --prores-start-step {start}, alpha = 1 from iteration {end + start:g})"
    if getattr(args, "prores_rewarm_pretrained", False) and loads_trained_model_at_iteration_zero(args):
        line += ("\nProRes: --prores-rewarm-pretrained: the pretrained model starts at alpha(l, 0) and re-warms "
                 "(its layers are identities at the first step)")
    if getattr(args, "prores_trust_checkpoint", False):
        line += ("\nWARNING: ProRes: --prores-trust-checkpoint: checkpoints are unpickled WITHOUT the allow-list; "
                 "a crafted checkpoint can run code on every rank. Use it only for checkpoints of trusted origin")
    mtp = getattr(args, "mtp_num_layers", None)
    if mtp:
        line += (
            f"\nProRes: the {mtp} MTP layer(s) (--mtp-num-layers) are prediction heads after the trunk, not "
            "decoder layers 1..L: Megatron builds them from its stock Pre-LN spec, and ProRes leaves them "
            "unscaled (alpha = 1) and Pre-LN for every --prores-arch (docs/method.md §5.3)"
        )
    return line
