"""``prores-megatron depth``: the paper's depth study (its Fig. 1 and the spike scores) from the runs' logs.

Contract: the runs are every directory directly under ``--study-dir`` that holds logs
(examples/scripts/depth_study_gpu.sh writes ``RUN_DIR/L<layers>_<variant>``) and each ``--run
[LABEL=]PATH``, read by ``run_logs.load_run``. A run's depth is its settings' ``num_layers``; its
variant is "baseline" for ``--prores-schedule none`` (or no schedule), else "ProRes" (with the schedule's
name unless it is ``linear``). Per run:

- final loss (nats/token): ``--metric validation`` (default), the last ``lm loss validation`` in its
  TensorBoard logs (Megatron's held-out evaluation, which runs once more at the end of training);
  ``--metric train``, the mean training loss over the last ``--train-tail`` logged iterations;
- perplexity = exp(final loss);
- the offline spike scores of loss and gradient norm (``report_command.score``, the paper's
  settings unless ``--spike-*`` say otherwise; docs/method.md §8).

A run that lacks the metric, or whose last logged iteration is below its ``train_iters``, is listed
with the reason and left out of Figure 1; the spike figure leaves out only the latter. ``--out`` receives ``depth_study.md`` (per depth: ProRes
and baseline perplexity and their difference; per run: every number above), ``depth_study.json``
(the same numbers), ``perplexity_vs_depth.png`` (the paper's Fig. 1), ``spike_scores_vs_depth.png``
and ``training_loss.png``. Refused (exit 2, naming the flag or the paths): no run found, two runs
with the same depth and variant, a run whose logs give no number of layers.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..monitoring.run_logs import RunLog, RunLogError, find_sources, load_run
from ..monitoring.spike_score import SpikeConfig
from . import plots
from .depth_figure import against_depth
from .report_command import parse_run_specs, score, spike_config
from .usage import UsageError

INPUT_ERRORS = (RunLogError,)
BASELINE = "baseline"


def add_arguments(p) -> None:
    p.add_argument("--study-dir", help="a depth study's RUN_DIR: every directory directly under it with a "
                                       "prores_monitor.jsonl or TensorBoard events is a run")
    p.add_argument("--run", action="append", default=[], metavar="[LABEL=]PATH",
                   help="one more run (its directory or log file); repeatable")
    p.add_argument("--out", required=True, help="directory for depth_study.md/.json and the PNGs (created)")
    p.add_argument("--metric", choices=("validation", "train"), default="validation",
                   help="final loss: the last held-out evaluation (TensorBoard 'lm loss validation'; default), "
                        "or the mean training loss over the last --train-tail iterations")
    p.add_argument("--train-tail", type=int, default=100,
                   help="iterations averaged by --metric train (default: %(default)s)")
    p.add_argument("--title", default="Depth study: ProRes against the baseline", help="figure and report title")
    g = p.add_argument_group("spike score (defaults: the paper's; as in 'prores-megatron report')")
    defaults = SpikeConfig()
    for name, kind in (("window", int), ("threshold", float), ("min_history", int), ("start", float), ("end", float)):
        g.add_argument(f"--spike-{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                       help="default: %(default)s")


@dataclass
class DepthRun:
    label: str
    path: str
    depth: int
    variant: str
    schedule: Optional[str]
    warmup_steps: Optional[float]
    train_iters: Optional[int]
    last_iteration: Optional[int]
    loss: Optional[float]  # nats/token, the --metric
    loss_iteration: Optional[int]  # the iteration it was measured at (the tail's last)
    perplexity: Optional[float]
    loss_spike_score: Optional[float]  # percent
    grad_norm_spike_score: Optional[float]
    excluded: Optional[str]  # why Figure 1 leaves it out (None: drawn)
    complete: bool  # logged up to its train_iters (only complete runs are drawn)


def _run_paths(args) -> dict:
    runs = {}
    if args.study_dir:
        study = Path(args.study_dir)
        if not study.is_dir():
            raise UsageError(f"--study-dir {study}: no such directory")
        for sub in sorted(p for p in study.iterdir() if p.is_dir()):
            jsonl, tb = find_sources(sub)
            if jsonl or tb:
                runs[sub.name] = [sub]
    for label, paths in parse_run_specs(args.run).items():
        runs.setdefault(label, []).extend(paths)
    if not runs:
        raise UsageError("no runs: give --study-dir (a directory of run directories) or --run PATH"
                         + (f"; nothing under --study-dir {args.study_dir} has a prores_monitor.jsonl or "
                            "TensorBoard events" if args.study_dir else ""))
    return runs


def _variant(schedule: Optional[str]) -> str:
    if not schedule or schedule == "none":
        return BASELINE
    return "ProRes" if schedule == "linear" else f"ProRes ({schedule})"


def _final_loss(run: RunLog, metric: str, tail: int):
    """(loss, iteration, reason it is missing)."""
    if metric == "validation":
        v = run.validation
        if v is None or not len(v.iterations):
            return None, None, "no validation loss logged (TensorBoard 'lm loss validation'; try --metric train)"
        return float(v.values[-1]), int(v.iterations[-1]), None
    series = run.steps.get("lm_loss")
    if series is None or not len(series.iterations):
        return None, None, "no training loss logged"
    values = series.values[-tail:]
    if not np.isfinite(values).all():
        return None, None, f"non-finite training loss in the last {tail} iterations (diverged)"
    return float(values.mean()), int(series.iterations[-1]), None


def _measure(label, paths, args, config):
    """(DepthRun, the run's training-loss Series or None)."""
    run = load_run(label, paths)
    s = run.settings
    if not s.get("num_layers"):
        raise UsageError(f"run {label} ({', '.join(map(str, paths))}): its logs give no number of layers "
                         "(no monitor 'run' record and no TensorBoard arguments)")
    loss_series = run.steps.get("lm_loss")
    last = int(loss_series.iterations[-1]) if loss_series is not None and len(loss_series.iterations) else None
    loss, at, reason = _final_loss(run, args.metric, args.train_tail)
    train_iters = s.get("train_iters")
    complete = not train_iters or (last is not None and last >= train_iters)
    if not complete:  # its loss and spike score are not comparable with finished runs'
        reason = f"stopped at iteration {last} of {train_iters}"
    spikes = {}
    for name in ("lm_loss", "grad_norm"):
        result, _ = score(run.steps.get(name), config, run.not_trained)
        spikes[name] = result.score if result is not None else None
    return DepthRun(label=label, path=", ".join(map(str, paths)), depth=int(s["num_layers"]),
                    variant=_variant(s.get("schedule")), schedule=s.get("schedule"),
                    warmup_steps=s.get("warmup_steps"), train_iters=train_iters, last_iteration=last,
                    loss=loss, loss_iteration=at, perplexity=math.exp(loss) if loss is not None else None,
                    loss_spike_score=spikes["lm_loss"], grad_norm_spike_score=spikes["grad_norm"],
                    excluded=reason, complete=complete), loss_series


def _fmt(value, digits=4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pairs(runs: List[DepthRun]) -> List[dict]:
    """Per depth: each ProRes variant against the baseline, from runs drawn in the figures."""
    drawn = {(r.depth, r.variant): r for r in runs if r.excluded is None}
    pairs = []
    for (depth, variant), r in sorted(drawn.items()):
        base = drawn.get((depth, BASELINE))
        if variant == BASELINE or base is None:
            continue
        pairs.append(dict(depth=depth, variant=variant, perplexity=r.perplexity, baseline_perplexity=base.perplexity,
                          perplexity_difference=r.perplexity - base.perplexity, loss_difference=r.loss - base.loss))
    return pairs


def _figures(out: Path, runs: List[DepthRun], title: str, metric: str) -> List[str]:
    drawn = [r for r in runs if r.excluded is None]
    variants = sorted({r.variant for r in drawn}, key=lambda v: (v == BASELINE, v))  # ProRes first

    def lines(field):
        return {v: ([r.depth for r in drawn if r.variant == v], [getattr(r, field) for r in drawn if r.variant == v])
                for v in variants}

    what = "validation" if metric == "validation" else "training (tail mean)"
    files = []
    if drawn:
        against_depth(out / "perplexity_vs_depth.png",
                      [dict(lines=lines("perplexity"), ylabel=f"final {what} perplexity, exp(loss)", fmt="{:.2f}")],
                      f"{title}: final {what} perplexity against depth (the paper's Fig. 1)")
        files.append("perplexity_vs_depth.png")
    spiked = [r for r in runs if r.complete and (r.loss_spike_score is not None or r.grad_norm_spike_score is not None)]
    if spiked:
        spike_variants = sorted({r.variant for r in spiked}, key=lambda v: (v == BASELINE, v))
        panels = [dict(title=name, ylabel="spike score (% of scored iterations)", fmt="{:.2g}",
                       lines={v: ([r.depth for r in spiked if r.variant == v],
                                  [math.nan if getattr(r, field) is None else getattr(r, field)
                                   for r in spiked if r.variant == v]) for v in spike_variants})
                  for name, field in (("training loss", "loss_spike_score"),
                                      ("gradient norm", "grad_norm_spike_score"))]
        against_depth(out / "spike_scores_vs_depth.png", panels, f"{title}: spike scores against depth")
        files.append("spike_scores_vs_depth.png")
    return files


def _report(out: Path, runs: List[DepthRun], pairs, files, args, config: SpikeConfig, extra_files) -> str:
    what = ("the last held-out evaluation (TensorBoard 'lm loss validation')" if args.metric == "validation"
            else f"the mean training loss over the last {args.train_tail} logged iterations")
    lines = [f"# {args.title}", "",
             f"Final loss: {what}, in nats/token; perplexity = exp(loss). Spike scores: percentage of scored "
             f"iterations in [{config.start:g}·N, {config.end:g}·N] at ≥ {config.threshold:g} std from the mean of "
             f"the previous {config.window} (docs/method.md §8).", ""]
    if pairs:
        lines += ["## ProRes against the baseline", "",
                  "| layers | variant | perplexity | baseline perplexity | difference | loss difference |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['depth']} | {p['variant']} | {_fmt(p['perplexity'], 3)} | {_fmt(p['baseline_perplexity'], 3)} "
                  f"| {p['perplexity_difference']:+.3f} | {p['loss_difference']:+.4f} |" for p in pairs]
        lines.append("")
    lines += ["## Runs", "", "| run | layers | variant | T (steps/layer) | train iters | last iteration | final loss "
              "(at iteration) | perplexity | loss spike score (%) | grad-norm spike score (%) | left out because |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        at = f" ({r.loss_iteration})" if r.loss_iteration is not None else ""
        lines.append(f"| {r.label} | {r.depth} | {r.variant} | {r.warmup_steps if r.warmup_steps is not None else '–'} "
                     f"| {r.train_iters or '–'} | {r.last_iteration or '–'} | {_fmt(r.loss)}{at} | {_fmt(r.perplexity, 3)} "
                     f"| {_fmt(r.loss_spike_score, 3)} | {_fmt(r.grad_norm_spike_score, 3)} | {r.excluded or ''} |")
    lines.append("")
    lines += [f"![{name}]({name})\n" for name in files + extra_files]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.train_tail < 1:
        raise UsageError(f"--train-tail {args.train_tail}: must be >= 1")
    config = spike_config(args)
    paths = _run_paths(args)
    measured = sorted((_measure(label, p, args, config) for label, p in paths.items()),
                      key=lambda m: (m[0].depth, m[0].variant == BASELINE, m[0].variant))
    runs = [r for r, _ in measured]
    seen = {}
    for r in runs:
        key = (r.depth, r.variant)
        if key in seen:
            raise UsageError(f"two runs are {r.variant} at {r.depth} layers: {seen[key].path} and {r.path}; "
                             "give each study its own --study-dir")
        seen[key] = r
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = _pairs(runs)
    files = _figures(out, runs, args.title, args.metric)
    curves = []
    for r, series in measured:  # the training curves
        if series is not None and len(series.iterations):
            curves.append(dict(label=f"{r.label} ({r.depth} layers, {r.variant})", x=series.iterations, y=series.values))
    extra = []
    if curves:
        plots.curves(out / "training_loss.png", curves, f"{args.title}: training loss", "lm loss (nats/token)")
        extra.append("training_loss.png")
    (out / "depth_study.md").write_text(_report(out, runs, pairs, files, args, config, extra), encoding="utf-8")
    summary = dict(metric=args.metric, train_tail=args.train_tail if args.metric == "train" else None,
                   spike=config.as_dict(), runs=[asdict(r) for r in runs], pairs=pairs)
    (out / "depth_study.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for p in pairs:
        print(f"{p['depth']:4d} layers: {p['variant']} perplexity {p['perplexity']:.3f}, baseline "
              f"{p['baseline_perplexity']:.3f} ({p['perplexity_difference']:+.3f})")
    for r in runs:
        if r.excluded:
            print(f"{r.label}: left out of the figures: {r.excluded}")
    print(f"depth study: {out / 'depth_study.md'}")
    return 0
