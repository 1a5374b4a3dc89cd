"""The paper's five residual architectures as spec transforms of a megatron-core layer spec.

Contract: ``arch_layer_spec(spec, arch, backend, config, schedule, warmup_steps)`` takes a Pre-LN
layer ``ModuleSpec`` (megatron-core's local or TE GPT layer) and returns a fresh spec computing the
docs/method.md §5.2 layer for ``arch`` with one alpha per layer on both branches:

    pre       h = x + a*A(N1(x))             y = h + a*M(N2(h))
    post      h = N1(x + a*A(x))             y = N2(h + a*M(h))
    sandwich  h = x + a*N1'(A(N1(x)))        y = h + a*N2'(M(N2(h)))
    deepnorm  h = N1(c*x + a*A(x))           y = N2(c*h + a*M(h))      c = (2L)^(1/4)
    lns       h = x + a*A(N1(x)/sqrt(l))     y = h + a*M(N2(h)/sqrt(l))

Only submodules change: the pre-norms become ``IdentityOp`` where the architecture has none (and a
norm fused into ``linear_qkv``/``linear_fc1`` by TE is un-fused: the linear would still normalise),
the residual adds become the norm-owning ProRes modules, LNS wraps the pre-norms. The model's final
norm is kept for every arch, as in the paper's models, so Post-LN and DeepNorm end in two norms.
``backend`` is megatron-core's spec provider (local or TE), which supplies the norm and linear classes.
"""

import dataclasses
import functools

from . import compat
from .depth_scaling import ARCHS, deepnorm_skip_scale
from .residual_scale import (
    ProResPostNormBiasDropoutAdd,
    ProResSandwichBiasDropoutAdd,
    depth_scaled_norm,
)

# Checkpoint keys of LNS's wrapped pre-norms map onto Pre-LN's, so the two load into each other.
_LNS_KEYS = {
    "input_layernorm.norm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.norm.": "mlp.linear_fc1.layer_norm_",
}


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not a residual architecture; valid choices: {', '.join(ARCHS)}")
    return arch


# TransformerConfig settings whose layers the architecture transforms cannot express, with the
# Megatron-LM flag that sets each (Megatron-LM 0.19 derives these flags from the config fields).
_PRE_ONLY_SETTINGS = (
    ("multi_latent_attention", "--multi-latent-attention", "MLA has no fused QKV linear to un-fuse"),
    ("experimental_attention_variant", "--experimental-attention-variant", "its layers come as a block spec"),
    ("use_kitchen", "--use-kitchen", "kitchen supplies its own norm and linear classes"),
    ("use_grouped_gemm_for_dense_mlp", "--use-grouped-gemm-for-dense-mlp", "the grouped-GEMM MLP has no plain fc1"),
)


def check_arch_supports(spec, arch, config) -> None:
    """ValueError naming the Megatron-LM flag when ``arch`` cannot be applied to ``spec``."""
    check_arch(arch)
    if arch == "pre":
        return
    for attr, flag, why in _PRE_ONLY_SETTINGS:
        if getattr(config, attr, None):
            raise ValueError(f"--prores-arch {arch} cannot be combined with {flag} ({why}); use --prores-arch pre")
    block = spec if isinstance(spec, compat.TransformerBlockSubmodules) else getattr(spec, "submodules", None)
    if isinstance(block, compat.TransformerBlockSubmodules):
        raise ValueError(
            f"--prores-arch {arch} needs one dense layer spec for every layer, but Megatron built a per-layer "
            "block spec (--num-experts, --heterogeneous-layers-config-path); use --prores-arch pre"
        )
    mlp = getattr(spec.submodules, "mlp", None)
    module = mlp.func if isinstance(mlp, functools.partial) else getattr(mlp, "module", None)
    if isinstance(module, type) and issubclass(module, compat.MoELayer):
        raise ValueError(f"--prores-arch {arch} supports dense MLPs only (--num-experts); use --prores-arch pre")


def _unfused(linear, backend):
    """The plain column-parallel linear for a norm-fused one (TE), else ``linear`` unchanged."""
    fused = backend.column_parallel_layer_norm_linear()
    return backend.column_parallel_linear() if fused is not None and linear is fused else linear


def _unfuse_attention(attention_spec, backend):
    sub = attention_spec.submodules
    return dataclasses.replace(
        attention_spec, submodules=dataclasses.replace(sub, linear_qkv=_unfused(sub.linear_qkv, backend))
    )


def _unfuse_mlp(mlp, backend):
    # 0.19 specs hold the dense MLP either as ModuleSpec(MLP, submodules=...) or as a partial of
    # MLP.as_mlp_submodule(submodules=...); both carry MLPSubmodules.
    if isinstance(mlp, functools.partial) and isinstance(mlp.keywords.get("submodules"), compat.MLPSubmodules):
        sub = mlp.keywords["submodules"]
        keywords = dict(mlp.keywords, submodules=dataclasses.replace(sub, linear_fc1=_unfused(sub.linear_fc1, backend)))
        return functools.partial(mlp.func, *mlp.args, **keywords)
    if isinstance(mlp, compat.ModuleSpec) and isinstance(mlp.submodules, compat.MLPSubmodules):
        sub = mlp.submodules
        return dataclasses.replace(mlp, submodules=dataclasses.replace(sub, linear_fc1=_unfused(sub.linear_fc1, backend)))
    raise ValueError(
        f"the MLP spec {mlp!r} is not a dense megatron-core MLP; architectures other than 'pre' "
        "support dense MLPs only (no MoE)"
    )


def arch_layer_spec(spec, arch, backend, config, schedule, warmup_steps):
    """See module docstring. ``spec`` must already carry ProRes residuals (``with_prores``)."""
    check_arch(arch)
    if arch == "pre":
        return spec
    if config is None:
        raise ValueError(f"arch={arch!r} builds norms of its own and needs the TransformerConfig (config=...)")
    sub = spec.submodules
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
    bda_params = dict(schedule=schedule, warmup_steps=warmup_steps, config=config, norm=norm)
    if arch in ("post", "deepnorm"):
        skip = deepnorm_skip_scale(config.num_layers) if arch == "deepnorm" else 1.0
        bda = compat.ModuleSpec(module=ProResPostNormBiasDropoutAdd, params=dict(bda_params, skip_scale=skip))
        sub = dataclasses.replace(
            sub,
            input_layernorm=compat.IdentityOp,
            pre_mlp_layernorm=compat.IdentityOp,
            self_attention=_unfuse_attention(sub.self_attention, backend),
            mlp=_unfuse_mlp(sub.mlp, backend),
            self_attn_bda=bda,
            mlp_bda=bda,
            sharded_state_dict_keys_map={},
        )
    elif arch == "sandwich":
        bda = compat.ModuleSpec(module=ProResSandwichBiasDropoutAdd, params=bda_params)
        sub = dataclasses.replace(sub, self_attn_bda=bda, mlp_bda=bda)
    else:  # lns: the 1/sqrt(l) sits between the norm and the linear, so TE's fusion must go
        sub = dataclasses.replace(
            sub,
            input_layernorm=depth_scaled_norm(norm),
            pre_mlp_layernorm=depth_scaled_norm(norm),
            self_attention=_unfuse_attention(sub.self_attention, backend),
            mlp=_unfuse_mlp(sub.mlp, backend),
            sharded_state_dict_keys_map=dict(_LNS_KEYS),
        )
    return dataclasses.replace(spec, submodules=sub)
