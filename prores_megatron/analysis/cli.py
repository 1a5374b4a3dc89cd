"""The ``prores-megatron`` command: ``plan``, ``report``, ``cosine``, ``heldout`` and ``depth`` (``--help`` on each).

Contract: ``main(argv)`` parses the subcommand and its flags and returns the exit status: 0 on
success, 2 with ``prores-megatron <command>: error: <message naming the flag or file>`` on stderr
when the input is refused (``UsageError``, or a log/checkpoint that cannot be read). Each
subcommand lives in its own module (``plan_command``, ``report_command``, ``cosine_command``, ``heldout_command``, ``depth_command``),
imported only when chosen, so ``plan`` never imports torch or Megatron.
"""

import argparse
import importlib
import sys

from .usage import UsageError

COMMANDS = {
    "plan": ("plan_command", "alpha per layer against step for a configuration: text, warnings and a heatmap PNG"),
    "report": ("report_command", "markdown report with plots from one or more runs' monitor JSONL / TensorBoard logs"),
    "cosine": ("cosine_command", "layerwise cosine similarity of branch outputs between checkpoints and the final one"),
    "heldout": ("heldout_command", "loss on the run's held-out documents with its standard error, and the activation "
                                   "norm across depth"),
    "depth": ("depth_command", "the depth study (examples/scripts/depth_study_gpu.sh): final perplexity against depth "
                               "(the paper's Fig. 1) and spike scores, ProRes against the baseline"),
}


def build_parser(command=None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that subcommand gets its flags (and its module imported)."""
    parser = argparse.ArgumentParser(prog="prores-megatron", allow_abbrev=False,
                                     description="ProRes analysis tools; 'prores-megatron COMMAND --help' for each.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if command in (None, name):  # the other commands' modules (torch, matplotlib) stay unimported
            _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f".{COMMANDS[name][0]}", __package__)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    module = _module(args.command)
    try:
        return module.run(args)
    except (UsageError, *getattr(module, "INPUT_ERRORS", ())) as err:
        print(f"prores-megatron {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
