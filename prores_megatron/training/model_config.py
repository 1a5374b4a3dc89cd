"""ProRes in a Megatron-LM (0.19) GPT pretraining script: the pieces every entry point shares.

Contract: ``configure_model_config(model_cfg, args)`` takes the ``GPTModelConfig`` that
``gpt_config_from_args`` made and the parsed+validated args (``add_prores_args`` /
``validate_prores_args``), and plugs ProRes in: the layer spec (a callable, so every virtual-pipeline
chunk gets a fresh copy), the ``--prores-init`` re-draw (a pre-wrap hook, before DDP and the
bf16/fp16 wrapper), the coverage guard (a post-wrap hook: collective, while every rank is in
step) and the resume check (``resume_check``: a warning when the checkpoint being resumed was
trained with other ProRes settings). It also wraps Megatron-LM's ``train_step`` so that alpha is
written once per iteration, before the forward-backward pass and outside anything a CUDA graph
captures, and logged (``set_alpha_per_iteration``), and its ``load_checkpoint`` so that a
resumed checkpoint is unpickled only through the allow-list (``restrict_checkpoint_loading``).
This is the whole integration;
``prores_megatron.training.pretrain_gpt`` and the patch in ``patches/`` both use it.
``attach_monitor`` adds the optional ``--prores-monitor-interval`` monitor. Imports
``megatron.training`` lazily (inside functions), after the CPU shim.
"""

import functools

from .arguments import warmup_length


def prores_layer_spec_fn(args):
    """The callable GPTModelConfig.transformer_layer_spec: Megatron-LM's own spec for the run's
    flags, fresh per chunk, transformed by ``with_prores`` (the stock spec plus alpha)."""
    from ..core.layer_spec import with_prores

    def layer_spec(model_config, vp_stage=None):
        # The function Megatron-LM's GPTModelBuilder calls when no spec is given (0.19): it picks
        # the local/TE layer, the MoE block spec for --moe-layer-freq, heterogeneous configs, ...
        from megatron.training.models.gpt import default_layer_spec

        stock = default_layer_spec(model_config, vp_stage)
        return with_prores(stock, args.prores_schedule, warmup_length(args)[0], arch=args.prores_arch,
                           config=model_config.transformer)

    return layer_spec


def current_prores_step(args) -> int:
    """ProRes's t for the forward step Megatron is running: ``args.curr_iteration`` (completed
    optimizer steps, restored on resume) minus ``--prores-start-step``, never below 0; with
    ``--prores-warmup-samples``, ``args.consumed_train_samples`` (samples of the completed steps, which
    Megatron-LM adds after each train_step and restores on resume)."""
    from ..core.schedules import prores_step

    if getattr(args, "prores_warmup_samples", None) is not None:
        return prores_step(int(args.consumed_train_samples))
    return prores_step(args.curr_iteration, getattr(args, "prores_start_step", 0))


def init_hook(args):
    """pre_wrap_hook: re-draw the weights for --prores-init (before DDP and the fp16/bf16 wrapper)."""
    from ..core.init_schemes import apply_init

    def hook(model_chunks):
        from megatron.training import print_rank_0

        apply_init(model_chunks, args.prores_init, sigma=args.init_method_std, seed=args.seed)
        if args.prores_init != "megatron":
            print_rank_0(f"ProRes: weights initialised with --prores-init {args.prores_init} "
                         f"(sigma {args.init_method_std:g})")
        return model_chunks

    return hook


def coverage_hook(args):
    """post_wrap_hook: the collective coverage guard, once, while every rank is in step."""
    from ..core.stepping import set_prores_step

    def hook(model_chunks):
        from megatron.training import print_rank_0

        set_prores_step(model_chunks, 0)  # raises on every rank unless layers 1..L are all built
        print_rank_0(
            f"ProRes coverage check passed: global layers 1..{args.num_layers} each built once "
            f"across {args.pipeline_model_parallel_size} pipeline stage(s)"
        )
        return model_chunks

    return hook


def _wrap_training_function(name, make_wrapper):
    """Replace ``megatron.training.training.<name>`` with ``make_wrapper(inner)``. Megatron-LM 0.19
    has no per-iteration callback, but ``pretrain()`` and ``train()`` look these functions up as
    module globals at every call, so a replacement reaches the loop. Configuring again (a second
    model config in one process) replaces our earlier wrapper instead of stacking on it."""
    from megatron.training import training

    inner = getattr(training, name)
    inner = getattr(inner, "prores_inner", inner)
    wrapper = functools.wraps(inner)(make_wrapper(inner))
    wrapper.prores_inner = inner
    setattr(training, name, wrapper)


def set_alpha_per_iteration(args):
    """Set alpha on the host outside everything a CUDA graph captures (``--cuda-graph-impl
    full_iteration`` captures ``forward_backward_func``; ``local`` and ``transformer_engine`` capture
    layers), so every replay reads the current alpha buffer:
    - before each ``train_step``: t = ``current_prores_step(args)``, also logged (``AlphaLogger``);
    - before each ``evaluate_and_print_results``: the alpha of the last completed step, t = iteration
      - 1 - start step, as evaluation during training has it; so ``--skip-train`` and a relaunch
      after the last iteration evaluate the checkpoint's model, not alpha(l, 0)."""
    from ..core.schedules import prores_step
    from ..core.stepping import set_prores_step
    from .training_monitor import AlphaLogger

    log_alpha = AlphaLogger(args)
    last_trained = []  # the t of this launch's last train_step

    def around_train_step(inner):
        def train_step(forward_step_func, data_iterator, model, *rest, **kwargs):
            step = current_prores_step(args)
            set_prores_step(model, step, check_coverage=False)
            last_trained[:] = [step]
            log_alpha(args.curr_iteration, step, model)
            return inner(forward_step_func, data_iterator, model, *rest, **kwargs)

        return train_step

    def around_evaluation(inner):
        def evaluate_and_print_results(prefix, forward_step_func, data_iterator, model, iteration, *rest, **kwargs):
            if getattr(args, "prores_warmup_samples", None) is None:
                step = prores_step(max(int(iteration) - 1, 0), getattr(args, "prores_start_step", 0))
            elif last_trained:
                step = last_trained[0]
            else:  # no step in this launch: the last step's s, exact without --rampup-batch-size
                step = prores_step(max(int(args.consumed_train_samples) - int(args.global_batch_size), 0))
            set_prores_step(model, step, check_coverage=False)
            return inner(prefix, forward_step_func, data_iterator, model, iteration, *rest, **kwargs)

        return evaluate_and_print_results

    _wrap_training_function("train_step", around_train_step)
    _wrap_training_function("evaluate_and_print_results", around_evaluation)


def restrict_checkpoint_loading(args):
    """Megatron-LM's ``load_checkpoint`` (a resume, ``--pretrained-checkpoint``) under the
    checkpoint allow-list (``checkpoint.restricted_dcp_loading``): Megatron and DCP would otherwise
    unpickle ``.metadata`` and the common state without restriction, so a crafted checkpoint could
    run code on every rank. A refusal raises ``UnsafePickleError`` naming the global and the path,
    on every rank alike."""
    from ..checkpoint.safe_unpickle import restricted_dcp_loading

    if getattr(args, "prores_trust_checkpoint", False):
        return  # describe_prores_args says so loudly at start-up
    where = " / ".join(f"{flag} {value}" for flag, value in (("--load", getattr(args, "load", None)),
                       ("--pretrained-checkpoint", getattr(args, "pretrained_checkpoint", None))) if value)

    def around_load_checkpoint(inner):
        def load_checkpoint(*a, **kw):
            with restricted_dcp_loading(f"the checkpoint Megatron-LM loads ({where or 'no path'})"):
                return inner(*a, **kw)

        return load_checkpoint

    _wrap_training_function("load_checkpoint", around_load_checkpoint)


def configure_model_config(model_cfg, args):
    """Plug ProRes into ``model_cfg`` (see module docstring); returns it. With ProRes off (no
    ``--prores-schedule``: ``args.prores_enabled`` False) it returns ``model_cfg`` untouched and wraps
    nothing: the stock model, spec, hooks and loop."""
    from .resume_check import resume_check_hook

    if not getattr(args, "prores_enabled", True):
        return model_cfg
    set_alpha_per_iteration(args)
    restrict_checkpoint_loading(args)
    model_cfg.transformer_layer_spec = prores_layer_spec_fn(args)
    model_cfg.pre_wrap_hooks = [*model_cfg.pre_wrap_hooks, init_hook(args)]
    model_cfg.post_wrap_hooks = [*model_cfg.post_wrap_hooks, coverage_hook(args), resume_check_hook(args)]
    return model_cfg


def attach_monitor(model_cfg, args):
    """The ``--prores-monitor-interval`` monitor (None when 0); call its ``before_forward(step,
    model.training)`` from the forward step."""
    if not getattr(args, "prores_enabled", True) or args.prores_monitor_interval <= 0:
        return None
    from .training_monitor import TrainingMonitor

    monitor = TrainingMonitor(args)
    model_cfg.post_wrap_hooks = [*model_cfg.post_wrap_hooks, monitor.attach]
    _wrap_training_log(monitor)
    return monitor


def _wrap_training_log(monitor):
    """training_log sees every iteration's loss and grad norm: the monitor reads them there."""

    def around_training_log(inner):
        def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                         report_memory_flag, skipped_iter, grad_norm, *args, **kwargs):
            out = inner(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                        report_memory_flag, skipped_iter, grad_norm, *args, **kwargs)
            monitor.on_training_log(loss_dict, learning_rate, iteration, grad_norm, skipped_iter)
            return out

        return training_log

    _wrap_training_function("training_log", around_training_log)
