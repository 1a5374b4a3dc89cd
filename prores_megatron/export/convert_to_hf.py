"""Command line for the Hugging Face export: ``prores-megatron-convert-to-hf CHECKPOINT OUTPUT [flags]``
(also ``python tools/convert_to_hf.py``).

Contract: parses flags, calls ``exporter.export_to_hf`` and maps its refusals to exit status 2
with a one-line ``error:`` message (naming the flag or file). SIGINT (Ctrl-C), SIGTERM and SIGHUP (a
dropped SSH session) exit 128 + the signal number (130, 143, 129) after the export has removed its
temporary directory, saying so. A signal that arrives while torch and megatron-core import (the
first seconds, when some libraries' blanket ``except:`` would swallow a KeyboardInterrupt) is held
and honoured as soon as the imports are done: no export starts after it. A process killed outright
(SIGKILL, the OOM killer) cannot clean up; the next export into the same place does. All the work
and every check live in ``exporter``.
"""

import argparse
import signal
import sys
import warnings

from ..core.depth_scaling import ARCHS  # all five are accepted: the non-exportable ones get a reason
from ..core.schedules import SCHEDULES

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def build_parser():
    p = argparse.ArgumentParser(
        prog="prores-megatron-convert-to-hf",
        description="Export a Megatron GPT checkpoint (ProRes or plain; torch_dist or legacy torch, "
        "any TP/PP/VPP layout) as a Hugging Face Llama directory, folding the ProRes alpha of "
        "the checkpoint's step into the weights so the HF model computes what Megatron computed.",
    )
    p.add_argument("checkpoint", help="Megatron save directory (with latest_checkpointed_iteration.txt) or one iter_* directory")
    p.add_argument("output", help="directory to create (refused if it exists, unless --force)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "bf16", "float32", "fp32", "float16", "fp16"),
                   help="weight dtype of the export (default bfloat16); folding is done in fp32, rounded once")
    p.add_argument("--tokenizer-model", help="SentencePiece .model of the run: written as HF tokenizer files, and it sets the true vocabulary size")
    p.add_argument("--force", action="store_true", help="replace an existing output directory (only once the new export is complete)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    o = p.add_argument_group("overrides (default: the checkpoint's saved arguments; a disagreement is reported)")
    o.add_argument("--vocab-size", type=int, help="true vocabulary size V (rows beyond V are padding and dropped)")
    o.add_argument("--prores-schedule", help=f"alpha schedule: {', '.join(SCHEDULES)}")
    o.add_argument("--prores-warmup-steps", type=float, help="per-layer warmup T")
    o.add_argument("--prores-arch", choices=ARCHS, help="residual architecture (only pre and lns are exportable)")
    o.add_argument("--step", type=int, help="optimizer step t whose alpha is folded in (default: the checkpoint's "
                   "iteration, i.e. the next training step; Megatron's eval at that checkpoint used iteration-1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the copy loop (default 1: it is memory-bound, docs/export.md §5)")
    p.add_argument("--quiet", action="store_true", help="no per-layer progress")
    return p


class Interrupted(BaseException):
    """A signal asked the export to stop (BaseException: no ``except Exception`` swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)  # unwinds through the staged output, which removes itself


def _held_signals():
    """Install handlers that only record a signal (for the import phase); returns the record and
    the previous handlers."""
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in SIGNALS}
    return held, previous


def _signal_name(signum):
    return signal.Signals(signum).name


def main(argv=None, saved_args_from=None):
    """``saved_args_from(checkpoint_path) -> Namespace`` supplies the model settings of a checkpoint
    that stores no Megatron-LM arguments (``prores_megatron.bridge.export``); it may raise
    ``CheckpointError``/``ExportError`` (exit status 2, like every refusal)."""
    held, previous = _held_signals()
    try:
        return _main(argv, held, saved_args_from)
    except Interrupted as stop:
        print(f"prores-megatron-convert-to-hf: stopped by {_signal_name(stop.signum)}; the partial export "
              "was removed and nothing was written", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv, held, saved_args_from=None):
    args = build_parser().parse_args(argv)
    # megatron-core is imported only for its pickle allow-list; its "no TE/Apex kernels" warnings
    # say nothing about an export, which runs no fused kernel.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from ..checkpoint.base import CheckpointError
    from .exporter import ExportError, export_to_hf

    if held:  # a signal arrived while torch imported: honour it before any work
        print(f"prores-megatron-convert-to-hf: stopped by {_signal_name(held[0])} during start-up; nothing "
              "was written", file=sys.stderr, flush=True)
        return 128 + held[0]
    for s in SIGNALS:
        signal.signal(s, _interrupt)

    overrides = {"vocab_size": args.vocab_size, "prores_schedule": args.prores_schedule,
                 "prores_warmup_steps": args.prores_warmup_steps, "prores_arch": args.prores_arch,
                 "step": args.step}

    def log(message):
        if not (args.quiet and message.startswith("layer ")):
            print(message, file=sys.stderr, flush=True)

    try:
        saved_args = saved_args_from(args.checkpoint) if saved_args_from is not None else None
        export_to_hf(args.checkpoint, args.output, dtype=args.dtype, tokenizer_model=args.tokenizer_model,
                     overrides=overrides, force=args.force, max_shard_size=args.max_shard_size, log=log,
                     threads=args.threads, saved_args=saved_args)
    except (ExportError, CheckpointError) as err:
        print(f"prores-megatron-convert-to-hf: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
