"""The PNG figures of ``prores-megatron``: matplotlib (Agg), fixed pixel sizes, readable at a glance.

Contract: each function takes plain arrays, draws one figure with a title, labelled axes (with
units), a legend where there are several lines and a colour bar where colour carries a value, and
writes it to ``path`` at ``DPI``. Sizes are fixed (no tight bounding box), so a figure of
``(w, h)`` inches is always ``w*DPI x h*DPI`` pixels. Nothing here reads logs or computes metrics.
"""

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

DPI = 100
WIDE = (12.0, 6.0)  # curves and single heatmaps: 1200 x 600 px
PANEL_HEIGHT = 4.0  # per run, for figures with one panel per run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _edges(centres: np.ndarray, last_width: float) -> np.ndarray:
    """Cell edges for values that hold from their own x until the next one (steps, iterations)."""
    centres = np.asarray(centres, dtype=float)
    return np.append(centres, centres[-1] + last_width)


def _layer_axis(ax, num_layers: int):
    ax.set_ylabel("layer l (1 = next to the embedding)")
    ax.set_ylim(0.5, num_layers + 0.5)
    if num_layers <= 16:
        ax.set_yticks(range(1, num_layers + 1))


WIDE_RANGE = 30  # max/min above which a log scale shows more than a linear one


def wide_range(arrays) -> bool:
    """True when the positive finite values span more than ``WIDE_RANGE`` (a decade and a half)."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if len(arrays) else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    return values.size > 0 and values.max() / values.min() > WIDE_RANGE


def _plain_log_ticks(axis):
    """Ticks at 1, 2, 5 x 10^k written as plain numbers (0.2, not 2x10^-1), no minor labels."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _maybe_log(ax, ys, logy: bool):
    """Log scale only where asked and the values span a wide range (else it hides the shape)."""
    if logy and wide_range(ys):
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)


def alpha_heatmap(path, steps: np.ndarray, grid: np.ndarray, full_steps: Sequence[Optional[float]],
                  train_iters: Optional[int], title: str, subtitle: str) -> Path:
    """grid[l-1, j] = alpha(l, steps[j]); alpha holds from steps[j] until steps[j+1]."""
    plt = _pyplot()
    num_layers = grid.shape[0]
    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    y_edges = np.arange(0.5, num_layers + 1.0)
    mesh = ax.pcolormesh(_edges(steps, max(1.0, (steps[-1] - steps[0]) / max(len(steps), 1))), y_edges,
                         grid, cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
    fig.colorbar(mesh, ax=ax, label="α(l, t): residual-branch scale")
    # alpha changes only at integer steps: a layer with T*l = 1.5 is first at 1 on step 2.
    reached = [(math.ceil(s), l) for l, s in enumerate(full_steps, start=1) if s is not None]
    if reached:
        xs, ls = zip(*reached)
        ax.plot(xs, ls, "o-", color="white", markeredgecolor="black", markersize=4 if num_layers <= 32 else 2,
                linewidth=1, label="layer reaches α = 1")
    if train_iters:
        ax.axvline(train_iters, color="red", linestyle="--", linewidth=1.5,
                   label=f"end of run (--train-iters {train_iters})")
    if reached or train_iters:
        ax.legend(loc="lower right", framealpha=0.9)  # late steps: every schedule is at 1 there
    ax.set_xlabel("optimizer step t (completed updates)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _layer_axis(ax, num_layers)
    ax.set_title(f"{title}\n{subtitle}")
    return _save(fig, path)


SMOOTH_ABOVE = 2000  # points; below this every iteration is drawn as it is


def curves(path, lines: List[dict], title: str, ylabel: str, logy: bool = False) -> Path:
    """lines: dicts with label, x, y; optionally spikes_x/spikes_y and spike_label (marked with
    crosses) and marker. Non-finite values are marked with a triangle at the top of the axes."""
    plt = _pyplot()
    from matplotlib.transforms import blended_transform_factory

    fig, ax = plt.subplots(figsize=WIDE, layout="constrained")
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, line in enumerate(lines):
        colour = f"C{i % 10}"
        x, y = np.asarray(line["x"], dtype=float), np.asarray(line["y"], dtype=float)
        if len(y) > SMOOTH_ABOVE:
            # Long runs: the raw curve faint, a trailing mean over 0.5% of the run on top.
            width = len(y) // 200
            ax.plot(x, y, color=colour, alpha=0.3, linewidth=0.6)
            smooth = np.convolve(np.where(np.isfinite(y), y, np.nan), np.ones(width) / width, mode="valid")
            ax.plot(x[width - 1:], smooth, color=colour, linewidth=1.8,
                    label=f"{line['label']} (trailing mean of {width} iterations)")
        else:
            ax.plot(x, y, color=colour, linewidth=1.2, marker=line.get("marker"), label=line["label"])
        if len(line.get("spikes_x", ())):
            ax.plot(line["spikes_x"], line["spikes_y"], "x", color=colour, markersize=10, markeredgewidth=2.2,
                    label=line.get("spike_label", f"{line['label']}: spikes"))
        bad = ~np.isfinite(y)
        if bad.any():
            ax.plot(x[bad], np.full(int(bad.sum()), 0.97), "v", color=colour, markersize=9, transform=top,
                    clip_on=False, label=f"{line['label']}: non-finite value (NaN/inf)")
    _maybe_log(ax, [l["y"] for l in lines], logy)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def _panel_figure(n: int, sharey: bool = False):
    plt = _pyplot()
    fig, axes = plt.subplots(n, 1, figsize=(WIDE[0], PANEL_HEIGHT * n + 0.6), layout="constrained", squeeze=False,
                             sharey=sharey)
    return fig, [row[0] for row in axes]


def layer_heatmaps(path, panels: List[Tuple[str, np.ndarray, np.ndarray]], title: str, colour_label: str,
                   log_colour: bool = False) -> Path:
    """One heatmap per run (layer x iteration), one shared colour scale so runs compare directly.
    panels: (label, iterations[n], values[n, L])."""
    from matplotlib.colors import LogNorm, Normalize

    fig, axes = _panel_figure(len(panels))
    finite = np.concatenate([v[np.isfinite(v)].ravel() for _, _, v in panels])
    if log_colour:
        positive = finite[finite > 0]
        lo, hi = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
        norm = LogNorm(vmin=lo, vmax=max(hi, lo * 10))
    else:
        norm = Normalize(vmin=0.0, vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    mesh = None
    for ax, (label, iterations, values) in zip(axes, panels):
        num_layers = values.shape[1]
        step = float(np.median(np.diff(iterations))) if len(iterations) > 1 else 1.0
        mesh = ax.pcolormesh(_edges(iterations, step), np.arange(0.5, num_layers + 1.0), values.T,
                             cmap="magma", norm=norm, shading="flat")
        ax.set_title(label)
        ax.set_xlabel("training iteration")
        _layer_axis(ax, num_layers)
    bar = fig.colorbar(mesh, ax=axes, label=colour_label)
    if log_colour:
        _plain_log_ticks(bar.ax.yaxis)
    fig.suptitle(title)
    return _save(fig, path)


def layer_profiles(path, panels: List[Tuple[str, np.ndarray, np.ndarray]], title: str, ylabel: str,
                   max_lines: int = 6, logy: bool = False) -> Path:
    """Per run, the value against depth at up to ``max_lines`` iterations spread over the run; one
    y scale for all runs, so they compare directly."""
    plt = _pyplot()
    fig, axes = _panel_figure(len(panels), sharey=True)
    for ax, (label, iterations, values) in zip(axes, panels):
        picks = sorted(set(np.linspace(0, len(iterations) - 1, min(max_lines, len(iterations))).round().astype(int)))
        colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(picks)))
        layers = np.arange(1, values.shape[1] + 1)
        for colour, j in zip(colours, picks):
            ax.plot(layers, values[j], "o-", color=colour, markersize=3, label=f"iteration {int(iterations[j])}")
        if logy:  # the caller chose the scale for all runs (and said so in ylabel)
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.set_title(label)
        ax.set_xlabel("layer l (1 = next to the embedding)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def cosine_figure(path, iterations: Sequence[int], cosine: np.ndarray, reference_iteration: int,
                  title: str) -> Path:
    """cosine[j, l-1]: layer l at checkpoint iterations[j] against the reference checkpoint.
    Left: one line per layer over training, coloured by depth; right: the same as a heatmap with
    one column per checkpoint."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    num_layers = cosine.shape[1]
    fig, (left, right) = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
    depth = Normalize(vmin=1, vmax=max(num_layers, 2))
    cmap = ListedColormap(plt.get_cmap("plasma")(np.linspace(0.0, 0.85, 256)))  # no pale yellow on white
    x = np.asarray(iterations, dtype=float)
    for l in range(1, num_layers + 1):
        left.plot(x, cosine[:, l - 1], "o-", color=cmap(depth(l)), markersize=3, linewidth=1.2)
    fig.colorbar(ScalarMappable(norm=depth, cmap=cmap), ax=left, label="layer l")
    finite = np.isfinite(cosine)
    lo = min(0.0, float(np.nanmin(cosine))) if finite.any() else 0.0
    left.set_xlabel("checkpoint (training iteration)")
    left.set_ylabel(f"cosine similarity to iteration {reference_iteration}")
    left.set_ylim(lo - 0.02, 1.02)
    left.grid(True, alpha=0.3)
    left.set_title("per layer")
    columns = np.arange(len(x) + 1) - 0.5
    mesh = right.pcolormesh(columns, np.arange(0.5, num_layers + 1.0), cosine.T, cmap="viridis",
                            vmin=lo, vmax=1.0, shading="flat")
    fig.colorbar(mesh, ax=right, label="cosine similarity")
    every = max(1, len(x) // 12)  # at most ~12 tick labels
    right.set_xticks(np.arange(0, len(x), every), [str(int(v)) for v in x[::every]])
    right.set_xlabel("checkpoint (training iteration)")
    _layer_axis(right, num_layers)
    right.set_title("layer x checkpoint")
    fig.suptitle(title)
    return _save(fig, path)
