"""A stand-in executable for launch-script tests: it records how it was called instead of running."""

import stat
import sys
from pathlib import Path


def recording_stub(path: Path) -> Path:
    """An executable that prints its argv and CUDA_DEVICE_MAX_CONNECTIONS as one JSON line, in place
    of a launcher or interpreter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import json, os, sys; print(json.dumps(dict(argv=sys.argv[1:], "
            "cuda_device_max_connections=os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS'))))")
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S -c "{code}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path
