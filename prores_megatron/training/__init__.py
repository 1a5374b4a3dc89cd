"""Megatron-LM glue: the ``--prores-*`` flags, the model config hooks, the ``pretrain_gpt`` entry point,
the training log and monitor, the CPU shim, the GPU-free dry run, pipeline layouts, parameter counts.

The only subpackage that imports ``megatron.training`` (always inside functions, after the CPU shim;
docs/megatron.md §3-§4). Entry points: ``python -m prores_megatron.training.pretrain_gpt`` and
``python -m prores_megatron.training.dry_run``. The Megatron-LM patch in ``patches/`` uses only the
names exported here.
"""

from ..utils.lazy_api import lazy_api

_EXPORTS = {
    **{name: "arguments" for name in (
        "ProResArgumentError", "add_prores_args", "validate_prores_args", "describe_prores_args")},
    **{name: "model_config" for name in (
        "configure_model_config", "attach_monitor", "prores_layer_spec_fn", "current_prores_step")},
    **{name: "training_monitor" for name in ("AlphaLogger", "TrainingMonitor")},
    **{name: "cpu_shim" for name in ("install_cpu_shim", "is_cpu_shim_installed")},
    "skip_helper_build_if_prebuilt": "dataset_helpers",
    **{name: "pipeline_layout" for name in (
        "PipelineLayoutError", "check_pipeline_flags", "layer_table", "check_layer_coverage")},
    "count_parameters": "param_count",
    "set_prores_step": "..core.stepping",  # what a training script calls at the top of forward_step
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
