#!/usr/bin/env python3
"""Text or JSON lines -> Megatron indexed dataset (.bin/.idx). ``--help`` for the flags.

A thin launcher for ``prores_megatron.data.indexed_data`` (installed as the console command
``prores-megatron-preprocess-data``) that also works from a plain checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when not installed

from prores_megatron.data.indexed_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
