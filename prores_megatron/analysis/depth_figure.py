"""The depth study's PNG figures: a value against the number of layers, one line per variant.

Contract: ``against_depth(path, panels, title)`` draws one panel per entry of ``panels`` (side by
side), each a dict with ``ylabel`` and ``lines``: {variant label: (depths, values)}; points are
marked and labelled with their value (``fmt``), NaN values are left out; the x axis shows exactly
the depths drawn. The figure is ``plots.WIDE`` (12 x 6 in) at ``plots.DPI``, like every other
``prores-megatron`` figure. Nothing here reads logs or computes metrics.
"""

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .plots import DPI, WIDE


def against_depth(path, panels: List[dict], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's first import
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=WIDE, layout="constrained", squeeze=False)
    for ax, panel in zip(axes[0], panels):
        lines: Dict[str, Tuple[Sequence[int], Sequence[float]]] = panel["lines"]
        depths = sorted({int(d) for xs, _ in lines.values() for d in xs})
        for i, (label, (xs, ys)) in enumerate(lines.items()):
            xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
            keep = np.isfinite(ys)
            ax.plot(xs[keep], ys[keep], "o-", color=f"C{i % 10}", linewidth=1.8, markersize=6, label=label)
            for x, y in zip(xs[keep], ys[keep]):
                ax.annotate(panel.get("fmt", "{:.3g}").format(y), (x, y), textcoords="offset points",
                            xytext=(0, 7 if i % 2 == 0 else -14), ha="center", fontsize="small", color=f"C{i % 10}")
        ax.set_xticks(depths)
        ax.set_xlabel("number of layers L")
        ax.set_ylabel(panel["ylabel"])
        if panel.get("title"):
            ax.set_title(panel["title"])
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
