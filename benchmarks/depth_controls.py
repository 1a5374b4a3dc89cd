"""The depth study's controlled comparisons: every configuration the run cache holds, and ProRes
against the best-tuned baseline of its depth (docs/benchmarks.md §5).

bench_depth.py tabulates one learning rate and one T rule at a time. The controls vary them (the
baseline's learning rate first), so this reads every cached run under ``--out``/runs and prints,
per depth:
- one row per configuration (variant, lr, T): final held-out loss as mean ± 95 % Student-t
  interval over seeds, the per-seed values, clipped steps, the max grad norm after the first 10 %
  and the last layer's activation norm;
- the tuned baseline: the baseline learning rate with the lowest mean loss over seeds (a
  configuration counts only with every seed the depth's other configurations have), and each
  ProRes configuration against it, paired by seed (ProRes - baseline; negative = ProRes better).

Contract: ``control_rows(results) -> {depth: {"configs": [...], "tuned_baseline": key | None,
"against_tuned": [...]}}``, results being bench_depth's result dicts.

    python benchmarks/depth_controls.py [--out runs/bench_depth] [--json FILE]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import depth_report  # noqa: E402


def _key(r):
    return (r["variant"], r["lr"], r.get("T") if r["variant"] == "prores" else None)


def _label(key):
    variant, lr, t = key
    return f"{variant} lr {lr:g}" + (f" T {t:g}" if t is not None else "")


def control_rows(results):
    out = {}
    for depth in sorted({r["depth"] for r in results}):
        at = [r for r in results if r["depth"] == depth]
        groups = {}
        for r in at:
            groups.setdefault(_key(r), {})[r["seed"]] = r
        configs = []
        for key in sorted(groups, key=lambda k: (k[0] != "baseline", k[1], k[2] or 0)):
            runs = groups[key]
            seeds = sorted(runs)
            row = {"key": key, "label": _label(key), "seeds": seeds,
                   "val_loss": depth_report.mean_ci([runs[s]["val_loss"] for s in seeds]),
                   "per_seed": [runs[s]["val_loss"] for s in seeds]}
            for name, get in (("clipped_steps", lambda r: r["clipped_steps"]),
                              ("max_grad_norm_after_10pct", lambda r: r["max_grad_norm_after_10pct"]),
                              ("last_layer_norm", lambda r: r["resid_norm"][-1])):
                row[name] = depth_report.mean_ci([get(runs[s]) for s in seeds])
            configs.append(row)
        baselines = [c for c in configs if c["key"][0] == "baseline"]
        full = max((len(c["seeds"]) for c in configs), default=0)
        eligible = [c for c in baselines if len(c["seeds"]) == full]
        tuned = min(eligible, key=lambda c: c["val_loss"][0]) if eligible else None
        against = []
        if tuned is not None:
            base = groups[tuned["key"]]
            for c in configs:
                if c["key"][0] != "prores":
                    continue
                seeds = [s for s in c["seeds"] if s in base]
                deltas = [groups[c["key"]][s]["val_loss"] - base[s]["val_loss"] for s in seeds]
                against.append({"label": c["label"], "seeds": seeds, "deltas": deltas,
                                "delta": depth_report.mean_ci(deltas), "wins": sum(d < 0 for d in deltas)})
        out[depth] = {"configs": configs, "tuned_baseline": tuned["key"] if tuned else None,
                      "against_tuned": against}
    return out


def markdown(rows) -> list:
    fmt = depth_report._fmt
    lines = []
    for depth, d in rows.items():
        lines += [f"### {depth} layers", "",
                  "| configuration | seeds | held-out loss | per seed | clipped steps | max grad norm after 10 % "
                  "| last-layer activation norm |", "|---|---|---|---|---|---|---|"]
        for c in d["configs"]:
            lines.append(f"| {c['label']} | {len(c['seeds'])} | {fmt(*c['val_loss'][:2])} | "
                         f"{', '.join(f'{v:.4f}' for v in c['per_seed'])} | {fmt(*c['clipped_steps'][:2], digits=1)} | "
                         f"{fmt(*c['max_grad_norm_after_10pct'][:2], digits=2)} | {fmt(*c['last_layer_norm'][:2], digits=1)} |")
        lines.append("")
        if d["tuned_baseline"] is None:
            lines += ["No baseline with every seed: no tuned-baseline comparison.", ""]
            continue
        lines += [f"Tuned baseline (lowest mean over seeds): {_label(d['tuned_baseline'])}.", "",
                  "| ProRes configuration | Δ against the tuned baseline | per seed | seeds ProRes lower |", "|---|---|---|---|"]
        for a in d["against_tuned"]:
            lines.append(f"| {a['label']} | **{fmt(*a['delta'][:2])}** | {', '.join(f'{x:+.3f}' for x in a['deltas'])} | "
                         f"{a['wins']}/{len(a['deltas'])} |")
        lines.append("")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_depth"), help="bench_depth.py --out")
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    files = sorted((a.out / "runs").glob("*/result.json"))
    if not files:
        p.error(f"--out {a.out}: no finished runs under {a.out / 'runs'} (run benchmarks/bench_depth.py first)")
    rows = control_rows([json.loads(f.read_text()) for f in files])
    print("\n".join(markdown(rows)))
    if a.json:
        a.json.write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
