"""ProRes command-line flags for Megatron-LM, and their validation.

Contract: ``add_prores_args(parser)`` is a Megatron ``extra_args_provider``; ``validate_prores_args(
args)`` runs right after Megatron parses, before any model is built, and either raises
``ProResArgumentError`` naming the flag and what to do, or normalises ``args`` in place:
``args.prores_schedule`` becomes the canonical name and ``args.prores_warmup_steps`` the per-layer T
(derived from ``--prores-total-warmup-steps`` when that was given). Plain argparse: no Megatron import.
"""

import argparse
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
        default="linear",
        help=f"alpha(l, t) schedule: {', '.join(SCHEDULES)} (the reference implementation's "
        "names are accepted too). 'none' is the plain architecture (alpha = 1).",
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
    group.add_argument("--prores-allow-vocab-padding-change", action="store_true",
                       help="Resume a checkpoint whose vocabulary was padded to another size (another "
                       "--make-vocab-size-divisible-by x TP) with a warning instead of a refusal; the "
                       "rows that do not match start from init.")
    return parser


def validate_prores_args(args) -> None:
    try:
        args.prores_schedule = canonical_schedule(args.prores_schedule)
    except ValueError as err:
        raise ProResArgumentError(f"--prores-schedule: {err}") from None
    per_layer, total = args.prores_warmup_steps, args.prores_total_warmup_steps
    if per_layer is not None and total is not None:
        raise ProResArgumentError(
            "--prores-warmup-steps and --prores-total-warmup-steps are mutually exclusive: give "
            "the per-layer T or the total T*L, not both"
        )
    for flag, value in (("--prores-warmup-steps", per_layer), ("--prores-total-warmup-steps", total)):
        if value is not None and not (value > 0 and value != float("inf")):
            raise ProResArgumentError(f"{flag}={value} must be a positive, finite number of steps")
    L = args.num_layers
    if args.prores_start_step < 0:
        raise ProResArgumentError(f"--prores-start-step={args.prores_start_step} must be >= 0 (an iteration)")
    _validate_arch(args)
    _validate_monitor(args)
    if needs_warmup_steps(args.prores_schedule):
        if per_layer is None and total is None:
            raise ProResArgumentError(
                f"--prores-schedule {args.prores_schedule} warms layers up over time and needs "
                "--prores-warmup-steps T (per layer; the paper uses 1000, 500 at >= 96 layers) "
                "or --prores-total-warmup-steps T*L"
            )
    elif per_layer is not None or total is not None:
        warnings.warn(
            f"--prores-schedule {args.prores_schedule} does not depend on the step; the warmup "
            "length given is ignored",
            stacklevel=2,
        )
    if total is not None:
        args.prores_warmup_steps = warmup_steps_from_total(args.prores_schedule, total, L)
    if needs_warmup_steps(args.prores_schedule):
        end = total_warmup_steps(args.prores_schedule, args.prores_warmup_steps, L)
        train_iters = getattr(args, "train_iters", None)
        if train_iters and end >= train_iters:
            warnings.warn(
                f"ProRes warmup ends at step {end:g} (schedule {args.prores_schedule}, T = "
                f"{args.prores_warmup_steps:g}, L = {L}) but --train-iters is {train_iters}: "
                f"the deepest layers never reach alpha = 1 in this run",
                stacklevel=2,
            )


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
    arch = f"arch {getattr(args, 'prores_arch', 'pre')}, init {getattr(args, 'prores_init', 'megatron')}"
    start = getattr(args, "prores_start_step", 0)
    if not needs_warmup_steps(args.prores_schedule):
        line = f"ProRes: {arch}, schedule {args.prores_schedule} (static), L = {args.num_layers}"
    else:
        end = total_warmup_steps(args.prores_schedule, args.prores_warmup_steps, args.num_layers)
        line = (
            f"ProRes: {arch}, schedule {args.prores_schedule}, T = {args.prores_warmup_steps:g} steps "
            f"per layer, L = {args.num_layers}, every layer at alpha = 1 from step {end:g}"
        )
        if start:
            line += f" (t = iteration - {start}: --prores-start-step {start}, alpha = 1 from iteration {end + start:g})"
    mtp = getattr(args, "mtp_num_layers", None)
    if mtp:
        line += (
            f"\nProRes: the {mtp} MTP layer(s) (--mtp-num-layers) are prediction heads after the trunk, not "
            "decoder layers 1..L: Megatron builds them from its stock Pre-LN spec, and ProRes leaves them "
            "unscaled (alpha = 1) and Pre-LN for every --prores-arch (docs/method.md §5.3)"
        )
    return line
