"""What the Megatron-LM loop logs about ProRes: alpha per layer, and the depth monitor.

Contract: ``AlphaLogger(args)(completed, step, model)`` writes alpha per layer, as the model's
buffers hold it (gathered over the pipeline group, so every rank calls it), to the training log and
a summary to Megatron's TensorBoard/W&B writers on each launch's first step and every
``--prores-log-interval`` while a layer is still warming up, then once "warmup complete". ``TrainingMonitor`` is the optional
in-training depth monitor (``--prores-monitor-interval N``): every N iterations the ProRes
residuals of every layer are armed for one iteration (``monitoring.layer_stats.LayerMonitor``);
when Megatron finalises that iteration's gradients (our wrapper around
``config.finalize_model_grads_func``, called on every rank at the same point) the activation table
and the per-layer gradient norms are reduced over DP/TP/PP. Megatron's ``training_log`` (wrapped)
then hands over the iteration's loss and global grad norm, and the last rank writes:
  - ``{"kind": "step", ...}`` every iteration (loss and grad norm, for the spike score); an
    iteration Megatron skipped (``--iterations-to-skip``: no training_log) is written with
    ``"not_trained": true`` and no values when the next one is logged, and is no spike,
  - ``{"kind": "layers", ...}`` on monitored iterations: alpha, attention/MLP branch RMS (before
    alpha), layer-output RMS and mean per-token L2 norm, per-layer gradient norm (under
    ``--use-distributed-optimizer`` summed from each rank's shard of the reduced gradient),
  - ``{"kind": "spikes", ...}`` when training ends (online spike scores),
to ``prores_monitor.jsonl`` next to the checkpoints (``--save``), to TensorBoard/W&B through
Megatron's writers (``prores/<metric>/layer_NNN``) and a line in the training log.
Off-interval iterations cost one attribute test per residual call.
"""

import json
import math
import os
import warnings

from ..core.stepping import model_alphas
from ..monitoring.layer_stats import LayerMonitor, layer_grad_sq, layer_grad_sq_sharded, summarize
from ..monitoring.run_logs import MONITOR_FILE
from .arguments import warmup_length


class AlphaLogger:
    """Writes alpha to the training log and Megatron's TensorBoard/W&B writers (docs/usage.md, "What the run logs"):
    on the first training step of every launch (a fresh start or a resume), then every
    ``--prores-log-interval`` (default ``--log-interval``) iterations while some layer is still
    warming up, then once a line saying the warmup is complete, then nothing. Whether a layer is
    still warming is schedule arithmetic on the host (the same on every rank), so an iteration that
    logs nothing reads no buffer and syncs nothing; the logged values are read back from the model's
    alpha buffers (``model_alphas``). TensorBoard/W&B get the summary (``prores/alpha_min``,
    ``alpha_mean``, ``alpha_max``, ``layers_warming``, ``layers_fully_on``); per-layer scalars
    (``prores/alpha/layer_NNN``) only with ``--prores-log-alpha-per-layer``."""

    def __init__(self, args):
        from ..core.schedules import layer_full_step, needs_warmup_steps

        self.args = args
        self.last_logged = None
        self.interval = getattr(args, "prores_log_interval", None) or args.log_interval
        self.complete_said = False
        self.T, self.unit, self.count_name = warmup_length(args)
        T = self.T
        L = args.num_layers
        # The t from which every layer is at alpha = 1; None for a static schedule (nothing changes).
        self.all_on = (max(layer_full_step(args.prores_schedule, l, T, L) for l in range(1, L + 1))
                       if needs_warmup_steps(args.prores_schedule) else None)

    def __call__(self, completed: int, step: int, model) -> None:
        """``completed``: optimizer steps done (``args.curr_iteration``); ``step``: ProRes's t (or s,
        consumed samples); ``model``: the model chunks, whose alpha buffers are read."""
        args = self.args
        iteration = completed + 1  # the iteration this forward step computes (Megatron counts from 1)
        first = self.last_logged is None
        if self.last_logged == iteration:
            return
        warming = self.all_on is not None and step < self.all_on
        completes = self.all_on is not None and not warming and not self.complete_said
        if not (first or completes or (warming and iteration % self.interval == 0)):
            return  # nothing logged: no buffer read, no collective, no host sync
        self.last_logged = iteration
        from megatron.training import get_tensorboard_writer, get_wandb_writer, print_rank_last

        table = model_alphas(model, args.num_layers)
        L = len(table)
        full = sum(a == 1.0 for a in table)
        count = f"{'samples s' if self.unit == 'samples' else 'step t'}={step}"
        if completes:
            self.complete_said = True
        if completes and not first:
            print_rank_last(f" [ProRes] iteration {iteration:8d} | {count} | warmup complete: all {L} layers at "
                            f"alpha = 1 from {self.count_name} = {self.all_on:g}; no more alpha lines")
        else:
            launch = ""
            if first:
                T = self.T
                unit = "samples" if self.unit == "samples" else "steps"
                launch = (f"first step of this launch: schedule {args.prores_schedule}, "
                          f"{'S' if self.unit == 'samples' else 'T'} = {'n/a' if T is None else f'{T:g}'} {unit}, "
                          f"--prores-start-step {getattr(args, 'prores_start_step', 0)} | ")
            tail = " | warmup complete" if completes else ""
            print_rank_last(
                f" [ProRes] iteration {iteration:8d} | {launch}{count} | layers at alpha=1: "
                f"{full}/{L} | alpha per layer: " + " ".join(f"{a:.4g}" for a in table) + tail
            )
        logs = {"prores/alpha_min": min(table), "prores/alpha_mean": sum(table) / L, "prores/alpha_max": max(table),
                "prores/layers_warming": L - full, "prores/layers_fully_on": full}
        if getattr(args, "prores_log_alpha_per_layer", False):
            logs.update({f"prores/alpha/layer_{layer:03d}": a for layer, a in enumerate(table, start=1)})
        writer = get_tensorboard_writer()
        if writer is not None:
            for tag, value in logs.items():
                writer.add_scalar(tag, value, iteration)
        wandb_writer = get_wandb_writer()
        if wandb_writer is not None:
            wandb_writer.log(logs, iteration)


def monitor_path(args) -> str:
    if args.prores_monitor_file:
        return args.prores_monitor_file
    for directory in (args.save, args.tensorboard_dir):
        if directory:
            return os.path.join(directory, MONITOR_FILE)
    return os.path.abspath(MONITOR_FILE)


class TrainingMonitor:
    """Glue between the Megatron-LM loop and ``monitoring.layer_stats`` (see module docstring)."""

    def __init__(self, args):
        self.args = args
        self.interval = args.prores_monitor_interval
        self.path = monitor_path(args)
        self.layer_monitor = None
        self.model = None
        self.armed_step = None
        self.pending = None  # (step, table, grad_sq) of the last monitored iteration
        self.spikes = None
        self.logged = {}
        self.file = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def _is_writer(self) -> bool:
        import torch

        return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1

    def attach(self, model_chunks):
        """post_wrap_hook: arm-able layers, the finalize wrapper, and the run record."""
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.utils import get_model_config

        self.model = model_chunks
        self.layer_monitor = LayerMonitor(model_chunks)
        config = get_model_config(model_chunks[0])
        inner = config.finalize_model_grads_func or finalize_model_grads

        def finalize_then_measure(*args, **kwargs):
            out = inner(*args, **kwargs)
            self._after_grads()
            return out

        # Megatron's train() keeps a finalize function installed before it (0.19 behaviour).
        config.finalize_model_grads_func = finalize_then_measure
        from ..monitoring.spike_score import SpikeConfig

        a = self.args
        self.spike_config = SpikeConfig(window=a.prores_spike_window, threshold=a.prores_spike_threshold,
                                        min_history=a.prores_spike_min_history)
        if self._is_writer():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.logged = _logged_steps(self.path)  # a resumed run's history, for the spike score
            self.file = open(self.path, "a", encoding="utf-8")
            self._write({
                "kind": "run", "schedule": a.prores_schedule, "warmup_steps": a.prores_warmup_steps,
                "warmup_samples": getattr(a, "prores_warmup_samples", None),
                "num_layers": a.num_layers, "arch": a.prores_arch, "init": a.prores_init,
                "train_iters": a.train_iters, "monitor_interval": self.interval,
                "spike": self.spike_config.as_dict(),
            })
        return model_chunks

    def before_forward(self, step: int, training: bool) -> None:
        """From the forward step: arm on the first micro-batch of a monitored iteration."""
        if not training or self.layer_monitor is None or self.armed_step == step:
            return
        if (step + 1) % self.interval == 0:
            self.layer_monitor.start()
            self.armed_step = step

    def _after_grads(self):
        if self.armed_step is None:
            return
        from megatron.core import parallel_state as ps

        a = self.args
        self.layer_monitor.stop()
        table = self.layer_monitor.reduce(
            a.num_layers,
            dp_group=ps.get_data_parallel_group(with_context_parallel=True),
            pp_group=ps.get_pipeline_model_parallel_group(),
            tp_group=ps.get_tensor_model_parallel_group(),
            sequence_parallel=a.sequence_parallel,
        )
        pp, tp = ps.get_pipeline_model_parallel_group(), ps.get_tensor_model_parallel_group()
        if a.use_distributed_optimizer:
            # The distributed optimizer reduce-scatters: each rank sums its own shard, then all-reduce.
            grad_sq = layer_grad_sq_sharded(self.model, a.num_layers, pp_group=pp, tp_group=tp)
        else:
            grad_sq = layer_grad_sq(self.model, a.num_layers, pp_group=pp, tp_group=tp)
        self.pending = (self.armed_step, table, grad_sq)
        self.armed_step = None

    def _start_spike_detectors(self, iteration):
        """Online spike detectors, fed the run's earlier iterations when this launch resumed."""
        from ..monitoring.spike_score import OnlineSpikeDetector

        a, config = self.args, self.spike_config
        earlier = [self.logged.get(i) for i in range(1, iteration)]
        first = 1 if all(r is not None for r in earlier) else iteration  # a gap: start afresh
        self.spikes = {k: OnlineSpikeDetector(a.train_iters, config, first_iteration=first)
                       for k in ("lm_loss", "grad_norm")}
        for i in range(first, iteration):
            for key, detector in self.spikes.items():
                if earlier[i - 1].get("not_trained"):
                    detector.not_trained(i)
                else:
                    detector.update(i, earlier[i - 1][key])

    def on_training_log(self, loss_dict, learning_rate, iteration, grad_norm, skipped_iter):
        """From the wrapped training_log, every iteration, on every rank."""
        if self.layer_monitor is None:
            return
        step = iteration - 1
        loss = loss_dict.get("lm loss")
        loss = float(loss) if loss is not None else None
        if loss is not None and self.file is not None:
            if self.spikes is None:
                self._start_spike_detectors(iteration)
            grad = None if grad_norm is None else float(grad_norm)
            # Iterations in between were skipped by Megatron (--iterations-to-skip, or its rerun
            # machine's list): its loop moves on without a training_log, so they come with no values.
            for missing in range(self.spikes["lm_loss"].next_iteration, iteration):
                for detector in self.spikes.values():
                    detector.not_trained(missing)
                self._write({"kind": "step", "iteration": missing, "step": missing - 1, "lm_loss": None,
                             "grad_norm": None, "lr": None, "skipped": True, "not_trained": True})
            self.spikes["lm_loss"].update(iteration, loss)
            self.spikes["grad_norm"].update(iteration, float("nan") if grad is None else grad)
            self._write({"kind": "step", "iteration": iteration, "step": step, "lm_loss": loss,
                         "grad_norm": None if grad_norm is None else float(grad_norm),
                         "lr": learning_rate, "skipped": bool(skipped_iter)})
        if self.pending is not None and self.pending[0] == step:
            self._log_layers(iteration, *self.pending)
            self.pending = None
        if iteration >= self.args.train_iters and self.file is not None:
            self.finish(iteration)

    def _log_layers(self, iteration, step, table, grad_sq):
        stats = summarize(table)  # its "alpha" is what the model's residual buffers held
        stats["grad_norm"] = None if grad_sq is None else [math.sqrt(v) for v in grad_sq.tolist()]
        if self.file is None:
            return
        self._write({"kind": "layers", "iteration": iteration, "step": step, **stats})
        from megatron.training import get_tensorboard_writer, get_wandb_writer, print_rank_last

        fmt = lambda xs: " ".join(f"{x:.3g}" for x in xs)
        print_rank_last(f" [ProRes monitor] iteration {iteration:8d} | output RMS by layer: "
                        f"{fmt(stats['resid_rms'])} | grad norm by layer: "
                        f"{fmt(stats['grad_norm']) if stats['grad_norm'] else 'n/a'}")
        metrics = ("attn_rms", "mlp_rms", "resid_rms", "resid_norm", "grad_norm")
        logs = {f"prores/{m}/layer_{l:03d}": v for m in metrics if stats[m] is not None
                for l, v in enumerate(stats[m], start=1)}
        writer = get_tensorboard_writer()
        if writer is not None:
            for tag, value in logs.items():
                writer.add_scalar(tag, value, iteration)
        wandb_writer = get_wandb_writer()
        if wandb_writer is not None:
            wandb_writer.log(logs, iteration)

    def finish(self, iteration):
        if self.file is None or self.file.closed or self.spikes is None:
            return
        loss, grad = self.spikes["lm_loss"].result(), self.spikes["grad_norm"].result()
        self._write({"kind": "spikes", "iteration": iteration, "loss_score": loss.score,
                     "grad_norm_score": grad.score, "window_used": loss.window_used,
                     "evaluated_steps": loss.evaluated, "loss_spike_iterations": loss.spike_iterations,
                     "grad_norm_spike_iterations": grad.spike_iterations})
        from megatron.training import print_rank_last

        fmt = lambda v: "n/a (too few steps)" if v is None else f"{v:.3g} %"
        print_rank_last(f" [ProRes monitor] spike score over 10-90% of training: loss {fmt(loss.score)}, "
                        f"grad norm {fmt(grad.score)} (window used {loss.window_used}, "
                        f"{loss.evaluated} steps judged); written to {self.path}")
        self.file.close()

    def _write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a crash keeps every line written so far


def _logged_steps(path):
    """{iteration: {"lm_loss", "grad_norm"}} from an existing monitor file (the last record wins,
    as a run resumed from an earlier checkpoint logs those iterations again)."""
    from pathlib import Path

    from ..monitoring.run_logs import RunLogError, read_monitor

    if not os.path.exists(path):
        return {}
    try:
        records = read_monitor(Path(path))
    except RunLogError as err:  # e.g. a line cut by a crash: the spike score starts afresh
        warnings.warn(f"{err}; the online spike score restarts at this launch")
        return {}
    nan = float("nan")
    return {rec["iteration"]: {"lm_loss": rec["lm_loss"], "grad_norm": nan if rec.get("grad_norm") is None
                               else rec["grad_norm"], "not_trained": bool(rec.get("not_trained"))}
            for _, rec in records["step"]}
