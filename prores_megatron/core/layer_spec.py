"""Layer specs with ProRes plugged in.

Contract:
- ``with_prores(spec, schedule, warmup_steps, arch="pre", config=None)`` takes a layer
  ``ModuleSpec``, a ``TransformerBlockSubmodules`` (or a ``ModuleSpec`` of a block), as Megatron's
  own builder made it for the run's flags, and returns a fresh deep copy in which every residual add
  that is megatron-core's ``get_bias_dropout_add`` becomes a ``ProResBiasDropoutAdd``. Absent
  branches (``IdentityFuncOp``) are left alone; a layer with no residual add to scale is an error,
  because ProRes would silently do nothing there. Nothing else in the spec changes for
  ``arch="pre"``; any other ``arch`` is then applied to the layer (``architectures``), which needs
  ``config`` (the layer's TransformerConfig, whose ``transformer_impl`` picks the norm classes) and
  refuses, naming the flag, what it cannot express (docs/megatron.md §2, "What each architecture
  supports").
- ``get_prores_layer_spec(transformer_impl, ...)`` is the Llama-style (RMSNorm, SwiGLU via the
  config, RoPE via the model) GPT layer spec of megatron-core with ProRes applied, for code that
  builds megatron-core models without Megatron-LM's argument parser.
The input spec is never mutated (megatron-core mutates specs it is given, so sharing is unsafe).
"""

import copy
import dataclasses

from . import compat
from .architectures import arch_layer_spec, check_arch, check_arch_supports
from .residual_scale import ProResBiasDropoutAdd
from .schedules import check_schedule

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def _prores_bda_spec(schedule, warmup_steps):
    check_schedule(schedule, warmup_steps)  # at spec time: fails before any model is built
    return compat.ModuleSpec(
        module=ProResBiasDropoutAdd, params={"schedule": schedule, "warmup_steps": warmup_steps}
    )


def _is_prores_bda(field) -> bool:
    return (
        isinstance(field, compat.ModuleSpec)
        and isinstance(field.module, type)
        and issubclass(field.module, ProResBiasDropoutAdd)
    )


def _with_prores_layer(layer_spec, schedule, warmup_steps):
    submodules = layer_spec.submodules
    if not isinstance(submodules, compat.TransformerLayerSubmodules):
        raise TypeError(
            f"with_prores: layer spec of {getattr(layer_spec.module, '__name__', layer_spec.module)} "
            f"has submodules of type {type(submodules).__name__}, expected TransformerLayerSubmodules"
        )
    replaced = {}
    for field in compat.BDA_FIELDS:
        current = getattr(submodules, field)
        if current is compat.get_bias_dropout_add:
            replaced[field] = _prores_bda_spec(schedule, warmup_steps)
        elif _is_prores_bda(current):  # already ProRes (any architecture): re-parameterise only
            check_schedule(schedule, warmup_steps)
            replaced[field] = dataclasses.replace(
                current, params=dict(current.params, schedule=schedule, warmup_steps=warmup_steps)
            )
    if not replaced:
        raise ValueError(
            "with_prores: the layer spec has no residual add built by megatron-core's "
            "get_bias_dropout_add (self_attn_bda/mlp_bda are "
            f"{submodules.self_attn_bda!r}/{submodules.mlp_bda!r}); ProRes cannot scale its "
            "branches and would be a silent no-op"
        )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(submodules, **replaced))


def with_prores(spec, schedule: str = "linear", warmup_steps=None, arch: str = "pre", config=None):
    """Fresh copy of ``spec`` with ProRes on every residual branch (see module docstring)."""
    check_arch(arch)
    if arch == "pre":
        return _with_prores(spec, schedule, warmup_steps)
    if config is None:
        raise ValueError(f"arch={arch!r} builds norms of its own and needs the TransformerConfig (config=...)")
    return _with_arch(spec, arch, config.transformer_impl, config, schedule, warmup_steps)


def _with_arch(spec, arch, transformer_impl, config, schedule, warmup_steps):
    check_arch_supports(spec, arch, config)
    spec = _with_prores(spec, schedule, warmup_steps)
    return arch_layer_spec(spec, arch, compat.backend_for(transformer_impl), config, schedule, warmup_steps)


def _with_prores(spec, schedule, warmup_steps):
    spec = copy.deepcopy(spec)
    if isinstance(spec, compat.TransformerBlockSubmodules):
        return dataclasses.replace(
            spec,
            layer_specs=[_with_prores_layer(s, schedule, warmup_steps) for s in spec.layer_specs],
        )
    if not isinstance(spec, compat.ModuleSpec):
        raise TypeError(
            f"with_prores: expected a layer ModuleSpec or TransformerBlockSubmodules, got "
            f"{type(spec).__name__}"
        )
    if isinstance(spec.submodules, compat.TransformerBlockSubmodules):
        return dataclasses.replace(spec, submodules=_with_prores(spec.submodules, schedule, warmup_steps))
    return _with_prores_layer(spec, schedule, warmup_steps)


def get_prores_layer_spec(
    transformer_impl: str = "local",
    schedule: str = "linear",
    warmup_steps=None,
    arch: str = "pre",
    config=None,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
    num_experts=None,
    moe_grouped_gemm: bool = False,
    use_te_op_fuser: bool = False,
):
    """megatron-core's GPT layer spec for ``transformer_impl`` as ``arch``, with ProRes applied.

    ``arch`` is one of pre, post, sandwich, deepnorm, lns (docs/method.md §5); every arch but ``pre``
    builds norms of its own and needs ``config`` (the TransformerConfig the model is built with).
    """
    check_arch(arch)
    if arch != "pre" and use_te_op_fuser:
        raise ValueError(
            f"arch={arch!r} moves or adds norms, which the TE op fuser's fused MLP cannot express "
            "(Megatron-LM flag: --use-transformer-engine-op-fuser)"
        )
    if transformer_impl == "local":
        base = compat.get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
            normalization=normalization,
        )
    elif transformer_impl == "transformer_engine":
        if not compat.have_transformer_engine():
            raise ImportError(
                "get_prores_layer_spec(transformer_impl='transformer_engine') needs Transformer "
                "Engine, which is not importable here (it needs a GPU and a CUDA build: "
                "pip install --no-build-isolation 'transformer_engine[pytorch]'). On CPU use "
                "transformer_impl='local' (Megatron-LM flag: --transformer-impl local)."
            )
        # TE fuses the pre-norm into linear_qkv/linear_fc1 and picks RMSNorm from the config.
        base = compat.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
            use_te_op_fuser=use_te_op_fuser,
        )
    else:
        raise ValueError(
            f"transformer_impl={transformer_impl!r} is not supported; valid choices: "
            f"{', '.join(TRANSFORMER_IMPLS)}"
        )
    if arch == "pre":
        return _with_prores(base, schedule, warmup_steps)
    if config is None:
        raise ValueError(f"arch={arch!r} builds norms of its own and needs the TransformerConfig (config=...)")
    return _with_arch(base, arch, transformer_impl, config, schedule, warmup_steps)
