"""The depth study's statistics, tables and figures, from the per-run results of bench_depth.py.

Contract:
- ``mean_ci(values, level=0.95) -> (mean, half_width, n)``: the Student-t interval of the mean
  (half width t_{(1+level)/2, n-1} * s / sqrt(n), s the sample standard deviation); half width NaN
  for n < 2.
- ``depth_rows(results)``: per depth, each variant's final validation loss and the paired
  difference ProRes - baseline (per seed, both on the same validation windows) as mean +- interval,
  with the validation standard errors and the stability / early-convergence indicators.
- ``write_report(out, rows, results, meta)``: ``report.md`` (the tables) and the PNG figures
  ``val_loss_vs_depth.png``, ``delta_vs_depth.png``, ``activation_norm_depth.png``,
  ``train_loss_curves.png``; returns the paths written.
"""

import math
from pathlib import Path
from statistics import mean

import numpy as np

VARIANTS = ("prores", "baseline")
FIGURE_SIZE = (1200, 800)  # pixels, every figure
_DPI = 100


def student_t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_ci(values, level: float = 0.95):
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = mean(values)
    if n < 2:
        return m, float("nan"), n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, student_t_quantile((1 + level) / 2, n - 1) * s / math.sqrt(n), n


def paired_se(a, b) -> float:
    """Standard error of mean(a - b) over paired validation windows (same windows, two models)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def _fmt(m, h, digits=4):
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


# Per-run quantities compared seed by seed: name -> how to read it from a run's result.
PAIRED_STABILITY = {
    "clipped_steps": lambda r: r.get("clipped_steps"),
    "max_grad_norm_after_10pct": lambda r: r.get("max_grad_norm_after_10pct"),
    "grad_spike_score": lambda r: r.get("grad_spike_score"),
    "last_layer_norm": lambda r: r["resid_norm"][-1] if r.get("resid_norm") else None,  # the paper's Fig. 3
}


def depth_rows(results):
    """results: list of dicts with depth, seed, variant, val_loss, ... (bench_depth.run_result)."""
    rows = []
    for depth in sorted({r["depth"] for r in results}):
        at = [r for r in results if r["depth"] == depth]
        by = {v: {r["seed"]: r for r in at if r["variant"] == v} for v in VARIANTS}
        seeds = sorted(set(by["prores"]) & set(by["baseline"]))
        row = {"depth": depth, "seeds": seeds, "T": sorted({r.get("T") for r in by["prores"].values()} - {None})}
        for v in VARIANTS:
            runs = list(by[v].values())
            row[v] = mean_ci([r["val_loss"] for r in runs])
            row[v + "_se"] = max((r["val_se"] for r in runs), default=float("nan"))
            for key in ("max_grad_norm_after_10pct", "clipped_steps", "loss_spike_score", "grad_spike_score",
                        "early_loss", "plateau_exit_step"):
                vals = [r[key] for r in runs if r.get(key) is not None]
                row[f"{v}_{key}"] = mean_ci(vals) if vals else (float("nan"), float("nan"), 0)
        deltas = [by["prores"][s]["val_loss"] - by["baseline"][s]["val_loss"] for s in seeds]
        row["delta"] = mean_ci(deltas)
        row["deltas"] = deltas
        row["delta_se"] = max((paired_se(by["prores"][s]["window_losses"], by["baseline"][s]["window_losses"])
                               for s in seeds), default=float("nan"))
        row["wins"] = sum(d < 0 for d in deltas)
        # Stability, paired by seed like the loss: the seed spread of clipping dwarfs its mean difference.
        for key, read in PAIRED_STABILITY.items():
            pairs = [(read(by["prores"][s]), read(by["baseline"][s])) for s in seeds]
            diffs = [a - b for a, b in pairs if a is not None and b is not None]
            row[f"{key}_delta"] = mean_ci(diffs) if diffs else (float("nan"), float("nan"), 0)
        rows.append(row)
    return rows


def _tables(rows, meta):
    lines = [
        "| layers | T | seeds | ProRes | baseline | Δ (ProRes − baseline) | per seed Δ | seeds ProRes lower | SE of one run | SE of one Δ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['depth']} | {', '.join(f'{t:g}' for t in r['T'])} | {len(r['seeds'])} | {_fmt(*r['prores'][:2])} | "
            f"{_fmt(*r['baseline'][:2])} | **{_fmt(*r['delta'][:2])}** | "
            f"{', '.join(f'{d:+.3f}' for d in r['deltas'])} | {r['wins']}/{len(r['deltas'])} | "
            f"{max(r['prores_se'], r['baseline_se']):.4f} | {r['delta_se']:.4f} |")
    lines += ["", f"Mean ± {meta['level']:.0%} Student-t interval over seeds. \"SE of one run\": the largest "
              "standard error of one run's validation loss (spread of its per-window losses); \"SE of one Δ\": "
              "the largest standard error of one seed's paired difference on the same windows.", "",
              "**Stability and early convergence** (mean ± interval over seeds; ProRes / baseline):", "",
              "| layers | max grad norm after 10 % | clipped steps | loss spike score % | grad-norm spike score % | "
              f"train loss at step {meta['early_step']} | plateau exit step |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for key, digits in (("max_grad_norm_after_10pct", 3), ("clipped_steps", 1), ("loss_spike_score", 2),
                            ("grad_spike_score", 2), ("early_loss", 3), ("plateau_exit_step", 0)):
            cells.append(" / ".join(_fmt(*r[f"{v}_{key}"][:2], digits=digits) for v in VARIANTS))
        lines.append(f"| {r['depth']} | " + " | ".join(cells) + " |")
    lines += ["", "**Paired by seed** (ProRes − baseline, mean ± interval over seeds, with the claim rule's verdict, "
              "`verdict`):", "",
              "| layers | seeds | held-out loss | verdict | clipped steps | verdict | max grad norm after 10 % | "
              "grad-norm spike score % | last-layer activation norm |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        clip = r["clipped_steps_delta"]
        lines.append(f"| {r['depth']} | {len(r['seeds'])} | {_fmt(*r['delta'][:2])} | {verdict(*r['delta'])} | "
                     f"{_fmt(*clip[:2], digits=1)} | {verdict(*clip) if clip[2] else '—'} | "
                     f"{_fmt(*r['max_grad_norm_after_10pct_delta'][:2], digits=2)} | "
                     f"{_fmt(*r['grad_spike_score_delta'][:2], digits=2)} | "
                     f"{_fmt(*r['last_layer_norm_delta'][:2], digits=1)} |")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(plt):
    return plt.subplots(figsize=(FIGURE_SIZE[0] / _DPI, FIGURE_SIZE[1] / _DPI), dpi=_DPI)


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _finish_depth_axis(plt, fig, ax, depths, ylabel, title, path):
    ax.set_xlabel("layers")
    ax.set_ylabel(ylabel)
    ax.set_xticks(depths)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _val_figure(plt, rows, path):
    fig, ax = _figure(plt)
    depths = [r["depth"] for r in rows]
    for v, colour in zip(VARIANTS, ("tab:blue", "tab:grey")):
        m = [r[v][0] for r in rows]
        h = [0 if math.isnan(r[v][1]) else r[v][1] for r in rows]
        ax.errorbar(depths, m, yerr=h, marker="o", capsize=4, color=colour,
                    label="Pre-LN + ProRes" if v == "prores" else "Pre-LN baseline")
    return _finish_depth_axis(plt, fig, ax, depths, "final validation loss",
                              "Final validation loss against depth (mean ± 95 % interval over seeds)", path)


def _delta_figure(plt, rows, path):
    fig, ax = _figure(plt)
    depths = [r["depth"] for r in rows]
    m = [r["delta"][0] for r in rows]
    h = [0 if math.isnan(r["delta"][1]) else r["delta"][1] for r in rows]
    ax.axhline(0, color="black", lw=0.8)
    ax.errorbar(depths, m, yerr=h, marker="o", capsize=4, color="tab:blue", label="mean ± 95 % interval")
    for r in rows:
        ax.scatter([r["depth"]] * len(r["deltas"]), r["deltas"], color="tab:orange", s=14, zorder=3)
    ax.scatter([], [], color="tab:orange", s=14, label="one seed")
    return _finish_depth_axis(plt, fig, ax, depths, "validation loss, ProRes − baseline (negative: ProRes better)",
                              "ProRes − baseline against depth", path)


def _per_depth_lines(plt, ax, results, draw):
    """``draw(ax, depth, runs, style, colour, label)`` for each depth and variant that has runs."""
    depths = sorted({r["depth"] for r in results})
    cmap = plt.get_cmap("viridis")
    for i, depth in enumerate(depths):
        colour = cmap(i / max(1, len(depths) - 1))
        for v, style in zip(VARIANTS, ("-", "--")):
            runs = [r for r in results if r["depth"] == depth and r["variant"] == v]
            if runs:
                draw(ax, depth, runs, style, colour, f"{depth} layers, {'ProRes' if v == 'prores' else 'baseline'}")


def _activation_figure(plt, results, path):
    fig, ax = _figure(plt)

    def draw(ax, depth, runs, style, colour, label):
        ax.plot(np.arange(1, depth + 1), np.mean([r["resid_norm"] for r in runs], axis=0), style,
                color=colour, label=label)

    _per_depth_lines(plt, ax, results, draw)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean per-token L2 norm of the residual stream after the layer")
    ax.set_title("Activation norm across depth at the end of training (solid: ProRes, dashed: baseline)")
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, path)


def _curves_figure(plt, results, path):
    fig, ax = _figure(plt)

    def draw(ax, depth, runs, style, colour, label):
        n = min(len(r["train_loss"]) for r in runs)
        curve = np.mean([r["train_loss"][:n] for r in runs], axis=0)
        smooth = np.convolve(curve, np.ones(10) / 10, mode="valid") if n >= 10 else curve
        ax.plot(np.arange(len(smooth)) + (n - len(smooth)) + 1, smooth, style, color=colour, label=label)

    _per_depth_lines(plt, ax, [r for r in results if r.get("train_loss")], draw)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (mean over seeds, 10-step moving average)")
    ax.set_title("Training loss (solid: ProRes, dashed: baseline)")
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def write_report(out: Path, rows, results, meta) -> list:
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        _val_figure(plt, rows, out / "val_loss_vs_depth.png"),
        _delta_figure(plt, rows, out / "delta_vs_depth.png"),
        _activation_figure(plt, results, out / "activation_norm_depth.png"),
        _curves_figure(plt, results, out / "train_loss_curves.png"),
    ]
    text = [f"# {meta['title']}", "", meta["description"], "", *_tables(rows, meta), "",
            *[f"![{p.stem}]({p.name})" for p in figures], ""]
    (out / "report.md").write_text("\n".join(text))
    return [out / "report.md", *figures]


MIN_SEEDS_FOR_CLAIM = 8  # docs/benchmarks.md §5: the project's rule for a quality claim


def verdict(mean: float, half: float, n: int) -> str:
    """What an effect over seeds allows us to say (ProRes − baseline, negative = ProRes better): a
    direction only with at least MIN_SEEDS_FOR_CLAIM seeds and a 95 % interval that excludes 0."""
    if math.isnan(half):
        return f"no interval from {n} seed{'s' if n != 1 else ''}"
    if mean - half <= 0 <= mean + half:
        return f"not distinguishable from seed spread ({n} seeds; the 95 % interval contains 0)"
    if n < MIN_SEEDS_FOR_CLAIM:
        return (f"no claim: the interval excludes 0 but rests on {n} seeds, fewer than the "
                f"{MIN_SEEDS_FOR_CLAIM} a claim needs")
    return f"ProRes {'better' if mean < 0 else 'worse'} ({n} seeds; the 95 % interval excludes 0)"


def demo_summary(prores: dict, baseline: dict, benchmark: dict, depth: int, settings: dict) -> list:
    """The demo's closing lines: both held-out losses, the difference with its paired standard
    error, and what the depth sweep measured at this depth (over seeds), or why it does not apply."""
    d = prores["val_loss"] - baseline["val_loss"]
    se = paired_se(prores["window_losses"], baseline["window_losses"])
    lines = [f"{name:<9} validation loss: {r['val_loss']:.4f} (standard error {r['val_se']:.4f}; "
             f"{r['val_tokens']:,} held-out tokens)" for name, r in (("prores", prores), ("baseline", baseline))]
    lines.append(f"ProRes - baseline: {d:+.4f} (standard error of this difference on these tokens {se:.4f}); "
                 "negative = ProRes better")
    # Seeds pooled over several sweeps of this recipe (benchmarks/pool_seeds.py) when there are any.
    row = next((r for r in benchmark.get("pooled", []) if r["depth"] == depth), None) or next(
        (r for r in benchmark.get("rows", []) if r["depth"] == depth), None)
    same = {k: benchmark.get("settings", {}).get(k) for k in settings} == settings
    if row is None or not same:
        lines.append(f"benchmarks/bench_depth.py has no measurement for these settings ({depth} layers, {settings}); "
                     "the run-to-run spread across seeds is usually larger than the standard error above.")
        return lines
    m, h, n = row["delta"]
    if n < MIN_SEEDS_FOR_CLAIM:
        # The project quotes no multi-seed figure resting on fewer seeds than a claim needs.
        lines.append(f"benchmarks/bench_depth.py has measured this recipe at {depth} layers on {n} seeds only, fewer "
                     f"than the {MIN_SEEDS_FOR_CLAIM} the project quotes a multi-seed figure from; the run-to-run "
                     "spread across seeds is usually larger than the standard error above.")
        return lines
    wins = row["wins"]
    lines.append(f"Benchmark (benchmarks/bench_depth.py, same recipe, {n} seeds at {depth} layers): ProRes - baseline "
                 f"{m:+.4f} ± {h:.4f} (95 % interval over seeds; per seed "
                 f"{', '.join(f'{x:+.3f}' for x in row['deltas'])}; ProRes lower in {wins} of {n}): "
                 f"{verdict(m, h, n)}. One demo run is one draw from that spread, so this run's sign is no "
                 "evidence either way.")
    lines += [f"Control: {note}" for note in benchmark.get("controls", [])]
    return lines


def _demo_main(argv=None):
    import argparse
    import json

    p = argparse.ArgumentParser(description="Print the CPU demo's summary (examples/scripts/demo_cpu.sh).")
    p.add_argument("--prores", type=Path, required=True, help="the ProRes run's `prores-megatron heldout` JSON")
    p.add_argument("--baseline", type=Path, required=True, help="the baseline's `prores-megatron heldout` JSON")
    p.add_argument("--benchmark", type=Path, required=True, help="bench_depth.py summary.json")
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--t-rule", required=True)
    p.add_argument("--lr", type=float, required=True)
    a = p.parse_args(argv)
    load = lambda path: json.loads(path.read_text())
    benchmark = load(a.benchmark) if a.benchmark.is_file() else {}
    settings = {"iters": a.iters, "t_rule": a.t_rule, "lr": a.lr}
    print("\n".join(demo_summary(load(a.prores), load(a.baseline), benchmark, a.depth, settings)))


if __name__ == "__main__":
    _demo_main()
