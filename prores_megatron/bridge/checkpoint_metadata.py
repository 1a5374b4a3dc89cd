"""ProRes settings in a Bridge run's config and checkpoint, and the refusal of a config that lost them.

Contract:
- ``attach_prores(model_cfg, prores, train_iters=None)`` validates ``prores`` (``ProResConfig.finalize``)
  and plugs it into a Bridge model config (GPTModelConfig or GPTModelProvider): the layer spec
  (``ProResLayerSpec``), the ``init`` re-draw as a pre-wrap hook, and the settings in
  ``extra_checkpoint_metadata["prores"]`` where the config has that field, so that every
  ``run_config.yaml`` Bridge writes into a checkpoint records them (GPTModelProvider stores the
  spec object itself, settings included). Returns the validated args (``ProResConfig.finalize``).
- ``prores_settings(model_cfg)`` / ``settings_from_run_config(run_config)``: the recorded
  ``ProResConfig`` or None (a vanilla run), from a live config or a loaded ``run_config.yaml``.
- ``check_prores_spec(model_cfg)``: raises ``ProResSpecLostError`` when the config records ProRes but
  its ``transformer_layer_spec`` is not a ``ProResLayerSpec`` agreeing with it: what a reloaded
  GPTModelConfig looks like (its serialiser drops callables), which would otherwise train or
  resume as a vanilla model. ``restore_prores_spec(model_cfg)`` re-attaches the spec from the
  recorded settings (the fix the error names).
"""

from ..training.arguments import ProResArgumentError
from .compat import METADATA_KEY, add_pre_wrap_hook, model_section, prores_metadata, set_prores_metadata
from .config import ProResConfig
from .layer_spec import ProResLayerSpec


class ProResSpecLostError(ProResArgumentError):
    """The config records ProRes settings but would build a model without ProRes."""


def init_hook(prores: ProResConfig, model_cfg):
    """pre-wrap hook: ``init`` re-draws the weights before DDP/fp16 wrap (as Megatron-LM's)."""
    from ..core.init_schemes import apply_init
    from .compat import transformer_config

    def hook(model_chunks):
        tc = transformer_config(model_cfg)
        apply_init(model_chunks, prores.init, sigma=tc.init_method_std, seed=getattr(model_cfg, "seed", 1234))
        return model_chunks

    return hook


def attach_prores(model_cfg, prores: ProResConfig, train_iters=None):
    args = prores.finalize(model_cfg, train_iters)
    model_cfg.transformer_layer_spec = ProResLayerSpec(prores.schedule, prores.warmup_steps, prores.arch)
    set_prores_metadata(model_cfg, prores.as_dict())
    if prores.init != "megatron":
        add_pre_wrap_hook(model_cfg, init_hook(prores, model_cfg))
    return args


def _from_spec(spec):
    if isinstance(spec, ProResLayerSpec):
        return ProResConfig(schedule=spec.schedule, warmup_steps=spec.warmup_steps, arch=spec.arch)
    if isinstance(spec, dict) and str(spec.get("_target_", "")).endswith(".ProResLayerSpec"):
        return ProResConfig(**{k: spec.get(k) for k in ("schedule", "warmup_steps", "arch") if k in spec})
    return None


def prores_settings(model_cfg):
    recorded = prores_metadata(model_cfg)
    if recorded is not None:
        return ProResConfig.from_dict(recorded, f"extra_checkpoint_metadata[{METADATA_KEY!r}]")
    return _from_spec(getattr(model_cfg, "transformer_layer_spec", None))


def settings_from_run_config(run_config: dict, where: str = "run_config.yaml"):
    model = model_section(run_config)
    recorded = (model.get("extra_checkpoint_metadata") or {}).get(METADATA_KEY)
    if recorded is not None:
        return ProResConfig.from_dict(recorded, f"{where}: model.extra_checkpoint_metadata.{METADATA_KEY}")
    return _from_spec(model.get("transformer_layer_spec"))


def check_prores_spec(model_cfg, where: str = "cfg.model"):
    recorded = prores_metadata(model_cfg)
    if recorded is None:
        return None
    prores = ProResConfig.from_dict(recorded, f"{where}.extra_checkpoint_metadata[{METADATA_KEY!r}]")
    spec = getattr(model_cfg, "transformer_layer_spec", None)
    want = ProResLayerSpec(prores.schedule, prores.warmup_steps, prores.arch)
    if spec != want:
        raise ProResSpecLostError(
            f"{where} records ProRes (extra_checkpoint_metadata[{METADATA_KEY!r}]: schedule {prores.schedule}, "
            f"T {prores.warmup_steps}, arch {prores.arch}) but its transformer_layer_spec is {spec!r}, so the "
            "model would be built without (or with other) ProRes settings: a config reloaded from "
            "run_config.yaml loses the callable spec. Call prores_megatron.bridge.restore_prores_spec(cfg.model) "
            "before pretrain(), or attach_prores(cfg.model, ProResConfig(...)) again"
        )
    return prores


def restore_prores_spec(model_cfg):
    """Re-attach the spec the recorded settings describe (after a reload); returns them or None."""
    recorded = prores_metadata(model_cfg)
    if recorded is None:
        return None
    prores = ProResConfig.from_dict(recorded, f"extra_checkpoint_metadata[{METADATA_KEY!r}]")
    model_cfg.transformer_layer_spec = ProResLayerSpec(prores.schedule, prores.warmup_steps, prores.arch)
    return prores
