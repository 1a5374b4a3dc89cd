#!/usr/bin/env python3
"""Megatron (ProRes) checkpoint -> Hugging Face Llama directory. ``--help`` for the flags.

A thin launcher for ``prores_megatron.export.convert_to_hf`` (installed as the console command
``prores-megatron-convert-to-hf``) that also works from a plain checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when not installed

from prores_megatron.export.convert_to_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
