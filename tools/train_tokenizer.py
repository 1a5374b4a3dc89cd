#!/usr/bin/env python3
"""Train a SentencePiece tokenizer for Megatron. ``--help`` for the flags.

A thin launcher for ``prores_megatron.data.tokenizer_training`` (installed as the console command
``prores-megatron-train-tokenizer``) that also works from a plain checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when not installed

from prores_megatron.data.tokenizer_training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
