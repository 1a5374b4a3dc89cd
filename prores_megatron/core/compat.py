"""Every megatron-core name prores-megatron depends on, imported in one place.

Contract: the other core modules import Megatron symbols only from here, so a megatron-core upgrade
touches this file alone (tests/test_layering.py enforces it). Nothing here imports
``megatron.training`` (the core must stay usable from Megatron-Bridge or NeMo); the Megatron-LM glue
in ``prores_megatron.training`` imports megatron.training itself, inside functions.
Targets megatron-core 0.19.2.
"""
# ruff: noqa: E402  (the version check runs before megatron-core's other modules import)

import torch

MEGATRON_CORE_TARGET = "0.19.2"
SUPPORTED_MEGATRON_CORE = (">=0.19.0", "<0.20")  # setup.py's extras say the same
# The 0.19 line: the pinned wheel (0.19.2) and Megatron-LM's core_r0.19.0 branch and core_v0.19.0 tag,
# which the patch in patches/ targets and whose package_info reports 0.19.1 and 0.19.0.


def check_megatron_core_version(version: str, where: str = "") -> None:
    """ImportError unless ``version`` (megatron-core's ``package_info.__version__``) is in
    ``SUPPORTED_MEGATRON_CORE``; the message names the version found, where, and the range."""
    import re

    match = re.match(r"(\d+)\.(\d+)\.(\d+)", str(version))
    parts = tuple(int(x) for x in match.groups()) if match else None
    if parts is None or not (0, 19, 0) <= parts < (0, 20, 0):
        raise ImportError(
            f"prores-megatron supports megatron-core {','.join(SUPPORTED_MEGATRON_CORE)}, but the megatron-core "
            f"imported here is {version}{f' ({where})' if where else ''}. Run it with a supported megatron-core "
            "(Megatron-LM branch core_r0.19.0, or pip's megatron-core 0.19.x), or install prores-megatron's own "
            "environment (tools/setup_env.sh); docs/megatron.md §1")


def _imported_megatron_core_version():
    # package_info is what the imported tree says of itself (a Megatron-LM checkout on sys.path
    # included), not the metadata of whatever wheel pip installed.
    from megatron.core import package_info

    return package_info.__version__, getattr(package_info, "__file__", "")


check_megatron_core_version(*_imported_megatron_core_version())

from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.jit import jit_fuser
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.utils import get_attr_wrapped_model

__all__ = [  # re-exported: the other core modules reach megatron-core through these names
    "parallel_state", "get_bias_dropout_add", "jit_fuser", "LocalSpecProvider", "get_gpt_layer_local_spec",
    "get_gpt_layer_with_transformer_engine_spec", "IdentityFuncOp", "IdentityOp", "MLPSubmodules", "MoELayer", "ModuleSpec",
    "build_module", "TransformerBlock", "TransformerBlockSubmodules", "BaseTransformerLayer", "TransformerLayer",
    "TransformerLayerSubmodules", "get_attr_wrapped_model", "MEGATRON_CORE_TARGET", "BDA_FIELDS",
    "have_transformer_engine", "decoder_layers", "SUPPORTED_MEGATRON_CORE", "check_megatron_core_version",
    "default_pp_group", "backend_for", "unwrap",
]

# TransformerLayerSubmodules fields that hold a residual add (cross-attention has none in GPT).
BDA_FIELDS = ("self_attn_bda", "cross_attn_bda", "mlp_bda")


def have_transformer_engine() -> bool:
    """True when Transformer Engine imports (it cannot without a GPU)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises RuntimeError (not ImportError) when cuDNN is missing
        return False
    from megatron.core.extensions import transformer_engine as mcore_te

    return bool(getattr(mcore_te, "HAVE_TE", False))


def decoder_layers(chunk):
    """The decoder's TransformerLayers of one model chunk, through DDP/Float16 wrappers.

    Accepts a GPTModel (wrapped or not), a TransformerBlock, or a single layer. MTP layers are not
    decoder layers and are skipped (they live outside ``decoder``).
    """
    if isinstance(chunk, BaseTransformerLayer):
        return [chunk]
    if isinstance(chunk, TransformerBlock):
        return list(chunk.layers)
    try:
        decoder = get_attr_wrapped_model(chunk, "decoder")
    except RuntimeError:
        decoder = None
    if decoder is None:
        # A wrapped TransformerBlock, or a model without a decoder (refused by the caller).
        inner = chunk
        while hasattr(inner, "module") and not isinstance(inner, TransformerBlock):
            inner = inner.module
        return list(inner.layers) if isinstance(inner, TransformerBlock) else []
    return list(decoder.layers)


def default_pp_group():
    """megatron-core's global pipeline group when model parallelism is initialised, else None."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_pipeline_model_parallel_group()


def backend_for(transformer_impl: str):
    """megatron-core's spec provider (the classes a layer is built from) for an implementation."""
    if transformer_impl == "local":
        return LocalSpecProvider()
    if transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise ImportError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
                "importable here (it needs a GPU and a CUDA build). On CPU use "
                "transformer_impl='local' (Megatron-LM flag: --transformer-impl local)."
            )
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    raise ValueError(
        f"transformer_impl={transformer_impl!r} is not supported; valid choices: local, transformer_engine"
    )


def unwrap(module):
    """The innermost model under DDP / Float16Module wrappers (each keeps it in ``.module``)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module
