"""The error every ``prores-megatron`` subcommand raises for input it refuses.

Contract: ``UsageError(message)``, the message naming the flag or the file; ``analysis.cli`` prints
it as ``prores-megatron <command>: error: <message>`` and exits with status 2.
"""


class UsageError(ValueError):
    """The command's input is wrong; the message names the flag or the file."""
