"""benchmarks/bench_depth.py: the interval arithmetic against hand-computed values, the T rule, and a
shortened sweep (two small depths, one seed, a few steps) through the real Megatron-LM loop that
writes the tables and figures and resumes from its cache (docs/benchmarks.md §5)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_depth  # noqa: E402
import depth_controls  # noqa: E402
import depth_report  # noqa: E402


def test_interval_matches_hand_computation():
    # [1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.302653 (tables) -> 4.302653 / sqrt(3) = 2.484138.
    m, h, n = depth_report.mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and h == pytest.approx(2.484138, abs=2e-6)
    # [0.1, -0.3]: mean -0.1, s = 0.4 / sqrt(2) = 0.2828427, t_{0.975, 1} = 12.706205 -> 2.541241.
    m, h, n = depth_report.mean_ci([0.1, -0.3])
    assert m == pytest.approx(-0.1) and h == pytest.approx(2.541241, abs=2e-6)
    # 90 %: t_{0.95, 2} = 2.919986 -> 2.919986 / sqrt(3) = 1.685854.
    assert depth_report.mean_ci([1.0, 2.0, 3.0], level=0.90)[1] == pytest.approx(1.685854, abs=2e-6)
    m, h, n = depth_report.mean_ci([5.0])
    assert m == 5.0 and math.isnan(h) and n == 1
    # Paired windows: differences 1, 2, 3, 4 -> s = 1.2909944, SE = s / 2 = 0.6454972.
    assert depth_report.paired_se([1, 2, 3, 4], [0, 0, 0, 0]) == pytest.approx(0.6454972, abs=1e-7)


def _result(variant, lr, seed, loss, t=3.0):
    return dict(depth=8, variant=variant, lr=lr, seed=seed, T=t, val_loss=loss, clipped_steps=seed,
                max_grad_norm_after_10pct=1.0, resid_norm=[1.0, 2.0 * seed])


def test_controls_pick_the_tuned_baseline_and_pair_by_seed():
    results = [_result("baseline", 3e-3, 1, 5.2), _result("baseline", 3e-3, 2, 5.4),
               _result("baseline", 1.5e-3, 1, 5.0), _result("baseline", 1.5e-3, 2, 5.2),
               _result("baseline", 7.5e-4, 1, 4.0),  # lowest, but one seed of two: not eligible
               _result("prores", 3e-3, 1, 4.9), _result("prores", 3e-3, 2, 5.25)]
    row = depth_controls.control_rows(results)[8]
    assert row["tuned_baseline"] == ("baseline", 1.5e-3, None)  # mean 5.1 against 5.3
    labels = [c["label"] for c in row["configs"]]
    assert labels == ["baseline lr 0.00075", "baseline lr 0.0015", "baseline lr 0.003", "prores lr 0.003 T 3"]
    prores = row["configs"][-1]
    assert prores["per_seed"] == [4.9, 5.25] and prores["last_layer_norm"][0] == pytest.approx(3.0)
    (against,) = row["against_tuned"]
    # By hand: 4.9 - 5.0 = -0.1 and 5.25 - 5.2 = +0.05; mean -0.025, one of two better.
    assert against["deltas"] == pytest.approx([-0.1, 0.05]) and against["wins"] == 1
    assert against["delta"][0] == pytest.approx(-0.025)
    # s = sqrt(2 x 0.075^2 / 1) = 0.075 sqrt(2); half width t(0.975, 1) s / sqrt(2) = 12.7062047 x 0.075.
    assert against["delta"][1] == pytest.approx(12.7062047 * 0.075, rel=1e-6)
    text = "\n".join(depth_controls.markdown({8: row}))
    assert "Tuned baseline (lowest mean over seeds): baseline lr 0.0015." in text and "| -0.100, +0.050 | 1/2 |" in text


def test_t_rule():
    # paper: T = N/100 unless T*L would pass 0.6 N (then T = 0.6 N / L).
    assert bench_depth.warmup_steps("paper", 300, 8) == 3.0
    assert bench_depth.warmup_steps("paper", 300, 64) == pytest.approx(180 / 64)
    assert bench_depth.warmup_steps("share:0.5", 300, 50) == 3.0
    assert bench_depth.warmup_steps("fixed:4", 300, 64) == 4.0
    with pytest.raises(SystemExit, match="inside the run"):
        bench_depth.warmup_steps("fixed:5", 300, 64)  # 320 steps of warmup in a 300-step run
    with pytest.raises(SystemExit, match="expected paper"):
        bench_depth.warmup_steps("linear", 300, 8)


def _png_size(path: Path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_shortened_sweep_writes_tables_and_figures(short_demo, tmp_path, capsys):
    import matplotlib.image
    import numpy as np

    out = tmp_path / "sweep"
    argv = ["--depths", "1", "2", "--seeds", "1", "--iters", "4", "--data-dir", str(short_demo / "data"), "--out", str(out)]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_depth.py"), *argv]
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    report = (out / "report" / "report.md").read_text()
    for depth in (1, 2):
        assert f"\n| {depth} | " in report  # one table row per depth, in both tables
    summary = json.loads((out / "report" / "summary.json").read_text())
    rows = {r["depth"]: r for r in summary["rows"]}
    assert sorted(rows) == [1, 2]
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    assert len(results) == 4 and {(r["depth"], r["variant"]) for r in results} == {
        (d, v) for d in (1, 2) for v in ("prores", "baseline")}
    for r in results:
        # The evaluation read the trained model: alpha from its buffers is 1 after the warmup
        # (T*L = 0.04 L steps < 4), the activation norm is finite per layer, the loss is a loss.
        assert r["alpha"] == [1.0] * r["depth"]
        assert len(r["resid_norm"]) == r["depth"] and all(math.isfinite(x) and x > 0 for x in r["resid_norm"])
        assert 0 < r["val_loss"] < 8 and 0 < r["val_se"] < 0.1 and r["val_windows"] == len(r["window_losses"])
        assert len(r["train_loss"]) == 4
    for depth, row in rows.items():
        p = next(r for r in results if r["depth"] == depth and r["variant"] == "prores")
        b = next(r for r in results if r["depth"] == depth and r["variant"] == "baseline")
        assert row["delta"][0] == pytest.approx(p["val_loss"] - b["val_loss"], abs=1e-12)
        assert list(row["clipped_steps_delta"][:3:2]) == [p["clipped_steps"] - b["clipped_steps"], 1]
    for name in ("val_loss_vs_depth", "delta_vs_depth", "activation_norm_depth", "train_loss_curves"):
        png = out / "report" / f"{name}.png"
        assert _png_size(png) == depth_report.FIGURE_SIZE
        pixels = matplotlib.image.imread(png)
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, f"{png} looks blank"

    # A second invocation (in this process: its imports are loaded already) trains nothing: every
    # run comes from the cache.
    logs = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/train.log")}
    capsys.readouterr()
    bench_depth.main(argv)
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    assert "0.0 min of run time computed now" in capsys.readouterr().out


def test_stability_is_paired_by_seed():
    def run(seed, variant, loss, clipped):
        return {"depth": 8, "seed": seed, "variant": variant, "val_loss": loss, "val_se": 0.01,
                "window_losses": [loss, loss + 0.1], "clipped_steps": clipped, "max_grad_norm_after_10pct": 1.0,
                "grad_spike_score": 0.0, "resid_norm": [1.0, clipped / 2]}
    # Clipped steps 10/30/50 (ProRes) against 14/33/56: paired differences -4, -3, -6 (mean -13/3,
    # sd 1.5275); unpaired, the spread between seeds (±20) would hide them.
    results = [run(s, "prores", 6.0, c) for s, c in ((1, 10), (2, 30), (3, 50))] + [
        run(s, "baseline", 6.1, c) for s, c in ((1, 14), (2, 33), (3, 56))]
    (row,) = depth_report.depth_rows(results)
    m, h, n = row["clipped_steps_delta"]
    assert n == 3 and m == pytest.approx(-13 / 3) and h == pytest.approx(4.302653 * 1.527525 / 3 ** 0.5, rel=1e-5)
    assert row["max_grad_norm_after_10pct_delta"][:2] == (0.0, 0.0)
    assert row["last_layer_norm_delta"][0] == pytest.approx(-13 / 6)  # the last entry of resid_norm, paired
    table = "\n".join(depth_report._tables([row], {"level": 0.95, "early_step": 50}))
    assert "| 8 | 3 | -0.1000 ± 0.0000 | no claim: the interval excludes 0 but rests on 3 seeds" in table
    assert "-4.3 ± 3.8 | no claim" in table


@pytest.mark.parametrize("mean, half, n, said", [
    (-0.135, 0.202, 3, "not distinguishable from seed spread (3 seeds"),  # the old 64-layer "regime"
    (+0.042, 0.042, 12, "not distinguishable"),  # an interval that touches 0 contains it
    (-0.20, 0.10, 3, "no claim: the interval excludes 0 but rests on 3 seeds"),
    (-0.20, 0.10, 8, "ProRes better (8 seeds"),
    (+0.30, 0.10, 10, "ProRes worse (10 seeds"),
    (-0.20, float("nan"), 1, "no interval from 1 seed"),
])
def test_quality_verdict_follows_the_claim_rule(mean, half, n, said):
    assert depth_report.verdict(mean, half, n).startswith(said)


def test_demo_summary_quotes_no_figure_from_three_seeds():
    prores = {"val_loss": 6.10, "val_se": 0.02, "val_tokens": 1000, "window_losses": [6.0, 6.2, 6.1]}
    baseline = {"val_loss": 6.15, "val_se": 0.02, "val_tokens": 1000, "window_losses": [6.05, 6.25, 6.15]}
    bench = {"settings": {"lr": 3e-3}, "rows": [{"depth": 48, "delta": [-0.31, 0.27, 3], "wins": 3,
                                                  "deltas": [-0.07, -0.25, -0.53]}], "controls": []}
    lines = depth_report.demo_summary(prores, baseline, bench, 48, {"lr": 3e-3})
    text = "\n".join(lines)
    # This run's own difference, by hand: 6.10 - 6.15; paired windows differ by 0.05 each, so SE 0.
    assert "ProRes - baseline: -0.0500 (standard error of this difference on these tokens 0.0000)" in text
    assert "on 3 seeds only, fewer than the 8" in text
    assert "-0.31" not in text and "0.27" not in text and "-0.530" not in text  # the 3-seed figures stay out
    assert "better" not in text.replace("negative = ProRes better", "")


def test_pooled_seeds_give_the_interval_over_all_of_them(tmp_path):
    import pool_seeds

    settings = {"iters": 300, "t_rule": "paper", "lr": 3e-3}
    base = {"settings": settings, "rows": [{"depth": 48, "seeds": [1, 2], "deltas": [-0.1, 0.1]}]}
    more = {"settings": settings, "rows": [{"depth": 48, "seeds": [3], "deltas": [0.3]}]}
    row = pool_seeds.pool(base, [("more", more)], 48, ["hand"])
    # By hand: mean 0.1, sample sd 0.2, se 0.2 / sqrt(3), t(0.975, 2) = 4.3027: half-width 0.4968.
    m, h, n = row["delta"]
    assert (row["seeds"], n, row["wins"]) == ([1, 2, 3], 3, 1)
    assert abs(m - 0.1) < 1e-12 and abs(h - 4.302653 * 0.2 / 3 ** 0.5) < 1e-5
    assert row["verdict"].startswith("not distinguishable from seed spread (3 seeds")
    with pytest.raises(SystemExit, match="seed 2 at 48 layers appears twice"):
        pool_seeds.pool(base, [("dup", {"settings": settings, "rows": [{"depth": 48, "seeds": [2], "deltas": [0]}]})],
                        48, [])
    with pytest.raises(SystemExit, match="only sweeps of the same recipe pool"):
        pool_seeds.pool(base, [("lr", {**more, "settings": {**settings, "lr": 1e-2}})], 48, [])
    # The demo's summary prefers the pooled row.
    prores = {"val_loss": 6.1, "val_se": 0.01, "val_tokens": 10, "window_losses": [6.1, 6.2]}
    baseline = {"val_loss": 6.0, "val_se": 0.01, "val_tokens": 10, "window_losses": [6.0, 6.1]}
    text = "\n".join(depth_report.demo_summary(prores, baseline, {**base, "pooled": [row]}, 48, settings))
    assert "on 3 seeds only" in text and "0.4968" not in text  # 3 seeds: pooled, but below the quoting rule
    eight = {"settings": settings, "rows": [{"depth": 48, "seeds": [3, 4, 5, 6, 7, 8], "deltas": [0.1] * 6}]}
    row8 = pool_seeds.pool(base, [("eight", eight)], 48, [])
    # By hand: deltas -0.1, 0.1 and six 0.1: mean 0.075, sd 0.0707107 (sum of squares 0.04 / 7), t(0.975, 7) 2.364624.
    text = "\n".join(depth_report.demo_summary(prores, baseline, {**base, "pooled": [row8]}, 48, settings))
    assert "8 seeds at 48 layers" in text and f"+0.0750 ± {2.364624 * 0.0707107 / 8 ** 0.5:.4f}" in text
