"""The method: schedules, depth-scaling constants, the residual modules, spec transforms, stepping, inits.

The bottom layer of the package (docs/method.md, docs/megatron.md §2). It imports megatron-core only
(through ``compat``), never ``megatron.training`` and never another prores_megatron subpackage but
``utils``. ``schedules``, ``depth_scaling`` and ``alpha_plan`` are pure Python.
"""

from ..utils.lazy_api import lazy_api

_EXPORTS = {
    **{name: "schedules" for name in (
        "SCHEDULES", "STATIC_SCHEDULES", "alpha", "alpha_table", "canonical_schedule", "check_schedule",
        "check_warmup_steps", "layer_full_step", "prores_step", "needs_warmup_steps", "total_warmup_steps",
        "warmup_steps_from_total")},
    **{name: "depth_scaling" for name in ("ARCHS", "INITS")},
    # Not "alpha_plan" itself: that name is the submodule's (import it from core.alpha_plan).
    **{name: "alpha_plan" for name in ("AlphaPlan", "format_alpha_plan")},
    "PIPELINE_FLAGS": "pipeline_flags",
    **{name: "residual_scale" for name in ("ProResBiasDropoutAdd", "DepthScaledNorm")},
    **{name: "layer_spec" for name in ("get_prores_layer_spec", "with_prores", "TRANSFORMER_IMPLS")},
    **{name: "stepping" for name in (
        "set_prores_step", "check_prores_coverage", "ProResCoverageError", "prores_layers", "residual_scales",
        "model_alphas")},
    **{name: "init_schemes" for name in ("apply_init", "check_init")},
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
