"""``prores-megatron report``: a markdown report with PNG plots comparing one or more runs.

Contract: ``--summary FILE`` (optional) is quoted first, verbatim. ``--run LABEL=PATH``
(repeatable; the same label twice merges the paths in order) names each run's logs
(``run_logs.load_run``); ``--out DIR`` receives ``report.md`` and its PNGs:
loss and gradient-norm curves with the detected spikes marked, the spike-score table (offline,
``spike_score`` with the ``--spike-*`` settings, next to the monitor's online value when logged),
validation loss, each ProRes run's alpha heatmap (from its settings, ``alpha_figure``), and, from
the monitor's layer records, the activation norm across depth over time (heatmap and per-layer
profiles, like the paper's Fig. 3) and the per-layer gradient norm. What a run lacks is said in the
report instead of plotted. Prints the report's path.
"""

import datetime
import re
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..core.alpha_plan import alpha_plan
from ..monitoring.run_logs import RunLog, RunLogError, Series, load_run
from ..monitoring.spike_score import SpikeConfig, SpikeResult, spike_score
from . import plots
from .alpha_figure import describe, write_alpha_heatmap
from .usage import UsageError

INPUT_ERRORS = (RunLogError,)
REPORT_FILE = "report.md"


def add_arguments(p) -> None:
    p.add_argument("--run", action="append", required=True, metavar="LABEL=PATH",
                   help="a run: its directory (searched for prores_monitor.jsonl and TensorBoard events), "
                        "or one of those files. Repeat for more runs; the same LABEL again merges paths "
                        "(e.g. a resumed run with a second TensorBoard directory)")
    p.add_argument("--out", required=True, help="directory for report.md and the PNGs (created)")
    p.add_argument("--title", default="ProRes training report", help="report title")
    p.add_argument("--summary", help="a text file (e.g. the demo's summary.txt) quoted near the top of the report, "
                                     "as its \"Summary\" section")
    g = p.add_argument_group("spike score (defaults: the paper's)")
    defaults = SpikeConfig()
    g.add_argument("--spike-window", type=int, default=defaults.window, help="trailing window in iterations (default: %(default)s)")
    g.add_argument("--spike-threshold", type=float, default=defaults.threshold, help="spike at >= this many std (default: %(default)s)")
    g.add_argument("--spike-min-history", type=int, default=defaults.min_history,
                   help="fewest history values behind a decision, for short runs (default: %(default)s)")
    g.add_argument("--spike-start", type=float, default=defaults.start, help="scored range start, fraction of the run (default: %(default)s)")
    g.add_argument("--spike-end", type=float, default=defaults.end, help="scored range end, fraction of the run (default: %(default)s)")


def parse_run_specs(specs: List[str]) -> Dict[str, List[Path]]:
    runs: Dict[str, List[Path]] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name or spec, spec
        if not label or not path:
            raise UsageError(f"--run {spec!r}: expected LABEL=PATH")
        runs.setdefault(label, []).append(Path(path))
    return runs


def spike_config(args) -> SpikeConfig:
    try:
        return SpikeConfig(window=args.spike_window, threshold=args.spike_threshold,
                           min_history=args.spike_min_history, start=args.spike_start, end=args.spike_end)
    except ValueError as err:
        name = re.search(r"spike score (\w+)=", str(err))
        flag = f"--spike-{name.group(1).replace('_', '-')}" if name else "--spike-*"
        raise UsageError(f"{flag}: {err}") from None


def score(series: Series, config: SpikeConfig, not_trained=()):
    """(SpikeResult or None, reason when None); ``not_trained``: iterations Megatron skipped."""
    if series is None or not len(series.iterations):
        return None, "not logged"
    gaps = series.gaps()
    if gaps:
        return None, (f"not logged at every iteration ({len(gaps)} missing between {series.iterations[0]} and "
                      f"{series.iterations[-1]}, first {gaps[0]}); the spike score needs every step "
                      "(--log-interval 1, or the monitor JSONL)")
    result = spike_score(series.values, first_iteration=int(series.iterations[0]), config=config,
                         not_trained=not_trained)
    if result.score is None:
        return result, (f"no iteration scored: {result.num_steps} iterations give candidates "
                        f"{result.first_candidate}..{result.last_candidate}, none with >= "
                        f"{config.min_history} values of history (--spike-min-history)")
    return result, None


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


class Report:
    def __init__(self, out: Path, title: str):
        self.out, self.lines = out, [f"# {title}", ""]

    def add(self, *lines):
        self.lines.extend(lines)

    def image(self, path: Path, alt: str):
        self.add(f"![{alt}]({path.relative_to(self.out).as_posix()})", "")

    def table(self, header, rows):
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        self.add(*("| " + " | ".join(str(c) for c in row) + " |" for row in rows))
        self.add("")


def _curve_section(report: Report, runs, name, results, title, ylabel, logy, filename):
    lines = []
    for run in runs:
        series = run.steps.get(name)
        if series is None or not len(series.iterations):
            continue
        line = dict(label=run.label, x=series.iterations, y=series.values)
        result = results.get((run.label, name))
        if result is not None and result.spike_iterations:
            at = np.searchsorted(series.iterations, result.spike_iterations)
            finite = np.isfinite(series.values[at])
            line.update(spikes_x=series.iterations[at][finite], spikes_y=series.values[at][finite],
                        spike_label=f"{run.label}: spikes (≥ {result.config.threshold:g}σ from the trailing mean)")
        lines.append(line)
    report.add(f"## {title}", "")
    if not lines:
        report.add(f"No run logged {ylabel}.", "")
        return
    report.image(plots.curves(report.out / filename, lines, title, ylabel, logy=logy), title)


def _spike_section(report: Report, runs, config: SpikeConfig, results: dict, reasons: dict):
    report.add("## Spike scores", "",
               f"Percentage of scored iterations t with |y_t − mean| ≥ {config.threshold:g}·std of the previous "
               f"{config.window} iterations (population std, two-sided; a non-finite value is a spike), over "
               f"t in [{config.start:g}·N, {config.end:g}·N] for a run of N logged iterations; iterations with fewer "
               f"than {config.min_history} values of history are not scored (docs/method.md §8). "
               "'window used' is the shortest history behind a scored iteration.", "")
    rows, notes = [], []
    for run in runs:
        online = run.online_spikes or {}  # null (nothing scored) shows as "–"
        for name, title, key in (("lm_loss", "loss", "loss_score"), ("grad_norm", "grad norm", "grad_norm_score")):
            result: SpikeResult = results.get((run.label, name))
            reason = reasons.get((run.label, name))
            scored = result is not None and result.score is not None
            rows.append([
                run.label, title,
                f"{result.score:.3f}" if scored else "n/a",
                f"{result.spikes} / {result.evaluated}" if scored else "–",
                (f"{result.first_candidate}..{result.last_candidate}"
                 + (f" ({result.skipped} short of history)" if result.skipped else "")) if scored else "–",
                f"{result.window_used}–{result.window_max}" if scored else "–",
                f"{online[key]:.3f}" if isinstance(online.get(key), (int, float)) else "–",
            ])
            if reason:
                notes.append(f"- {run.label}, {title}: {reason}.")
            elif result.spike_iterations:
                shown = ", ".join(map(str, result.spike_iterations[:20]))
                more = f" (+{len(result.spike_iterations) - 20} more)" if len(result.spike_iterations) > 20 else ""
                notes.append(f"- {run.label}, {title}: spikes at iterations {shown}{more}.")
    report.table(["run", "metric", "spike score (%)", "spikes / scored", "candidate iterations", "window used",
                  "monitor (online)"], rows)
    if any(r.online_spikes for r in runs):
        report.add("The online column is the monitor's own `spikes` record, computed during training with the "
                   "run's monitor settings (its `run` record's `spike` entry).", "")
    for run in runs:
        used = run.settings.get("spike") if run.online_spikes else None
        differs = used and any(used.get(k) != v for k, v in config.as_dict().items() if k in used)
        if differs:  # then the two columns legitimately disagree
            notes.append(f"- {run.label}: the monitor scored with " + ", ".join(f"{k} {used[k]}" for k in sorted(used))
                         + "; this report with " + ", ".join(f"{k} {v}" for k, v in sorted(config.as_dict().items()))
                         + " (--spike-*).")
    report.add(*notes, "")


def _validation_section(report: Report, runs):
    lines = [dict(label=r.label, x=r.validation.iterations, y=r.validation.values, marker="o")
             for r in runs if r.validation is not None and len(r.validation.iterations)]
    report.add("## Validation loss", "")
    if not lines:
        report.add("No run has validation loss in its TensorBoard logs ('lm loss validation').", "")
        return
    report.image(plots.curves(report.out / "validation_loss.png", lines, "Validation loss",
                              "validation lm loss (nats/token)"), "validation loss")
    report.table(["run", "last evaluated iteration", "validation loss", "best validation loss"],
                 [[l["label"], int(l["x"][-1]), _fmt(float(l["y"][-1])), _fmt(float(np.nanmin(l["y"])))] for l in lines])


def _alpha_section(report: Report, runs):
    report.add("## ProRes α schedule", "")
    for run in runs:
        s = run.settings
        if not s.get("schedule") or s.get("schedule") == "none":
            report.add(f"- {run.label}: no ProRes schedule in its settings (α ≡ 1, the plain model).")
            continue
        try:
            plan = alpha_plan(s["schedule"], s.get("warmup_steps"), int(s["num_layers"]), s.get("train_iters"))
        except (ValueError, TypeError, KeyError) as err:
            report.add(f"- {run.label}: cannot draw its α plan from {run.settings_source} ({err}).")
            continue
        path = write_alpha_heatmap(plan, report.out / f"alpha_{_safe(run.label)}.png", label=run.label)
        report.add(f"### {run.label}", "", f"{describe(plan)} (from {run.settings_source}).", "")
        for w in plan.warnings:
            report.add(f"> warning: {w}", "")
        report.image(path, f"alpha heatmap {run.label}")
    report.add("")


def _layer_section(report: Report, runs):
    report.add("## Activation norm across depth", "")
    panels = [(r.label, r.layers["resid_norm"].iterations, r.layers["resid_norm"].values)
              for r in runs if "resid_norm" in r.layers and len(r.layers["resid_norm"].iterations)]
    if not panels:
        report.add("No run has the monitor's per-layer records (`layers` in prores_monitor.jsonl; enable "
                   "--prores-monitor-interval).", "")
        return
    # One scale for all runs, as in the paper's Fig. 3; logarithmic when the runs differ so much
    # (exponential growth with depth against linear) that a linear one would blacken one of them.
    log = plots.wide_range([v for _, _, v in panels])
    report.add("Mean over tokens of the per-token L2 norm of each layer's output, at the monitored iterations "
               f"(the paper's Fig. 3). One {'logarithmic' if log else 'linear'} colour scale for all runs.", "")
    label = "mean per-token L2 norm of the layer output" + (" (log scale)" if log else "")
    report.image(plots.layer_heatmaps(report.out / "activation_norm.png", panels,
                                      "Activation norm across depth over training", label, log_colour=log),
                 "activation norm heatmap")
    report.image(plots.layer_profiles(report.out / "activation_norm_profiles.png", panels,
                                      "Activation norm against depth at selected iterations", label, logy=log),
                 "activation norm profiles")
    grads = [(r.label, r.layers["grad_norm"].iterations, r.layers["grad_norm"].values)
             for r in runs if "grad_norm" in r.layers and len(r.layers["grad_norm"].iterations)]
    if grads:
        report.add("### Gradient norm per layer", "")
        report.image(plots.layer_heatmaps(report.out / "layer_grad_norm.png", grads,
                                          "Gradient norm of each layer's parameters", "L2 norm of the layer's gradient "
                                          "(log scale)", log_colour=True), "per-layer gradient norm")


def _runs_section(report: Report, runs):
    rows = []
    for r in runs:
        s, loss = r.settings, r.steps.get("lm_loss")
        logged = f"{loss.iterations[0]}..{loss.iterations[-1]} ({len(loss.iterations)})" if loss is not None and len(loss.iterations) else "–"
        rows.append([r.label, s.get("schedule") or "–", _fmt(s.get("warmup_steps")), _fmt(s.get("num_layers")),
                     _fmt(s.get("train_iters")), logged, r.steps_source or "–",
                     _fmt(float(loss.values[-1])) if loss is not None and len(loss.values) else "–"])
    report.add("## Runs", "")
    report.table(["run", "schedule", "T (steps/layer)", "L", "train iters", "iterations logged (count)",
                  "step metrics from", "last loss"], rows)
    for r in runs:
        report.add(f"- {r.label}: " + "; ".join(f"`{s}`" for s in r.sources))
        report.add(*(f"  - note: {n}" for n in r.notes))
    report.add("")


def run(args) -> int:
    config = spike_config(args)
    runs: List[RunLog] = [load_run(label, paths) for label, paths in parse_run_specs(args.run).items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, reasons = {}, {}
    for r in runs:
        for name in ("lm_loss", "grad_norm"):
            results[(r.label, name)], reasons[(r.label, name)] = score(r.steps.get(name), config, r.not_trained)
    report = Report(out, args.title)
    report.add(f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
               f"`prores-megatron report` from {len(runs)} run(s).", "")
    if args.summary:
        summary = Path(args.summary)
        if not summary.is_file():
            raise UsageError(f"--summary {summary}: no such file")
        report.add("## Summary", "", *[f"    {line}" for line in summary.read_text(encoding="utf-8").splitlines()], "")
    _runs_section(report, runs)
    _curve_section(report, runs, "lm_loss", results, "Training loss", "lm loss (nats/token)", False, "loss.png")
    _curve_section(report, runs, "grad_norm", results, "Gradient norm",
                   "global gradient L2 norm (before clipping)", True, "grad_norm.png")
    _spike_section(report, runs, config, results, reasons)
    _validation_section(report, runs)
    _alpha_section(report, runs)
    _layer_section(report, runs)
    path = out / REPORT_FILE
    path.write_text("\n".join(report.lines).rstrip() + "\n", encoding="utf-8")
    print(f"report: {path}")
    return 0
