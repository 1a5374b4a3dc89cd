"""``prores-megatron plan / report / cosine`` on a real tiny Megatron-LM run and on synthetic logs.

One real run (world size 1, 12 iterations, the in-training monitor every 2 iterations,
checkpoints at 4, 8, 12, validation every 4) feeds ``report`` and ``cosine``; the dry run of the
tiny launch script feeds ``plan --from-script``. Independent expectations: alpha plans written out
by hand from T*l; spike tables of synthetic monitor logs whose window statistics are exact by hand
(alternating series, see test_spike_score); PNG sizes from the figure sizes (12 x 6 in and
12 x (4 n + 0.6) in at 100 dpi); the token cosine of hand-picked vectors.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prores_megatron.analysis.cli import main
from prores_megatron.analysis.token_stats import token_cosine, token_norm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "scripts" / "pretrain_tiny_cpu.sh"
ITERS, L, T = 12, 8, 1.0
WIDE = (1200, 600)


def panels(n):  # one 12 x 4 in panel per run plus 0.6 in for the title
    return (1200, 400 * n + 60)


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is nearly empty ({len(data)} bytes)"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def cli(*argv):
    """The command line as a user runs it (a fresh process): ``report`` here, which imports no Megatron."""
    return subprocess.run([sys.executable, "-m", "prores_megatron.analysis.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def cli_here(*argv):
    """``main(argv)`` in this process, its output captured: ``cosine`` builds a megatron-core model,
    whose imports would cost a fresh process about 12 s (init_world1 reuses this process's group)."""
    import contextlib
    import io
    from types import SimpleNamespace

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real Megatron-LM run with the ProRes monitor: SAVE/ckpt holds the JSONL and checkpoints,
    SAVE/tensorboard the events."""
    root = tmp_path_factory.mktemp("tiny_run")
    env = dict(os.environ, PYTHON=sys.executable, TP="1", PP="1", TRAIN_ITERS=str(ITERS), SAVE_DIR=str(root / "ckpt"))
    env["PRORES_ARGS"] = (f"--prores-schedule linear --prores-warmup-steps {T:g} --prores-monitor-interval 2 "
                          "--prores-spike-window 4 --prores-spike-min-history 2 --prores-spike-threshold 1.5")
    env["EXTRA_ARGS"] = "--eval-interval 4 --eval-iters 1 --save-interval 4"
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    (root / "train.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root


# ---- plan ------------------------------------------------------------------------------------


def test_plan_from_flags(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main(["plan", "--num-layers", "24", "--prores-schedule", "linear", "--prores-warmup-steps", "1000",
                 "--train-iters", "20000", "--png", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = out["alpha_plan"]
    assert plan["full_step"] == [1000.0 * l for l in range(1, 25)]  # linear: layer l at T*l
    assert plan["all_on_step"] == 24000.0
    # 20000 <= T*l for l = 20..24: five layers never reach 1.
    assert len(out["warnings"]) == 1 and "5 of 24 layers never reach alpha = 1" in out["warnings"][0]
    assert png_size(png) == WIDE

    # The total-warmup flag and the text output: P = 12 over L = 8 is T = 1.5, switching on fast.
    assert main(["plan", "--num-layers", "8", "--prores-schedule", "linear", "--prores-total-warmup-steps", "12",
                 "--train-iters", "100",
                 "--png", str(tmp_path / "p2.png"), "--all-layers"]) == 0
    text = capsys.readouterr().out
    assert "layer 1: 1.5 | layer 2: 3 | layer 3: 4.5" in text and "layer 8: 12" in text
    assert "WARNING: --prores-warmup-steps 1.5 is very short" in text
    assert png_size(tmp_path / "p2.png") == WIDE


def test_plan_prints_tokens_per_layer_and_counts_samples(tmp_path, capsys):
    """The warmup in tokens per layer next to the paper's reference, by hand: 120 layers, T = 500,
    global batch 512 x 4096 tokens = 1.048576 B tokens per layer = 2x 1000 x 512 x 1024; in samples
    (S = 1000 x 4096 tokens) checked against --train-samples."""
    assert main(["plan", "--num-layers", "120", "--prores-schedule", "linear", "--prores-warmup-steps", "500",
                 "--global-batch-size", "512", "--seq-length", "4096", "--png", str(tmp_path / "a.png")]) == 0
    text = capsys.readouterr().out
    assert "warmup per layer: 1.05 B tokens = 2 x the paper's reference (T = 1000 steps x 512 sequences x " \
           "1024 tokens = 0.52 B tokens per layer)" in text
    assert main(["plan", "--num-layers", "8", "--prores-schedule", "linear", "--prores-warmup-samples", "1000",
                 "--train-samples", "7000", "--seq-length", "4096", "--png", str(tmp_path / "b.png"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = out["alpha_plan"]
    assert plan["unit"] == "samples" and plan["full_step"][-1] == 8000.0
    assert plan["tokens_per_layer"] == 1000 * 4096
    assert any("warmup ends at 8000 samples but --train-samples is 7000: 2 of 8 layers" in w for w in out["warnings"])


def test_plan_imports_neither_torch_nor_megatron(tmp_path):
    """A login node without the training stack can plan: the plan command stays pure Python."""
    code = ("import sys; from prores_megatron.analysis.cli import main;"
            "rc = main(['plan', '--num-layers', '8', '--prores-schedule', 'linear', '--prores-warmup-steps', '10', "
            f"'--png', {str(tmp_path / 'p.png')!r}]);"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'));"
            "print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--prores-warmup-steps", "10"], "--num-layers is required"),
    (["--num-layers", "8", "--prores-schedule", "linear", "--prores-warmup-steps", "0"],
     "--prores-warmup-steps=0.0 must be a positive"),
    (["--num-layers", "8", "--prores-warmup-steps", "10"], "--prores-warmup-steps given without --prores-schedule"),
    (["--num-layers", "8", "--prores-schedule", "linear_sqrt", "--prores-warmup-steps", "4"], "--prores-schedule"),
    (["--num-layers", "8", "--prores-schedule", "linear"], "needs --prores-warmup-steps"),
    (["--num-layers", "8"], "--prores-schedule is required"),
    (["--from-script", "x.sh", "--num-layers", "8"], "drop --num-layers"),
    (["--from-script", "/nonexistent.sh"], "--from-script /nonexistent.sh: no such file"),
])
def test_plan_refusals_name_the_flag(argv, message, capsys, tmp_path):
    assert main(["plan", "--png", str(tmp_path / "x.png"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prores-megatron plan: error: ") and message in err
    assert not (tmp_path / "x.png").exists()


def test_plan_refuses_a_script_without_a_dry_run_mode(tmp_path, capsys):
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/bash\ntouch started\n")
    assert main(["plan", "--from-script", str(script), "--png", str(tmp_path / "x.png")]) == 2
    assert "has no DRY_RUN mode" in capsys.readouterr().err
    assert not (tmp_path / "started").exists()


def test_plan_from_the_tiny_scripts_dry_run(tmp_path, monkeypatch, capsys):
    # The script's own knobs: 20 iterations, T = 3 -> layers at 3, 6, ..., 24; 7 and 8 never on.
    monkeypatch.setenv("TRAIN_ITERS", "20")
    monkeypatch.setenv("PRORES_ARGS", "--prores-schedule linear --prores-warmup-steps 3")
    monkeypatch.setenv("SAVE_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    png = tmp_path / "plan.png"
    assert main(["plan", "--from-script", str(SCRIPT), "--png", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alpha_plan"]["full_step"] == [3.0 * l for l in range(1, 9)]
    assert out["alpha_plan"]["train_iters"] == 20
    assert any("2 of 8 layers never reach alpha = 1 (layers 7..8" in w for w in out["warnings"])
    assert any("--prores-warmup-steps 3 is very short" in w for w in out["warnings"])
    assert png_size(png) == WIDE
    assert not (tmp_path / "ckpt").exists()  # a dry run: nothing trained


# ---- report ----------------------------------------------------------------------------------


def write_synthetic_monitor(path: Path, schedule, warmup, growth):
    """A monitor JSONL of a 400-iteration, 8-layer run in the monitor's format. Loss: 3 +- 0.01
    alternating (window mean 3, std 0.01) with 3.5 planted at 20, 100, 200, 300, 380; grad norm:
    1 +- 0.1 with inf at 150 and NaN at 250."""
    from prores_megatron.core.schedules import alpha_table

    N = 400
    lines = [dict(kind="run", schedule=schedule, warmup_steps=warmup, num_layers=L, arch="pre", init="megatron",
                  train_iters=N, monitor_interval=20,
                  spike=dict(window=50, threshold=7.0, min_history=40, start=0.1, end=0.9))]
    for it in range(1, N + 1):
        loss = 3.5 if it in (20, 100, 200, 300, 380) else 3 + 0.01 * (-1) ** it
        grad = math.inf if it == 150 else math.nan if it == 250 else 1 + 0.1 * (-1) ** it
        lines.append(dict(kind="step", iteration=it, step=it - 1, lm_loss=loss, grad_norm=grad, lr=1e-3))
        if it % 20 == 0:
            scale = 1 + 4 * it / N
            norm = [(1 + 0.5 * l if growth == "linear" else 1.35 ** l) * scale for l in range(1, L + 1)]
            lines.append(dict(kind="layers", iteration=it, step=it - 1, alpha=alpha_table(schedule, it - 1, warmup, L),
                              attn_rms=[0.1 * l for l in range(1, L + 1)], mlp_rms=[0.2 * l for l in range(1, L + 1)],
                              resid_rms=[n / 8 for n in norm], resid_norm=norm,
                              grad_norm=[0.5 / l * (1 - 0.9 * it / N) for l in range(1, L + 1)]))
    lines.append(dict(kind="spikes", iteration=N, loss_score=0.9375, grad_norm_score=0.625, window_used=40))
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))


def spike_rows(report: str):
    """{(run, metric): cells} of the report's spike table."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] in ("loss", "grad norm"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_report_on_synthetic_runs(tmp_path):
    write_synthetic_monitor(tmp_path / "prores" / "ckpt" / "prores_monitor.jsonl", "linear", 5.0, "linear")
    write_synthetic_monitor(tmp_path / "baseline" / "prores_monitor.jsonl", "none", None, "exponential")
    out = tmp_path / "report"
    assert main(["report", "--run", f"prores={tmp_path / 'prores'}", "--run", f"baseline={tmp_path / 'baseline'}",
                 "--out", str(out), "--spike-window", "50", "--spike-min-history", "40"]) == 0
    md = (out / "report.md").read_text()
    rows = spike_rows(md)
    # Candidates 40..360; t = 40 has 39 < 40 values of history: 320 scored. Loss spikes at 100, 200,
    # 300 (3.5 is 50 std away; 20 and 380 lie outside the range): 3/320 = 0.9375 %. Grad norm: the
    # inf and the NaN: 2/320 = 0.625 %.
    for run in ("prores", "baseline"):
        assert rows[(run, "loss")][:4] == ["0.938", "3 / 320", "40..360 (1 short of history)", "40–50"]
        assert rows[(run, "grad norm")][:2] == ["0.625", "2 / 320"]
        assert rows[(run, "loss")][4] == "0.938" and rows[(run, "grad norm")][4] == "0.625"  # online record
    assert "prores, loss: spikes at iterations 100, 200, 300." in md
    assert "prores, grad norm: spikes at iterations 150, 250." in md
    assert "baseline: no ProRes schedule in its settings" in md
    assert "schedule linear, T = 5 steps per layer, L = 8: every layer at α = 1 from step 40; run: 400 steps" in md
    for name, size in (("loss.png", WIDE), ("grad_norm.png", WIDE), ("alpha_prores.png", WIDE),
                       ("activation_norm.png", panels(2)), ("activation_norm_profiles.png", panels(2)),
                       ("layer_grad_norm.png", panels(2))):
        assert f"]({name})" in md
        assert png_size(out / name) == size, name
    assert not (out / "alpha_baseline.png").exists() and not (out / "validation_loss.png").exists()


def test_report_on_a_real_run(tiny_run, tmp_path):
    out = tmp_path / "report"
    proc = cli("report", "--run", f"prores={tiny_run}", "--run", f"tensorboard_only={tiny_run / 'tensorboard'}",
               "--out", out, "--spike-window", "4", "--spike-min-history", "2", "--spike-threshold", "1.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    records = [json.loads(line) for line in (tiny_run / "ckpt" / "prores_monitor.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["iteration"] for r in steps] == list(range(1, ITERS + 1))
    assert [r["iteration"] for r in records if r["kind"] == "layers"] == list(range(2, ITERS + 1, 2))
    online = [r for r in records if r["kind"] == "spikes"][-1]
    rows = spike_rows(md)
    # The monitor's online score during training equals the report's offline one from the same log.
    for metric, key in (("loss", "loss_score"), ("grad norm", "grad_norm_score")):
        assert rows[("prores", metric)][0] == f"{online[key]:.3f}" == rows[("prores", metric)][4], metric
    # The same run through TensorBoard alone (float32 values, every iteration at --log-interval 1).
    assert "| tensorboard_only | linear | 1 | 8 | 12 | 1..12 (12) | tensorboard |" in md
    assert "| prores | linear | 1 | 8 | 12 | 1..12 (12) | monitor |" in md
    for name, size in (("loss.png", WIDE), ("grad_norm.png", WIDE), ("validation_loss.png", WIDE),
                       ("alpha_prores.png", WIDE), ("alpha_tensorboard_only.png", WIDE),
                       ("activation_norm.png", panels(1)), ("activation_norm_profiles.png", panels(1)),
                       ("layer_grad_norm.png", panels(1))):
        assert png_size(out / name) == size, name
    # Validation every 4 iterations; the last row is the final evaluation at 12.
    assert "| prores | 12 |" in md and "| tensorboard_only | 12 |" in md


def test_report_needs_every_iteration_for_the_spike_score(tmp_path):
    # A log with every second iteration (e.g. --log-interval 2) cannot be scored; the report says why.
    log = tmp_path / "run" / "prores_monitor.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(dict(kind="step", iteration=i, step=i - 1, lm_loss=3.0, grad_norm=1.0, lr=1e-3))
                           + "\n" for i in range(2, 402, 2)))
    assert main(["report", "--run", f"sparse={log}", "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert spike_rows(md)[("sparse", "loss")][:2] == ["n/a", "–"]
    assert "sparse, loss: not logged at every iteration (199 missing between 2 and 400, first 3)" in md
    assert "sparse: no ProRes schedule in its settings" in md  # no 'run' record: nothing to plot


def test_report_refusals_name_the_file(tmp_path, capsys):
    assert main(["report", "--run", f"x={tmp_path / 'missing'}", "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'missing'}: no such file or directory" in capsys.readouterr().err
    bad = tmp_path / "bad" / "prores_monitor.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"kind": "run", "schedule": "linear", "num_layers": 2}\n{"kind": "step", "iteration": 1\n')
    assert main(["report", "--run", f"x={bad.parent}", "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: not a JSON object" in capsys.readouterr().err
    bad.write_text('{"kind": "run", "schedule": "linear", "num_layers": 2}\n'
                   '{"kind": "layers", "iteration": 2, "alpha": [1], "attn_rms": [1], "mlp_rms": [1], '
                   '"resid_rms": [1], "resid_norm": [1], "grad_norm": [1]}\n')
    assert main(["report", "--run", f"x={bad.parent}", "--out", str(tmp_path / "o")]) == 2
    assert "expected num_layers = 2" in capsys.readouterr().err
    assert main(["report", "--run", f"x={bad.parent}", "--out", str(tmp_path / "o"), "--spike-window", "0"]) == 2
    assert "--spike-window: spike score window=0" in capsys.readouterr().err


# ---- cosine ----------------------------------------------------------------------------------


def test_token_cosine_and_norm_by_hand():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    v = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    # token 1: cos 1; token 2: 1/sqrt(2); token 3: u has no direction, left out.
    assert token_cosine(u, v) == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-15)
    assert token_cosine(-u, v) == pytest.approx(-(1 + 1 / math.sqrt(2)) / 2, abs=1e-15)
    assert math.isnan(token_cosine(torch.zeros(2, 3), torch.ones(2, 3)))
    assert token_norm(torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])) == 2.5  # (5 + 0) / 2 tokens
    with pytest.raises(ValueError, match="shapes differ"):
        token_cosine(torch.ones(2, 3), torch.ones(3, 3))


def test_cosine_on_a_real_run(tiny_run, tmp_path):
    out = tmp_path / "cosine"
    proc = cli_here("cosine", "--checkpoints", tiny_run / "ckpt", "--out", out, "--batch-size", "2", "--seq-length", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "cosine.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["iteration"] + [f"layer_{l:03d}" for l in range(1, L + 1)]
    table = {int(r[0]): [float(x) for x in r[1:]] for r in rows[1:]}
    assert sorted(table) == [4, 8, 12]
    assert table[12] == pytest.approx([1.0] * L, abs=1e-6)  # the final checkpoint against itself
    for it in (4, 8):
        assert all(-1.0 <= c < 1.0 - 1e-4 for c in table[it]), (it, table[it])
    with open(out / "activation_norm.csv") as f:
        norms = [[float(x) for x in r[1:]] for r in list(csv.reader(f))[1:]]
    assert all(n > 0 and math.isfinite(n) for row in norms for n in row)
    md = (out / "cosine.md").read_text()
    assert "| layer | iter 4 | iter 8 | iter 12 |" in md and f"| {L} |" in md
    assert png_size(out / "cosine.png") == WIDE
    assert png_size(out / "activation_norm_checkpoints.png") == panels(1)
    # A checkpoint that is not there is refused by name.
    proc = cli_here("cosine", "--checkpoints", tiny_run / "ckpt", "--out", out, "--iterations", "4,6")
    assert proc.returncode == 2 and "--iterations: no complete checkpoint for 6" in proc.stderr


def test_cosine_skips_interrupted_saves_with_a_note(tiny_run, tmp_path):
    """A crash mid-save leaves iter_* directories behind: one newer than the tracker (its save never
    completed, so Megatron never pointed the tracker at it) and one with a shard missing. Both are
    skipped, each with a note saying why; the reference stays the tracker's iteration."""
    import shutil

    save = tmp_path / "ckpt"
    shutil.copytree(tiny_run / "ckpt", save)
    shutil.copytree(save / "iter_0000012", save / "iter_0000016")
    (save / "iter_0000016" / ".metadata").unlink()
    next((save / "iter_0000008").glob("*.distcp")).unlink()
    out = tmp_path / "cosine"
    proc = cli_here("cosine", "--checkpoints", save, "--out", out, "--batch-size", "2", "--seq-length", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"note: skipping {save / 'iter_0000016'}: newer than latest_checkpointed_iteration.txt (12)" in proc.stderr
    assert f"note: skipping {save / 'iter_0000008'}: incomplete or unreadable" in proc.stderr
    with open(out / "cosine.csv") as f:
        assert [int(r[0]) for r in list(csv.reader(f))[1:]] == [4, 12]


def test_checkpoint_model_holds_the_saved_weights(tiny_run, mcore_world1):
    """The unsplit analysis model against the model-free checkpoint reader, tensor for tensor."""
    from prores_megatron.analysis.model_from_checkpoint import build_model, load_weights
    from prores_megatron.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_run / "ckpt" / "iter_0000008")
    model = build_model(ckpt.args, "cpu")
    load_weights(model, ckpt.directory)
    names = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
             "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
    for i in range(L):
        saved = ckpt.read_layer(i, [f"decoder.layers.{n}" for n in names])
        layer = model.decoder.layers[i]
        for n in names:
            assert torch.equal(layer.get_parameter(n), saved[f"decoder.layers.{n}"]), (i, n)
    assert torch.equal(model.embedding.word_embeddings.weight, ckpt.read("embedding.word_embeddings.weight"))
    assert torch.equal(model.output_layer.weight, ckpt.read("output_layer.weight"))
