"""Quality: ProRes vs the plain model, final validation loss at a fixed token budget, several seeds.

Runs the demo's training recipe (examples/scripts/demo_cpu.sh with TRAIN_ONLY=1: a deep-narrow
Llama, 32 layers x width 64 by default, batch 16 x 64 tokens, 300 steps, lr 3e-3, ProRes linear with
T = 5, through Megatron-LM's loop at PP=2 on CPU) once per seed, both variants on the same data and
seed, and prints the validation loss of each, the difference (ProRes - baseline; negative = ProRes
better) per seed and the mean. Environment variables of demo_cpu.sh (TRAIN_ITERS, NUM_LAYERS, ...)
pass through.

    python benchmarks/bench_quality.py [--seeds 1 2 3] [--out runs/bench_quality]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "scripts" / "demo_cpu.sh"


def run_seed(seed: int, out: Path) -> dict:
    env = dict(os.environ, SEED=str(seed), DEMO_DIR=str(out / f"seed{seed}"), DATA_DIR=str(out / "data"),
               TRAIN_ONLY="1", PYTHON=os.environ.get("PYTHON", sys.executable))
    t0 = time.time()
    proc = subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: demo_cpu.sh failed\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    summary = (out / f"seed{seed}" / "summary.txt").read_text()
    losses = dict(re.findall(r"^(\w+)\s+validation loss: ([0-9.Ee+-]+)", summary, flags=re.M))
    return {"prores": float(losses["prores"]), "baseline": float(losses["baseline"]), "seconds": time.time() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_quality")
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        r = run_seed(seed, args.out)
        rows.append((seed, r))
        print(f"seed {seed}: ProRes {r['prores']:.4f}  baseline {r['baseline']:.4f}  "
              f"ProRes - baseline {r['prores'] - r['baseline']:+.4f}  ({r['seconds']:.0f} s)", flush=True)
    diffs = [r["prores"] - r["baseline"] for _, r in rows]
    print(f"mean over {len(rows)} seed(s): ProRes {statistics.mean(r['prores'] for _, r in rows):.4f}  "
          f"baseline {statistics.mean(r['baseline'] for _, r in rows):.4f}  "
          f"ProRes - baseline {statistics.mean(diffs):+.4f}")


if __name__ == "__main__":
    main()
