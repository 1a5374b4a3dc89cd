"""Everything that depends on Megatron-Bridge's version (0.6.2): a Bridge upgrade touches this file.

Contract:
- importing this module imports Bridge's ``training.callbacks`` and ``utils.instantiate_utils``
  (pure Python, no GPU) or raises ``ImportError`` naming ``pip install megatron-bridge==0.6.2``;
- ``Callback``: Bridge's callback base class; ``register_target_prefix(prefix)``: Bridge's
  allow-list for ``_target_`` in a reloaded ``run_config.yaml``;
- Bridge has two model-config paths, both handled here: the newer ``GPTModelConfig`` (megatron-core's
  ``megatron.training.models.gpt``, re-exported by ``megatron.bridge.models.gpt.gpt_builder``: a
  ``transformer`` TransformerConfig inside, serialised by ``as_dict``, which drops callables) and
  the older ``GPTModelProvider`` (itself a TransformerConfig, serialised field by field).
  ``transformer_config(model_cfg)``, ``stock_layer_spec(model_cfg, vp_stage)`` (Bridge's own
  default for that config), ``add_pre_wrap_hook`` and ``prores_metadata(model_cfg)`` (the dict in
  ``extra_checkpoint_metadata`` where the config has one, else None) hide the difference;
- ``completed_steps(state)``: ``state.train_state.step``, optimizer steps done before the step
  about to run (``on_train_step_start``) and still before it in ``on_train_step_end`` (0.6.2's
  ``train()`` increments it after that event), including it in ``on_eval_start``;
- the layout of a Bridge ``iter_*`` directory: ``RUN_CONFIG`` and ``model_section(run_config)``;
- checkpointing: ``cfg.checkpoint.custom_manager_class`` (``MANAGER_FIELD``, a dotted class name that
  ``run_config.yaml`` keeps, checked against the ``_target_`` allow-list) names the class Bridge's
  ``setup()`` builds as ``cls(cfg.checkpoint)`` and calls ``load(ctx)`` (``ctx.state``, ``ctx.model``) /
  ``save(ctx, callback_manager)`` / ``finalize_async_saves(state, blocking, terminate)`` on, reading
  ``checkpointing_context``; ``default_checkpoint_manager(checkpoint_config)`` is Bridge's own
  (its module needs modelopt: a GPU install); ``load_dir(checkpoint_config)`` is where Bridge's
  ``load_checkpoint`` looks (``load``, else ``pretrained_checkpoint``) and whether that is a finetune;
``import megatron.bridge`` itself imports every model family (transformers <= 5.12.1, diffusers,
modelopt, Transformer Engine ...); nothing here needs that: where it fails (a CPU-only install
with ``--no-deps``), ``megatron.bridge`` is registered as a bare package and only the pure-Python
modules above are imported, with a warning (docs/bridge.md §2).
"""

import importlib
import importlib.util
import sys
import types
import warnings


def _bare_bridge_package(err):
    """``megatron.bridge`` as a bare package (its real path, its ``__init__`` not run): the
    modules below need none of what that ``__init__`` imports (docs/bridge.md §2)."""
    for name in [n for n in sys.modules if n == "megatron.bridge" or n.startswith("megatron.bridge.")]:
        del sys.modules[name]  # the half-imported package
    spec = importlib.util.find_spec("megatron.bridge")
    package = types.ModuleType("megatron.bridge")
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
    sys.modules["megatron.bridge"] = package
    warnings.warn(f"import megatron.bridge failed ({err}); prores_megatron.bridge uses only Bridge's "
                  "callback and config modules, loaded without the package's __init__", stacklevel=3)


try:
    if importlib.util.find_spec("megatron.bridge") is None:
        raise ImportError("No module named 'megatron.bridge'")
    try:
        importlib.import_module("megatron.bridge")
    except ImportError as err:  # a CPU-only install: every model family's dependencies are missing
        _bare_bridge_package(err)
    from megatron.bridge.training.callbacks import Callback, CallbackContext, CallbackManager
    from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix
except ImportError as err:
    raise ImportError(
        f"prores_megatron.bridge needs Megatron-Bridge's callback and config modules ({err}): "
        "pip install megatron-bridge==0.6.2 (docs/bridge.md §2 lists what imports on CPU)"
    ) from err

BRIDGE_VERSION = "0.6.2"
RUN_CONFIG = "run_config.yaml"  # what Bridge writes into every iter_* directory instead of Megatron-LM's args
METADATA_KEY = "prores"  # our entry in GPTModelConfig.extra_checkpoint_metadata
# GPTModelConfig.as_dict drops every callable, the activation function too: recorded beside ours,
# so the exporter can tell SwiGLU from GeGLU.
ACTIVATION_KEY = "prores_activation_func"

MANAGER_FIELD = "custom_manager_class"  # on cfg.checkpoint
BRIDGE_TRACKER = "latest_train_state.pt"  # Bridge's tracker (TrainState.state_dict(): tensors only)

__all__ = ["Callback", "CallbackContext", "CallbackManager", "register_target_prefix", "transformer_config",
           "stock_layer_spec", "add_pre_wrap_hook", "prores_metadata", "set_prores_metadata", "completed_steps",
           "model_section", "default_checkpoint_manager", "load_dir", "RUN_CONFIG", "METADATA_KEY",
           "ACTIVATION_KEY", "MANAGER_FIELD", "BRIDGE_TRACKER", "BRIDGE_VERSION"]


def register_target_prefix(prefix: str) -> None:
    register_allowed_target_prefix(prefix)


def is_model_config(model_cfg) -> bool:
    """The newer path: a GPTModelConfig holding its TransformerConfig in ``.transformer``."""
    return "transformer" in getattr(type(model_cfg), "__dataclass_fields__", {})


def transformer_config(model_cfg):
    return model_cfg.transformer if is_model_config(model_cfg) else model_cfg


def stock_layer_spec(model_cfg, vp_stage=None):
    """The spec Bridge would build for ``model_cfg`` had no spec been given."""
    if is_model_config(model_cfg):
        from megatron.training.models.gpt import default_layer_spec

        return default_layer_spec(model_cfg, vp_stage)
    # GPTModelProvider: its default is TE; its local spec is the one recipes pick for CPU/no-TE.
    from megatron.bridge.models.gpt_provider import default_layer_spec, local_layer_spec

    return local_layer_spec(model_cfg) if model_cfg.transformer_impl == "local" else default_layer_spec(model_cfg)


def add_pre_wrap_hook(model_cfg, hook) -> None:
    if is_model_config(model_cfg):
        model_cfg.pre_wrap_hooks = [*model_cfg.pre_wrap_hooks, hook]
    else:
        model_cfg.register_pre_wrap_hook(hook)


def prores_metadata(model_cfg):
    """Our settings dict from ``extra_checkpoint_metadata`` (None: absent, or no such field)."""
    extra = getattr(model_cfg, "extra_checkpoint_metadata", None) if is_model_config(model_cfg) else None
    return (extra or {}).get(METADATA_KEY)


def set_prores_metadata(model_cfg, settings: dict) -> bool:
    """Store ``settings`` where the serialised config keeps them; False if the config has no place."""
    if not is_model_config(model_cfg):
        return False  # GPTModelProvider serialises the spec object itself (its to_cfg_dict)
    fn = model_cfg.transformer.activation_func
    activation = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    model_cfg.extra_checkpoint_metadata = {**(model_cfg.extra_checkpoint_metadata or {}), METADATA_KEY: settings,
                                           ACTIVATION_KEY: activation}
    return True


def completed_steps(state) -> int:
    return int(state.train_state.step)


def model_section(run_config: dict) -> dict:
    """The model settings of a loaded ``run_config.yaml``, flat (GPTModelConfig nests its
    TransformerConfig under ``transformer``; GPTModelProvider is flat already)."""
    model = run_config.get("model")
    if not isinstance(model, dict):
        raise KeyError("model")
    flat = {k: v for k, v in model.items() if k != "transformer"}
    if isinstance(model.get("transformer"), dict):
        flat.update(model["transformer"])
    return flat


def default_checkpoint_manager(checkpoint_config):
    """Bridge's ``DefaultCheckpointManager(checkpoint_config)``, the one ``setup()`` builds when no
    custom manager is named."""
    try:
        from megatron.bridge.training.checkpointing import DefaultCheckpointManager
    except ImportError as err:
        raise ImportError(
            f"Megatron-Bridge's checkpointing module does not import here ({err}); it needs Bridge's full "
            "install (modelopt, Transformer Engine), as Bridge's own training does (docs/bridge.md §2)") from err
    return DefaultCheckpointManager(checkpoint_config)


def load_dir(checkpoint_config):
    """(directory, finetune): where 0.6.2's ``load_checkpoint`` reads, by the same rule (``load``
    when it holds a checkpoint or nothing else is given, else ``pretrained_checkpoint``, which
    is a finetune: iteration 0), before any of it is read. ``ckpt_step`` picks the iteration."""
    from pathlib import Path

    from ..checkpoint.base import TRACKER

    load = getattr(checkpoint_config, "load", None)
    pretrained = getattr(checkpoint_config, "pretrained_checkpoint", None)
    markers = (BRIDGE_TRACKER, TRACKER, RUN_CONFIG)  # what Bridge's checkpoint_exists looks for
    has_resume = bool(load) and any((Path(load) / name).is_file() for name in markers)
    if pretrained and not has_resume:
        return pretrained, True
    return load, bool(getattr(checkpoint_config, "finetune", False))
