"""How the data tools end: the same exit statuses and messages for every command.

Contract: ``run_tool(work, refused)`` calls ``work(log)``, ``log`` printing progress to stderr, and
returns the exit status: 0 when it finished; 2 with ``error: <message>`` on stderr when it raised
one of ``refused`` (bad input, named before any work); 130 with ``interrupted: nothing was written``
on Ctrl-C (the tools write through ``utils.atomic_output``, so that is true).
"""

import sys


def run_tool(work, refused) -> int:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        work(log)
    except refused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0
