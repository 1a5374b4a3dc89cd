"""prores-megatron: Progressive Residual Warmup (ProRes) for megatron-core and Megatron-LM.

Public API (the Megatron-backed names import megatron-core on first use, so the pure schedule
math works without it):
    alpha, alpha_table, SCHEDULES                   - the schedules (prores_megatron.schedules)
    get_prores_layer_spec, with_prores              - layer specs with ProRes plugged in
    set_prores_step, check_prores_coverage          - write alpha(l, t) into a built model
    ProResBiasDropoutAdd, ProResCoverageError
"""

from .schedules import SCHEDULES, alpha, alpha_table, canonical_schedule

__version__ = "0.1.0"

_LAZY = {
    "get_prores_layer_spec": "spec",
    "with_prores": "spec",
    "set_prores_step": "stepping",
    "check_prores_coverage": "stepping",
    "ProResCoverageError": "stepping",
    "ProResBiasDropoutAdd": "residual_scale",
}

__all__ = ["SCHEDULES", "alpha", "alpha_table", "canonical_schedule", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prores_megatron' has no attribute {name!r}")
