"""Pool the per-seed ProRes − baseline differences of several ``bench_depth.py`` sweeps of one recipe.

A sweep's ``summary.json`` (``bench_depth.py`` writes it in its report folder, and
``benchmarks/results/bench_depth.json`` is one) holds, per depth, the paired differences of each
seed. Sweeps of the same settings (steps, T rule, learning rate) run at other seeds, on other days or
machines, are more draws of the same quantity: this tool puts them together, refuses settings that
differ or a seed counted twice, and writes the pooled row (mean with its 95 % interval over seeds,
the claim verdict of ``depth_report.verdict``) under ``"pooled"`` in the ``--into`` file, which the
CPU demo's summary prefers over the single sweep's row (docs/benchmarks.md §5).

    python benchmarks/pool_seeds.py --into benchmarks/results/bench_depth.json --depth 48 \\
        --add runs/bench_depth_seeds/report/summary.json --note "seeds 4-9 on ..."
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import depth_report  # noqa: E402


def row_at(summary: dict, depth: int, name: str) -> dict:
    row = next((r for r in summary.get("rows", []) if r["depth"] == depth), None)
    if row is None:
        raise SystemExit(f"pool_seeds: {name} has no row for {depth} layers")
    return row


def pool(base: dict, additions: list, depth: int, notes: list) -> dict:
    """The pooled row: every seed of ``base`` and each addition at ``depth``, settings checked."""
    sources = [("--into", base), *additions]
    seeds, deltas = [], []
    for name, summary in sources:
        if summary.get("settings") != base.get("settings"):
            raise SystemExit(f"pool_seeds: {name} was run with {summary.get('settings')}, not "
                             f"{base.get('settings')}: only sweeps of the same recipe pool")
        row = row_at(summary, depth, name)
        for seed, delta in zip(row["seeds"], row["deltas"]):
            if seed in seeds:
                raise SystemExit(f"pool_seeds: seed {seed} at {depth} layers appears twice ({name})")
            seeds.append(seed)
            deltas.append(delta)
    m, h, n = depth_report.mean_ci(deltas)
    return {"depth": depth, "seeds": seeds, "deltas": deltas, "delta": [m, h, n],
            "wins": sum(d < 0 for d in deltas), "verdict": depth_report.verdict(m, h, n), "sources": notes}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--into", type=Path, required=True, help="the summary JSON that receives the pooled row")
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--add", type=Path, nargs="+", required=True, help="summary JSONs of further sweeps")
    p.add_argument("--note", action="append", default=[], help="where each part came from (kept with the row)")
    a = p.parse_args(argv)
    base = json.loads(a.into.read_text())
    additions = [(str(path), json.loads(path.read_text())) for path in a.add]
    row = pool(base, additions, a.depth, a.note)
    base["pooled"] = [r for r in base.get("pooled", []) if r["depth"] != a.depth] + [row]
    tmp = a.into.with_suffix(".tmp")
    tmp.write_text(json.dumps(base, indent=1) + "\n")
    tmp.replace(a.into)  # complete or unchanged
    m, h, n = row["delta"]
    print(f"{a.depth} layers, {n} seeds {row['seeds']}: ProRes - baseline {m:+.4f} ± {h:.4f} "
          f"(per seed {', '.join(f'{d:+.3f}' for d in row['deltas'])}): {row['verdict']}")


if __name__ == "__main__":
    main()
