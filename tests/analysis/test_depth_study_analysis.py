"""``prores-megatron depth`` (the depth study's analysis step) on a synthetic study.

The study directory looks like examples/scripts/depth_study_gpu.sh's RUN_DIR: ``L<layers>_<variant>/``
with ``checkpoints/prores_monitor.jsonl`` (the monitor's JSONL format, as in test_analysis_cli)
and ``tensorboard/`` events written by torch's SummaryWriter, the writer Megatron-LM uses, with the
tag Megatron gives its held-out evaluation ('lm loss validation'). Independent expectations:
perplexities are exp of the planted losses, written out by hand (e^3.0 = 20.0855, e^3.1 = 22.1980,
e^2.9 = 18.1741, e^3.05 = 21.1153, e^2.8 = 16.4446); spike scores by hand from alternating series
whose window statistics are exact (as in test_spike_score): with window 50 and minimum history 40, a
400-iteration run scores iterations 41..360, i.e. 320; 3 planted loss spikes give 0.9375 %, 1
planted inf gradient norm 0.3125 %. PNG sizes from the figure size (12 x 6 in at 100 dpi).
"""

import json
from pathlib import Path

import pytest

from prores_megatron.analysis.cli import main

N = 400
SPIKES = ["--spike-window", "50", "--spike-min-history", "40"]
E = {3.0: 20.0855, 3.1: 22.1980, 2.9: 18.1741, 3.05: 21.1153, 2.8: 16.4446}  # exp(loss), by hand


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def write_run(run_dir: Path, layers, schedule, level, validation, last=N, loss_spikes=(), grad_inf=()):
    """A run of ``last`` of N iterations: loss level +- 0.01 alternating (level + 0.5 at
    loss_spikes), grad norm 1 +- 0.1 (inf at grad_inf); validation {iteration: loss}."""
    from torch.utils.tensorboard import SummaryWriter

    records = [dict(kind="run", schedule=schedule, warmup_steps=None if schedule == "none" else 5.0,
                    num_layers=layers, arch="pre", init="plain", train_iters=N, monitor_interval=100)]
    for it in range(1, last + 1):
        loss = level + 0.5 if it in loss_spikes else level + 0.01 * (-1) ** it
        grad = float("inf") if it in grad_inf else 1 + 0.1 * (-1) ** it
        records.append(dict(kind="step", iteration=it, step=it - 1, lm_loss=loss, grad_norm=grad, lr=2e-3))
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "prores_monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for it, value in validation.items():
        writer.add_scalar("lm loss validation", value, it)
    writer.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_run(root / "L24_prores", 24, "linear", 3.0, {200: 3.2, 400: 3.0})
    write_run(root / "L24_baseline", 24, "none", 3.0, {200: 3.3, 400: 3.1}, loss_spikes=(100, 200, 300))
    write_run(root / "L48_prores", 48, "linear", 2.8, {400: 2.9})
    write_run(root / "L48_baseline", 48, "none", 2.9, {400: 3.05}, grad_inf=(150,))
    write_run(root / "L72_prores", 72, "linear", 2.8, {200: 3.3}, last=200)  # stopped half-way
    (root / "data_cache").mkdir()  # not a run: no logs in it
    return root


def pair_rows(md: str):
    return {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in md.split("## Runs")[0].splitlines() if line.startswith("| ") and line[2].isdigit()}


def run_rows(md: str):
    return {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in md.split("## Runs")[1].splitlines() if line.startswith("| L")}


def test_depth_analysis_from_validation_loss(study, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["depth", "--study-dir", str(study), "--out", str(out), *SPIKES]) == 0
    data = json.loads((out / "depth_study.json").read_text())
    runs = {r["label"]: r for r in data["runs"]}
    assert set(runs) == {"L24_prores", "L24_baseline", "L48_prores", "L48_baseline", "L72_prores"}
    expected = {"L24_prores": (3.0, E[3.0]), "L24_baseline": (3.1, E[3.1]), "L48_prores": (2.9, E[2.9]),
                "L48_baseline": (3.05, E[3.05])}
    for label, (loss, ppl) in expected.items():
        r = runs[label]
        assert r["loss"] == pytest.approx(loss, abs=1e-6) and r["loss_iteration"] == N  # the final evaluation
        assert r["perplexity"] == pytest.approx(ppl, abs=1e-3) and r["excluded"] is None
    assert runs["L24_prores"]["variant"] == "ProRes" and runs["L24_baseline"]["variant"] == "baseline"
    assert runs["L72_prores"]["excluded"] == "stopped at iteration 200 of 400"
    # Spike scores over 320 scored iterations: loss 3 spikes, grad norm 1 inf; the others none.
    assert runs["L24_baseline"]["loss_spike_score"] == pytest.approx(0.9375)
    assert runs["L48_baseline"]["grad_norm_spike_score"] == pytest.approx(0.3125)
    for label in ("L24_prores", "L48_prores"):
        assert runs[label]["loss_spike_score"] == 0.0 and runs[label]["grad_norm_spike_score"] == 0.0
    pairs = {p["depth"]: p for p in data["pairs"]}
    assert set(pairs) == {24, 48}  # 72: no baseline, and its ProRes run is incomplete
    assert pairs[24]["perplexity_difference"] == pytest.approx(E[3.0] - E[3.1], abs=2e-3)  # -2.1125
    assert pairs[48]["perplexity_difference"] == pytest.approx(E[2.9] - E[3.05], abs=2e-3)  # -2.9412
    md = (out / "depth_study.md").read_text()
    assert pair_rows(md)["24"] == ["24", "ProRes", "20.086", "22.198", "-2.112", "-0.1000"]
    assert pair_rows(md)["48"] == ["48", "ProRes", "18.174", "21.115", "-2.941", "-0.1500"]
    rows = run_rows(md)
    assert rows["L24_baseline"][6:10] == ["3.1000 (400)", "22.198", "0.938", "0.000"]
    assert rows["L72_prores"][-1] == "stopped at iteration 200 of 400"
    for name in ("perplexity_vs_depth.png", "spike_scores_vs_depth.png", "training_loss.png"):
        assert f"]({name})" in md and png_size(out / name) == (1200, 600), name
    printed = capsys.readouterr().out
    assert "24 layers: ProRes perplexity 20.086, baseline 22.198 (-2.112)" in printed
    assert "L72_prores: left out of the figures: stopped at iteration 200 of 400" in printed


def test_depth_analysis_from_the_training_loss_tail(study, tmp_path):
    """--metric train: the mean of the last 100 iterations (301..400: 50 at level+0.01, 50 at level-0.01)."""
    out = tmp_path / "train"
    assert main(["depth", "--study-dir", str(study), "--out", str(out), "--metric", "train", *SPIKES]) == 0
    runs = {r["label"]: r for r in json.loads((out / "depth_study.json").read_text())["runs"]}
    for label, ppl in (("L24_prores", E[3.0]), ("L24_baseline", E[3.0]), ("L48_prores", E[2.8]),
                       ("L48_baseline", E[2.9])):
        assert runs[label]["perplexity"] == pytest.approx(ppl, abs=1e-3), label


def test_depth_analysis_refusals_name_the_problem(study, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["depth", "--study-dir", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert f"nothing under --study-dir {empty} has a prores_monitor.jsonl" in capsys.readouterr().err
    # The same depth and variant twice: which one is meant cannot be guessed.
    assert main(["depth", "--study-dir", str(study), "--run", f"again={study / 'L48_prores'}",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "prores-megatron depth: error: two runs are ProRes at 48 layers" in err and str(study / "L48_prores") in err
    assert main(["depth", "--study-dir", str(study), "--out", str(tmp_path / "o"), "--train-tail", "0"]) == 2
    assert "--train-tail 0: must be >= 1" in capsys.readouterr().err
