"""Megatron-Bridge for the tests: ``load_bridge()`` returns None when ``prores_megatron.bridge``
imports (``bridge/compat.py`` loads Bridge's callback and config modules even where ``import
megatron.bridge`` fails, as on this CPU stack), else why not (skip reason)."""

import importlib.util
import warnings


def load_bridge():
    if importlib.util.find_spec("megatron.bridge") is None:
        return "megatron-bridge is not installed (pip install --no-deps megatron-bridge==0.6.2)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import prores_megatron.bridge  # noqa: F401
    return None
