"""``ProResCallback``: alpha and the depth monitor in Megatron-Bridge's training loop (``pretrain(...,
callbacks=[...])``), the Bridge counterpart of ``training.model_config``'s train_step wrapper.

Contract (every rank runs every event; t = completed optimizer steps - ``start_step``, never < 0):
- ``on_train_start``: refuses a config that records ProRes but lost its spec
  (``check_prores_spec``), then ``set_prores_step(model, t)`` with the coverage guard (a collective
  over the pipeline group, here where every rank is in step; it also refuses a model built
  without ProRes layers) and, with ``monitor_interval`` > 0, attaches the Megatron-LM
  ``TrainingMonitor`` (after Bridge installed ``finalize_model_grads_func``, which it wraps);
- ``on_train_step_start``: ``set_prores_step(model, t)`` in place (host writes into the alpha
  buffers). Bridge fires it after TE CUDA-graph capture and before the step, outside every captured
  region, with ``state.train_state.step`` = the steps completed so far, so every replay reads this
  step's alpha; arms the monitor on its iterations;
- ``on_train_step_end``: the step's ``loss_dict["lm loss"]`` and ``grad_norm`` go to the monitor
  (the JSONL record and the online spike score; per-layer statistics on monitored iterations) as
  iteration ``train_state.step + 1``: Bridge fires this event before it increments the step;
- ``on_eval_start`` / ``on_test_start``: alpha of the last completed step (t - 1), as Megatron-LM's
  evaluation during training has it (Bridge evaluates after the increment); ``on_train_end``: the
  spike scores are written.
``prores_callback(cfg, prores)`` plugs ``prores`` into ``cfg.model`` (``attach_prores``), names
``ProResCheckpointManager`` in ``cfg.checkpoint`` (``install_checkpoint_manager``) and returns the
callback; it is the one call a recipe makes.
"""

from ..core.schedules import prores_step
from ..core.stepping import set_prores_step
from .checkpoint_manager import install_checkpoint_manager
from .checkpoint_metadata import attach_prores, check_prores_spec
from .compat import Callback, completed_steps


def _get(obj, path, default=None):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return default
    return obj


class ProResCallback(Callback):
    def __init__(self, args):
        """``args``: the validated settings under Megatron-LM's names (``ProResConfig.finalize``)."""
        self.args = args
        self.monitor = None

    def _step(self, context, completed):
        t = prores_step(completed, self.args.prores_start_step)
        set_prores_step(context.model, t, check_coverage=False)
        return t

    def on_train_start(self, context):
        model_cfg = _get(context.state, "cfg.model")
        if model_cfg is not None:
            check_prores_spec(model_cfg)
        completed = completed_steps(context.state)
        set_prores_step(context.model, prores_step(completed, self.args.prores_start_step))  # coverage guard
        if self.args.prores_monitor_interval > 0 and self.monitor is None:
            from ..training.training_monitor import TrainingMonitor

            self.monitor = TrainingMonitor(self.args)
            self.monitor.attach(context.model)

    def on_train_step_start(self, context):
        completed = completed_steps(context.state)
        self._step(context, completed)
        if self.monitor is not None:
            self.monitor.before_forward(completed, True)

    def on_train_step_end(self, context):
        if self.monitor is None:
            return
        optimizer = context.optimizer
        groups = getattr(optimizer, "param_groups", None) or [{}]
        # Bridge fires on_train_step_end before train_state.step += 1: the step just run is still
        # uncounted, so its 1-based iteration (Megatron-LM's training_log numbering) is completed + 1.
        self.monitor.on_training_log(context.loss_dict or {}, groups[0].get("lr"), completed_steps(context.state) + 1,
                                     context.grad_norm, bool(context.skipped_iter))

    def on_eval_start(self, context):
        self._step(context, max(completed_steps(context.state) - 1, 0))

    on_test_start = on_eval_start

    def on_train_end(self, context):
        if self.monitor is not None:
            self.monitor.finish(completed_steps(context.state))


def prores_callback(cfg, prores) -> ProResCallback:
    """Plug ``prores`` (a ``ProResConfig``) into Bridge's ``cfg`` (a ConfigContainer); the callback."""
    args = attach_prores(cfg.model, prores, train_iters=_get(cfg, "train.train_iters"))
    install_checkpoint_manager(cfg)
    args.save = _get(cfg, "checkpoint.save")
    args.tensorboard_dir = _get(cfg, "logger.tensorboard_dir")
    args.use_distributed_optimizer = bool(_get(cfg, "optimizer.use_distributed_optimizer", False))
    args.sequence_parallel = bool(args.sequence_parallel)
    return ProResCallback(args)
