"""prores-megatron: Progressive Residual Warmup (ProRes) for megatron-core and Megatron-LM.

Public API (the Megatron-backed names import megatron-core on first use, so the pure schedule
math works without it):
    alpha, alpha_table, SCHEDULES, canonical_schedule - the schedules (prores_megatron.core.schedules)
    get_prores_layer_spec, with_prores                - layer specs with ProRes plugged in
    set_prores_step, check_prores_coverage            - write alpha(l, t) into a built model
    ProResBiasDropoutAdd, ProResCoverageError

Subpackages, each importing only those before it: utils, core (the method), monitoring,
checkpoint (reading Megatron checkpoints), training (Megatron-LM glue), export (Hugging Face),
analysis (the ``prores-megatron`` command), data. See docs/README.md.
"""

from .utils.lazy_api import lazy_api

__version__ = "0.1.0"

_EXPORTS = {
    **{name: "core.schedules" for name in ("SCHEDULES", "alpha", "alpha_table", "canonical_schedule")},
    **{name: "core.layer_spec" for name in ("get_prores_layer_spec", "with_prores")},
    **{name: "core.stepping" for name in ("set_prores_step", "check_prores_coverage", "ProResCoverageError")},
    "ProResBiasDropoutAdd": "core.residual_scale",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
