"""GPU-free dry run of a ProRes launch: ``python -m prores_megatron.training.dry_run [--dry-run-*] <flags>``.

Contract: takes exactly the flags ``prores_megatron.training.pretrain_gpt`` takes, plus ``--dry-run-*`` flags
for the launch (world size, nodes, launcher) and ``--json``. Without a GPU, process group or data it
1. parses them with Megatron-LM's own parser plus ``add_prores_args``, for the given world size;
2. refuses inconsistent pipeline splits with a message naming the flags (``pipeline_layout``);
3. runs Megatron-LM's ``validate_args``, then ``validate_prores_args`` and the entry point's own
   checks, then builds the megatron-core ``TransformerConfig`` the run would build (its checks too);
4. reports the layer -> (pipeline rank, virtual chunk) table from megatron-core's own layer
   arithmetic, cross-checked to cover layers 1..L exactly once; the alpha plan; the parameter count
   (total and per pipeline rank); and the exact torchrun command.
Exit status 0 with the report on stdout (text, or JSON with ``--json``); 2 with
``prores_megatron.training.dry_run: error: ...`` on stderr when the configuration is refused. Megatron's own
log goes to stderr.

What stands in for the GPU (and is listed under "assumptions" in the report): the device
architecture Megatron-LM queries for TP/CP > 1 (``--dry-run-gpu-arch``, default 9 = Hopper), and,
when Transformer Engine is not importable here, TE's fused-RoPE kernel check.
"""

import argparse
import contextlib
import copy
import json
import os
import shlex
import sys
import warnings

ENTRY_MODULE = "prores_megatron.training.pretrain_gpt"


class DryRunError(ValueError):
    """The configuration would not launch; the message names the flags."""


def _dry_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prores_megatron.training.dry_run", add_help=False, allow_abbrev=False)
    g = p.add_argument_group("dry run (everything else goes to Megatron-LM and ProRes)")
    g.add_argument("--dry-run-help", action="help", help="show the dry-run flags and exit")
    g.add_argument("--dry-run-world-size", type=int, default=None,
                   help="total ranks (default: nnodes x nproc-per-node, else $WORLD_SIZE, else 1)")
    g.add_argument("--dry-run-nnodes", type=int, default=None, help="torchrun --nnodes")
    g.add_argument("--dry-run-nproc-per-node", type=int, default=None, help="torchrun --nproc_per_node")
    g.add_argument("--dry-run-node-rank", type=int, default=0, help="torchrun --node_rank")
    g.add_argument("--dry-run-master-addr", default="localhost", help="torchrun --master_addr")
    g.add_argument("--dry-run-master-port", type=int, default=6000, help="torchrun --master_port")
    g.add_argument("--dry-run-launcher", default="torchrun",
                   help="the launcher command, shell-quoted (e.g. 'python -m torch.distributed.run')")
    g.add_argument("--dry-run-outer-launcher", default="",
                   help="what starts the launcher on every node, shell-quoted (e.g. 'srun ...'), reported")
    g.add_argument("--dry-run-gpu-arch", type=int, default=9,
                   help="compute-capability major of the target GPUs (9 = Hopper, 10 = Blackwell); "
                        "Megatron-LM's checks for TP/CP > 1 depend on it")
    g.add_argument("--dry-run-vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary size, used when the tokenizer cannot be built "
                        "here (its file lives on the cluster)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _launch(dry) -> dict:
    """World size and torchrun geometry; conflicting flags are refused by name."""
    for flag, value in (("--dry-run-world-size", dry.dry_run_world_size),
                        ("--dry-run-nnodes", dry.dry_run_nnodes),
                        ("--dry-run-nproc-per-node", dry.dry_run_nproc_per_node)):
        if value is not None and value < 1:
            raise DryRunError(f"{flag} {value} must be >= 1")
    nnodes, nproc = dry.dry_run_nnodes, dry.dry_run_nproc_per_node
    if (nnodes is None) != (nproc is None):
        raise DryRunError("give --dry-run-nnodes and --dry-run-nproc-per-node together")
    world = dry.dry_run_world_size
    if nnodes is not None:
        if world is not None and world != nnodes * nproc:
            raise DryRunError(
                f"--dry-run-world-size {world} != --dry-run-nnodes {nnodes} x "
                f"--dry-run-nproc-per-node {nproc}"
            )
        world = nnodes * nproc
    if world is None:
        env = os.environ.get("WORLD_SIZE", "1")
        if not env.isdigit() or int(env) < 1:
            raise DryRunError(f"WORLD_SIZE={env!r} in the environment is not a positive integer")
        world = int(env)
    if nnodes is None:
        nnodes, nproc = 1, world
    if not 0 <= dry.dry_run_node_rank < nnodes:
        raise DryRunError(f"--dry-run-node-rank {dry.dry_run_node_rank} is not in 0..{nnodes - 1}")
    if nnodes > 1 and dry.dry_run_master_addr.strip().lower() in LOCAL_ADDRESSES:
        raise DryRunError(
            f"MASTER_ADDR={dry.dry_run_master_addr or '(unset)'} with {nnodes} nodes: every node but the "
            "first would wait for a rendezvous on itself and hang. Set MASTER_ADDR to the first node's "
            "hostname or address (under SLURM the launch scripts take it from SLURM_JOB_NODELIST)"
        )
    return dict(world_size=world, nnodes=nnodes, nproc_per_node=nproc)


LOCAL_ADDRESSES = ("", "localhost", "127.0.0.1", "::1", "0.0.0.0")


def _versions() -> dict:
    """torch, CUDA, megatron-core and Transformer Engine of the interpreter running the dry run (the
    launch scripts run the job with the same one), without importing TE (it needs a GPU)."""
    from importlib import metadata

    import torch

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    te = next((v for v in (dist("transformer_engine"), dist("transformer-engine"),
                           dist("transformer_engine_torch")) if v), None)
    return dict(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
                megatron_core=dist("megatron-core") or dist("megatron_core"), transformer_engine=te,
                interpreter=sys.executable)


@contextlib.contextmanager
def _assumed_gpu_arch(major: int):
    """Answer Megatron-LM's device queries for a GPU of compute capability ``major`` (no CUDA here).

    validate_args calls get_device_arch_version() for TP/CP > 1 (CUDA_DEVICE_MAX_CONNECTIONS rule,
    Blackwell stream priorities) and torch.cuda.get_device_capability() for --moe-grouped-gemm.
    Both are patched only inside this block and restored after; a missing target fails loudly.
    """
    import megatron.training.arguments as mta
    import torch

    targets = [(mta, "get_device_arch_version", lambda: major),
               (torch.cuda, "get_device_capability", lambda device=None: (major, 0))]
    for module, attr, _ in targets:
        if not hasattr(module, attr):
            raise RuntimeError(f"prores_megatron.training.dry_run: {module.__name__}.{attr} no longer exists; "
                               "update _assumed_gpu_arch for this Megatron-LM version")
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in targets]
    try:
        for module, attr, new in targets:
            setattr(module, attr, new)
        yield
    finally:
        for module, attr, old in saved:
            setattr(module, attr, old)


def _megatron_validation(megatron_argv, world_size: int, gpu_arch: int, caught: list):
    """Megatron-LM's parse_args + validate_args, then ProRes's; returns the validated args."""
    from megatron.training.arguments import parse_args, validate_args

    from .arguments import ProResArgumentError, add_prores_args, validate_prores_args
    from .pipeline_layout import PipelineLayoutError, check_pipeline_flags

    saved_argv = sys.argv
    sys.argv = [ENTRY_MODULE, *megatron_argv]  # parse_args reads sys.argv
    try:
        args = parse_args(extra_args_provider=add_prores_args)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            raise
        raise DryRunError("Megatron-LM's argument parser refused the flags (its message is above)") from None
    finally:
        sys.argv = saved_argv
    args.world_size, args.rank = world_size, 0  # parse_args took them from $WORLD_SIZE / $RANK
    if args.yaml_cfg is not None:
        raise DryRunError("--yaml-cfg: the dry run checks flag-based configurations only")
    try:
        check_pipeline_flags(args)
        model_size = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                      * args.context_parallel_size)
        if world_size % model_size:
            raise DryRunError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"{args.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{args.pipeline_model_parallel_size} x --context-parallel-size "
                f"{args.context_parallel_size} = {model_size}"
            )
    except PipelineLayoutError as err:
        raise DryRunError(str(err)) from None
    try:
        with _assumed_gpu_arch(gpu_arch):
            validate_args(args)
    except (AssertionError, ValueError, RuntimeError) as err:
        raise DryRunError(f"Megatron-LM's validate_args refused the flags: {err}") from None
    with warnings.catch_warnings(record=True) as record:  # ProRes's warnings go into the report
        warnings.simplefilter("always")
        try:
            validate_prores_args(args)
        except ProResArgumentError as err:
            raise DryRunError(str(err)) from None
    caught.extend(str(w.message) for w in record)
    return args


def _vocab(args, dry, notes: list):
    """Padded vocabulary size as Megatron-LM computes it; None (with a note) when unknowable here."""
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    try:
        from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

        tokenizer = build_tokenizer(args)  # sets args.padded_vocab_size like the real run
        if dry.dry_run_vocab_size is not None and dry.dry_run_vocab_size != tokenizer.vocab_size:
            notes.append(f"--dry-run-vocab-size {dry.dry_run_vocab_size} ignored: the tokenizer "
                         f"has {tokenizer.vocab_size} tokens")
        return dict(source=f"{args.tokenizer_type}", vocab_size=tokenizer.vocab_size,
                    padded_vocab_size=args.padded_vocab_size)
    except Exception as err:  # any tokenizer's missing file or library; reported, not fatal
        reason = f"{type(err).__name__}: {err}"
    if dry.dry_run_vocab_size is None:
        notes.append(f"tokenizer not buildable here ({reason}); pass --dry-run-vocab-size N "
                     "for the parameter count")
        return dict(source=None, vocab_size=None, padded_vocab_size=None)
    padded = calculate_padded_vocab_size(dry.dry_run_vocab_size, args.make_vocab_size_divisible_by,
                                         args.tensor_model_parallel_size, logging_enabled=False)
    notes.append(f"tokenizer not buildable here ({reason}); vocabulary from --dry-run-vocab-size")
    return dict(source="--dry-run-vocab-size", vocab_size=dry.dry_run_vocab_size, padded_vocab_size=padded)


def _transformer_config(args, assumptions: list):
    """The TransformerConfig the run builds (core_transformer_config_from_args, its checks included)."""
    from megatron.training.arguments import core_transformer_config_from_args

    from ..core.compat import have_transformer_engine

    cfg_args = copy.copy(args)
    if getattr(cfg_args, "apply_rope_fusion", False) and not have_transformer_engine():
        # TransformerConfig asks TE for its fused-RoPE kernel, a property of the GPU machine's
        # install, not of the flags; the layer split does not depend on it.
        cfg_args.apply_rope_fusion = False
        assumptions.append("rope fusion (on by default) needs Transformer Engine on the GPU "
                           "machine; not checked here")
    try:
        return core_transformer_config_from_args(cfg_args)
    except (AssertionError, ValueError) as err:
        raise DryRunError(f"megatron-core's TransformerConfig refused the flags: {err}") from None


def _memory_estimate(args, notes: list):
    """Megatron-LM's own theoretical memory per GPU (what it prints at startup), in MB."""
    from megatron.training.theoretical_memory_usage import (
        compute_activation_memory,
        compute_activation_memory_without_sp,
        compute_weight_and_optimizer_memory,
    )

    if args.padded_vocab_size is None:
        return None
    micro_batches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    try:
        weights = compute_weight_and_optimizer_memory(args) / 2**20
        # The same choice as report_theoretical_memory (training.py calls it after the first step).
        if args.sequence_parallel and args.recompute_granularity == "selective":
            activations = compute_activation_memory(args, num_microbatches=micro_batches) / 2**20
        else:
            activations = compute_activation_memory_without_sp(args, num_microbatches=micro_batches) / 2**20
    except Exception as err:  # the estimator does not model every option; reported, not fatal
        notes.append(f"Megatron-LM's memory estimate unavailable: {type(err).__name__}: {err}")
        return None
    return dict(weight_and_optimizer_mb=round(weights), activation_mb=round(activations),
                total_mb=round(weights + activations))


def _plan(args, notes: list):
    """The alpha plan in the run's unit (steps, or samples with --prores-warmup-samples), checked
    against --train-iters / --train-samples, with the warmup per layer in tokens."""
    from ..core.alpha_plan import alpha_plan, warmup_tokens_per_layer
    from .arguments import warmup_length

    if not args.prores_enabled:
        notes.append("ProRes off (no --prores-schedule): the stock Megatron-LM model")
        return alpha_plan("none", None, args.num_layers)
    T, unit, _ = warmup_length(args)
    length = args.train_samples if unit == "samples" else args.train_iters
    # The batch that T's steps hold: --global-batch-size (under --step-batch-size-schedule, its last value).
    tokens = warmup_tokens_per_layer(T, unit, args.seq_length, args.global_batch_size)
    return alpha_plan(args.prores_schedule, T, args.num_layers, length, unit=unit, tokens_per_layer=tokens)


FP8_EXTRA_STATE_VARIABLE = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def _fp8_warnings(args) -> list:
    """FP8 delayed scaling: Transformer Engine >= 2.20 refuses to unpickle its extra state (the amax
    history) on resume unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 (transformer_engine/pytorch/
    _extra_state.py); current-scaling recipes are stateless and unaffected (docs/megatron.md §7)."""
    if not getattr(args, "fp8", None) or getattr(args, "fp8_recipe", None) != "delayed":
        return []
    if os.environ.get(FP8_EXTRA_STATE_VARIABLE) == "1":
        return []
    return [f"--fp8-recipe delayed: with Transformer Engine >= 2.20 a resume refuses to unpickle the FP8 "
            f"delayed-scaling extra state unless {FP8_EXTRA_STATE_VARIABLE}=1 is set in the job's environment "
            "(a pickle load the TE allow-list does not cover; set it only for checkpoints you trust), or use a "
            "current-scaling recipe (--fp8-recipe tensorwise, the launch scripts' FP8_RECIPE default), which "
            "keeps no such state"]


def _data_notes(args) -> list:
    """Indexed-dataset prefixes that are not readable here (fine if they live on the cluster)."""
    if args.mock_data or not args.data_path:
        return []
    prefixes = [p for p in args.data_path if not _is_number(p)]
    missing = [p for p in prefixes if not (os.path.exists(p + ".bin") and os.path.exists(p + ".idx"))]
    return [f"--data-path {p}: {p}.bin/.idx not found on this machine" for p in missing]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def run(argv) -> dict:
    """The dry run (module docstring); returns the report or raises DryRunError."""
    dry, megatron_argv = _dry_run_parser().parse_known_args(list(argv))
    launch = _launch(dry)
    warnings_out, notes, assumptions = [], [], []
    args = _megatron_validation(megatron_argv, launch["world_size"], dry.dry_run_gpu_arch, warnings_out)
    if args.tensor_model_parallel_size > 1 or args.context_parallel_size > 1:
        assumptions.append(f"GPU compute capability {dry.dry_run_gpu_arch}.x (--dry-run-gpu-arch)")
    vocab = _vocab(args, dry, notes)
    if args.padded_vocab_size is None:  # the real run gets it from the tokenizer
        args.padded_vocab_size = vocab["padded_vocab_size"]
    config = _transformer_config(args, assumptions)

    from .param_count import count_parameters
    from .pipeline_layout import PipelineLayoutError, check_layer_coverage, layer_table

    try:
        table = layer_table(config)
        check_layer_coverage(table, args.num_layers)
    except PipelineLayoutError as err:
        raise DryRunError(str(err)) from None
    params = None
    if vocab["padded_vocab_size"] is not None:
        try:
            params = count_parameters(config, vocab["padded_vocab_size"],
                                      tied=not args.untie_embeddings_and_output_weights,
                                      position_embedding_type=args.position_embedding_type,
                                      max_position_embeddings=args.max_position_embeddings)
        except NotImplementedError as err:
            notes.append(str(err))
    memory = _memory_estimate(args, notes)
    plan = _plan(args, notes)
    warnings_out = list(dict.fromkeys(warnings_out + plan.warnings))  # in order, exact repeats once
    warnings_out += _fp8_warnings(args)
    notes += _data_notes(args)
    if args.use_checkpoint_args:
        notes.append("--use-checkpoint-args: at launch the checkpoint's architecture flags replace "
                     "these; the dry run checked the flags as given")
    if args.train_iters is None and getattr(args, "prores_warmup_samples", None) is None and args.prores_enabled:
        notes.append("--train-iters not given (sample-based run): the alpha plan (in steps) cannot be checked "
                     "against the run length; --prores-warmup-samples counts the warmup in samples")

    chunks = []
    for c in table:
        entry = dict(pp_rank=c.pp_rank, vp_stage=c.vp_stage, layers=list(c.layers),
                     embedding=c.embedding, loss=c.loss)
        if params is not None:
            entry["params"] = params.chunk_params(len(c.layers), c.embedding, c.loss)
        chunks.append(entry)
    dp = args.data_parallel_size
    command = [*shlex.split(dry.dry_run_launcher),
               "--nproc_per_node", str(launch["nproc_per_node"]), "--nnodes", str(launch["nnodes"]),
               "--node_rank", str(dry.dry_run_node_rank), "--master_addr", dry.dry_run_master_addr,
               "--master_port", str(dry.dry_run_master_port), "-m", ENTRY_MODULE, *megatron_argv]
    return dict(
        ok=True,
        launch=launch,
        parallel=dict(
            tensor=args.tensor_model_parallel_size,
            pipeline=args.pipeline_model_parallel_size,
            virtual_pipeline=args.virtual_pipeline_model_parallel_size,
            context=args.context_parallel_size,
            data=dp,
            sequence_parallel=bool(args.sequence_parallel),
            layout=args.pipeline_model_parallel_layout,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            micro_batches_per_step=args.global_batch_size // (args.micro_batch_size * dp),
        ),
        num_layers=args.num_layers,
        chunks=chunks,
        coverage=f"layers 1..{args.num_layers} each built exactly once",
        alpha_plan=plan.as_dict(),
        vocab=vocab,
        params=params.as_dict() if params is not None else None,
        memory_estimate=memory,
        warnings=warnings_out,
        notes=notes,
        assumptions=assumptions,
        command=shlex.join(command),
        argv=command,
        launcher=dict(outer=dry.dry_run_outer_launcher or None, per_node=dry.dry_run_launcher),
        versions=_versions(),
    )


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def format_report(report: dict) -> str:
    from ..core.alpha_plan import AlphaPlan, format_alpha_plan
    from .pipeline_layout import Chunk, format_layer_table

    p, launch = report["parallel"], report["launch"]
    table = [Chunk(c["pp_rank"], c["vp_stage"], tuple(c["layers"]), c["embedding"], c["loss"])
             for c in report["chunks"]]
    out = [
        f"ProRes dry run: {launch['world_size']} ranks ({launch['nnodes']} node(s) x "
        f"{launch['nproc_per_node']}) = TP {p['tensor']} x PP {p['pipeline']} x CP {p['context']} "
        f"x DP {p['data']}" + (", sequence parallel" if p["sequence_parallel"] else "")
        + f"; micro-batch {p['micro_batch_size']}, global batch {p['global_batch_size']} "
        f"({p['micro_batches_per_step']} micro-batches per step and DP rank)",
        "",
        f"Pipeline layout (virtual stages per rank: {p['virtual_pipeline'] or 1}"
        + (f", --pipeline-model-parallel-layout {p['layout']}" if p["layout"] else "") + "):",
        format_layer_table(table),
        f"  check: {report['coverage']}",
        "",
        "Alpha plan (first optimizer step, or consumed samples, at which a layer has alpha = 1):",
        format_alpha_plan(AlphaPlan(**report["alpha_plan"])),
        "",
    ]
    params = report["params"]
    if params is not None:
        per_rank = {}
        for c in report["chunks"]:
            per_rank[c["pp_rank"]] = per_rank.get(c["pp_rank"], 0) + c["params"]
        out += [
            f"Parameters: {params['total']:,} ({_human(params['total'])}), vocabulary "
            f"{params['vocab_size']} (padded), {'tied' if params['tied'] else 'untied'} output layer",
            f"  embedding {params['embedding']:,} | per layer {params['per_layer']:,} (attention "
            f"{params['attention']:,}, MLP {params['mlp']:,}, norms {params['norms']:,}) x "
            f"{report['num_layers']} | final norm {params['final_norm']:,} | output layer "
            f"{params['output_layer']:,}",
            f"  per pipeline rank (all {p['tensor']} TP shards together): "
            + ", ".join(f"{r}: {_human(n)}" for r, n in sorted(per_rank.items())),
            "",
        ]
    memory = report["memory_estimate"]
    if memory is not None:
        out += [
            f"Memory per GPU, Megatron-LM's estimate (theoretical_memory_usage; the first pipeline "
            f"stage with L/PP layers, no FP8 savings, no framework buffers): weights and optimizer "
            f"{memory['weight_and_optimizer_mb'] / 1024:.1f} GiB + activations "
            f"{memory['activation_mb'] / 1024:.1f} GiB = {memory['total_mb'] / 1024:.1f} GiB",
            "",
        ]
    for title, items in (("WARNING", report["warnings"]), ("note", report["notes"]),
                         ("assumed", report["assumptions"])):
        out += [f"{title}: {item}" for item in items]
    v = report["versions"]
    out += ["", f"Versions (this interpreter, {v['interpreter']}): torch {v['torch']} (CUDA {v['cuda'] or 'none'}), "
            f"megatron-core {v['megatron_core']}, Transformer Engine {v['transformer_engine'] or 'not installed'}"]
    outer = report["launcher"]["outer"]
    out += ["", f"Command (on every node{', started by ' + outer if outer else ''}, with its --node_rank):",
            report["command"]]
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    out = sys.stdout
    _dry_run_parser().parse_known_args(argv)  # --dry-run-help and malformed --dry-run-* exit here
    try:
        # Megatron prints its argument dump and binds its log handler to sys.stdout when
        # megatron.training is first imported: send all of that to stderr, keep stdout for the report.
        with contextlib.redirect_stdout(sys.stderr):
            report = run(argv)
    except DryRunError as err:
        print(f"prores_megatron.training.dry_run: error: {err}", file=sys.stderr, flush=True)
        if as_json:
            print(json.dumps(dict(ok=False, error=str(err))), file=out, flush=True)
        return 2
    print(json.dumps(report, indent=1) if as_json else format_report(report), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
