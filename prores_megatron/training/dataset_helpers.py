"""Megatron's dataset-helper build, skipped when the prebuilt helpers import.

Contract: ``skip_helper_build_if_prebuilt()`` is called once, before ``pretrain()``. Megatron-LM's
``initialize_megatron`` runs ``megatron.core.datasets.utils.compile_helpers()`` on rank 0, which
runs ``make`` in the installed package's folder and calls ``sys.exit(1)`` when that fails. The
megatron-core wheel ships the compiled ``helpers_cpp`` extension but no Makefile, so every run on
a pip-installed megatron-core, GPU or CPU, would stop there (docs/megatron.md §4, row 10).
- When ``megatron.core.datasets.helpers_cpp`` imports, ``compile_helpers`` is replaced by a function
  that builds nothing and prints one log line naming the module it uses; returns True.
- When it does not import (a source checkout whose helpers were never built), nothing changes:
  Megatron builds them as stock Megatron-LM does; returns False.
- Idempotent. If ``compile_helpers`` is no longer where megatron-core 0.19 keeps it, raises
  RuntimeError before changing anything (a Megatron upgrade must revisit this file).
"""

import importlib

_TARGET_MODULE = "megatron.core.datasets.utils"
_TARGET_ATTR = "compile_helpers"
_PREBUILT = "megatron.core.datasets.helpers_cpp"
_state = {"skipped": False}


def _prebuilt_helpers_path():
    """The prebuilt extension's file, or None when it does not import."""
    try:
        module = importlib.import_module(_PREBUILT)
    except ImportError:
        return None
    return getattr(module, "__file__", _PREBUILT)


def skip_helper_build_if_prebuilt() -> bool:
    if _state["skipped"]:
        return True
    utils = importlib.import_module(_TARGET_MODULE)
    if not callable(getattr(utils, _TARGET_ATTR, None)):
        raise RuntimeError(
            f"prores_megatron.training.dataset_helpers: {_TARGET_MODULE}.{_TARGET_ATTR} no longer "
            "exists; this megatron-core is not the 0.19 the helper-build skip was written for: "
            "update prores_megatron/training/dataset_helpers.py"
        )
    path = _prebuilt_helpers_path()
    if path is None:
        return False

    def use_prebuilt_helpers():
        # Megatron calls this on rank 0 only, so the line appears once per run.
        print(f"> dataset helpers: using the prebuilt {_PREBUILT} ({path}); Megatron's `make` build "
              "skipped", flush=True)

    setattr(utils, _TARGET_ATTR, use_prebuilt_helpers)
    _state["skipped"] = True
    return True
