"""``ProResCheckpointManager``: Megatron-Bridge's checkpoint manager with ProRes's resume guards.

Bridge builds the class named by ``cfg.checkpoint.custom_manager_class`` and calls it for every
load and save. ``install_checkpoint_manager(cfg)`` (called by ``prores_callback``) names this one
there: a string, so a reloaded ``run_config.yaml`` keeps it; a manager the user named already is
kept, with a warning that says what is then not guarded. It delegates to Bridge's own
``DefaultCheckpointManager`` and adds, in order:

- ``load(ctx)``: (1) ``check_prores_spec(cfg.model)`` on every rank: a config that records ProRes
  but lost its spec (a reloaded ``GPTModelConfig``) is refused with ``ProResSpecLostError`` before
  any weight is read, with or without our callback in the run; (2) on global rank 0, the ProRes
  settings the checkpoint being resumed recorded (its ``run_config.yaml``, read as data) are
  compared with this run's, and a difference is printed with the alpha jump it causes, as the
  Megatron-LM entry point does (``training.resume_check.settings_change``); (3) Bridge's load runs
  under ``checkpoint.restricted_dcp_loading``, so DCP's ``.metadata`` and every ``torch.load`` in
  it follow the checkpoint allow-list: a crafted checkpoint is refused (``UnsafePickleError`` naming
  the global) and its code never runs;
- ``save(ctx, callback_manager)``: the same spec check first, so a model built without ProRes is
  never saved under ProRes settings;
- everything else (``finalize_async_saves``, ``checkpointing_context``) is Bridge's manager's.
"""

import re
import warnings
from argparse import Namespace
from pathlib import Path

from ..checkpoint.base import TRACKER, CheckpointError, resolve_iteration_dir, safe_torch_load
from ..checkpoint.safe_unpickle import restricted_dcp_loading
from ..training.resume_check import settings_change
from .checkpoint_metadata import check_prores_spec
from .compat import BRIDGE_TRACKER, MANAGER_FIELD, RUN_CONFIG, default_checkpoint_manager, load_dir, transformer_config


def _rank0() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _iteration_of(it_dir: Path):
    match = re.fullmatch(r"iter_(\d+)", it_dir.name)
    if match:
        return int(match.group(1))
    state = it_dir / "train_state.pt"
    return int(safe_torch_load(state, str(state))["step"]) if state.is_file() else None


def resumed_iteration_dir(directory, ckpt_step=None):
    """(iteration dir, iteration) Bridge will load from ``directory``, or None when it holds none."""
    if not directory or not Path(directory).is_dir():
        return None
    path = Path(directory)
    if (path / RUN_CONFIG).is_file():
        it_dir = path  # an iteration directory given directly
    elif ckpt_step is not None:
        it_dir = path / f"iter_{int(ckpt_step):07d}"
    elif (path / TRACKER).is_file():
        it_dir = resolve_iteration_dir(path)
    elif (path / BRIDGE_TRACKER).is_file():
        it_dir = path / f"iter_{int(safe_torch_load(path / BRIDGE_TRACKER, str(path / BRIDGE_TRACKER))['step']):07d}"
    else:
        return None
    return (it_dir, _iteration_of(it_dir)) if (it_dir / RUN_CONFIG).is_file() else None


def resume_warning(model_cfg, directory, finetune, ckpt_step=None):
    """The warning for resuming ``directory`` (``compat.load_dir``) with other ProRes settings than
    the checkpoint's, or None."""
    from .checkpoint_metadata import prores_settings
    from .export import saved_args

    found = resumed_iteration_dir(directory, ckpt_step)
    if found is None:
        return None
    it_dir, iteration = found
    prores = prores_settings(model_cfg)
    args = prores.as_args(model_cfg) if prores is not None else Namespace()
    args.num_layers, args.finetune = transformer_config(model_cfg).num_layers, finetune
    return settings_change(saved_args(it_dir), iteration or 0, it_dir, args)


def refuse_pretrained_rewarm(prores, directory, finetune) -> None:
    """Bridge's form of ``validate_prores_args``'s fine-tuning refusal: a time-dependent schedule on a
    load that starts at iteration 0 (``checkpoint.finetune``, ``checkpoint.pretrained_checkpoint``
    while ``checkpoint.load`` holds none, a release checkpoint) raises ``ProResArgumentError`` before
    anything is read, unless ``ProResConfig(rewarm_pretrained=True)``."""
    from ..core.schedules import needs_warmup_steps
    from ..training.arguments import ProResArgumentError

    if prores is None or not directory or prores.rewarm_pretrained or not needs_warmup_steps(prores.schedule):
        return
    tracker = Path(directory) / TRACKER
    release = tracker.is_file() and tracker.read_text(encoding="utf-8", errors="replace").strip() == "release"
    if not (finetune or release):
        return
    how = (f"a release checkpoint ({directory})" if release else
           f"a fine-tuning load of {directory} (checkpoint.finetune / checkpoint.pretrained_checkpoint)")
    raise ProResArgumentError(
        f"ProResConfig(schedule={prores.schedule!r}) with {how}: the run starts at iteration 0, where "
        "alpha(l, 0) = 0 turns every pretrained layer into an identity, which then re-warms. For fine-tuning "
        "use ProResConfig(schedule='none') (Megatron-LM: --prores-schedule none); to re-warm on purpose set "
        "ProResConfig(rewarm_pretrained=True) (Megatron-LM: --prores-rewarm-pretrained). Megatron-LM flags that "
        "load at iteration 0: --finetune, --pretrained-checkpoint, a release checkpoint")


class ProResCheckpointManager:
    def __init__(self, checkpoint_config, inner=None):
        """``inner``: the manager to delegate to (default: Bridge's ``DefaultCheckpointManager``)."""
        self.checkpoint_config = checkpoint_config
        self.inner = default_checkpoint_manager(checkpoint_config) if inner is None else inner

    @property
    def checkpointing_context(self):
        return getattr(self.inner, "checkpointing_context", {})

    def load(self, ctx):
        from .checkpoint_metadata import prores_settings

        model_cfg = ctx.state.cfg.model
        check_prores_spec(model_cfg)
        directory, finetune = load_dir(self.checkpoint_config)
        prores = prores_settings(model_cfg)
        refuse_pretrained_rewarm(prores, directory, finetune)
        if _rank0():
            try:
                message = resume_warning(model_cfg, directory, finetune,
                                         getattr(self.checkpoint_config, "ckpt_step", None))
            except CheckpointError as err:  # Bridge's own load reports an unreadable checkpoint
                message = f"WARNING: ProRes could not compare its settings with the checkpoint's ({err})"
            if message:
                print(message, flush=True)
        if prores is not None and prores.trust_checkpoint:
            if _rank0():
                print(f"WARNING: ProRes: ProResConfig(trust_checkpoint=True): {directory or 'the checkpoint'} is "
                      "unpickled WITHOUT the allow-list; a crafted checkpoint can run code on every rank", flush=True)
            return self.inner.load(ctx)
        with restricted_dcp_loading(f"the checkpoint Megatron-Bridge loads ({directory or 'no path'})"):
            return self.inner.load(ctx)

    def save(self, ctx, callback_manager=None):
        check_prores_spec(ctx.state.cfg.model)
        return self.inner.save(ctx, callback_manager)

    def finalize_async_saves(self, state, blocking=False, terminate=False):
        return self.inner.finalize_async_saves(state, blocking=blocking, terminate=terminate)


MANAGER = f"{__name__}.{ProResCheckpointManager.__qualname__}"


def install_checkpoint_manager(cfg) -> bool:
    """Name ``ProResCheckpointManager`` in ``cfg.checkpoint``; False (and a warning) when another is named."""
    checkpoint = getattr(cfg, "checkpoint", None)
    if checkpoint is None:
        return False
    current = getattr(checkpoint, MANAGER_FIELD, None)
    if current in (None, MANAGER):
        setattr(checkpoint, MANAGER_FIELD, MANAGER)
        return True
    warnings.warn(
        f"cfg.checkpoint.{MANAGER_FIELD} is {current!r}: kept, so ProRes's checkpoint manager is not used: "
        "a resume does not compare ProRes settings, a reloaded config that lost the ProRes spec is refused "
        "only by ProResCallback, and the checkpoint is unpickled as your manager does. Run its load under "
        "prores_megatron.checkpoint.restricted_dcp_loading(), or name a subclass of ProResCheckpointManager "
        "whose __init__ passes inner=<your manager> (docs/bridge.md §3)",
        stacklevel=3)
    return False
