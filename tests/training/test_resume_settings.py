"""Resuming with other ProRes settings, through Megatron-LM's real loop (tiny CPU script, world size 1).

A run of 6 iterations without ProRes, stopped after 4, is resumed (each time from a copy of its checkpoint) with
ProRes switched on, with ProRes and ``--prores-start-step 4``, and unchanged. Expectations, by hand
for linear T = 1 over L = 8 layers (alpha(l, t) = min(t / l, 1)):
- switching on at iteration 4 warns, naming the old and new values, and the largest alpha jump is
  the deepest layer's, 1 -> 4/8 = 0.5; it names --prores-start-step 4 as the way to start there;
- with --prores-start-step 4 the jump is 1 -> 0, and the model's alpha buffers (as the monitor reads
  them) at iteration i hold alpha(l, i - 1 - 4) in fp32;
- an unchanged resume says nothing; alpha is logged on the first step of every launch, whatever
  --log-interval says.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "scripts" / "pretrain_tiny_cpu.sh"
L, SAVED = 8, 4


def run(save: Path, prores: str, extra: str = "", exit_interval=None) -> str:
    env = dict(os.environ, PYTHON=sys.executable, TP="1", PP="1", TRAIN_ITERS=str(SAVED + 2), SAVE_DIR=str(save),
               PRORES_ARGS=prores)
    if exit_interval:
        env["EXIT_INTERVAL"] = str(exit_interval)
    env["EXTRA_ARGS"] = f"--save-interval {SAVED} --eval-interval 1000 --eval-iters 1 --log-interval 4 {extra}"
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_settings")
    log = run(tmp / "vanilla", "--prores-schedule none", exit_interval=SAVED)
    assert (tmp / "vanilla" / f"iter_{SAVED:07d}").is_dir()
    return tmp, log


def resumed(vanilla, name, prores, extra=""):
    tmp, _ = vanilla
    save = tmp / name
    shutil.copytree(tmp / "vanilla", save)
    return save, run(save, prores, extra)


def warning_of(log):
    lines = [line for line in log.splitlines() if line.startswith("WARNING: ProRes settings differ")]
    assert len(lines) <= 1, lines
    return lines[0] if lines else None


def test_switching_prores_on_warns_with_the_alpha_jump(vanilla):
    save, log = resumed(vanilla, "on", "--prores-schedule linear --prores-warmup-steps 1")
    warning = warning_of(log)
    assert warning is not None, log[-3000:]
    print("\n" + warning)
    assert f"iteration {SAVED}" in warning
    assert "--prores-schedule none -> linear" in warning and "--prores-warmup-steps unset -> 1" in warning
    assert "layer 8: alpha 1 -> 0.5" in warning
    assert f"pass --prores-start-step {SAVED}" in warning
    # The first step of the launch is logged although 5 is not a multiple of --log-interval 4.
    assert " [ProRes] iteration        5 | first step of this launch: schedule linear, T = 1" in log
    assert " [ProRes] iteration        6 |" not in log and " [ProRes] iteration        8 |" not in log


def test_start_step_starts_the_warmup_at_the_resume_point(vanilla):
    save, log = resumed(vanilla, "start", f"--prores-schedule linear --prores-warmup-steps 1 --prores-start-step {SAVED}",
                        extra="--prores-monitor-interval 1")
    warning = warning_of(log)
    assert f"--prores-start-step 0 -> {SAVED}" in warning and "layer 8: alpha 1 -> 0 " in warning
    assert "pass --prores-start-step" not in warning
    records = [json.loads(line) for line in (save / "prores_monitor.jsonl").read_text().splitlines()]
    layers = {r["iteration"]: r["alpha"] for r in records if r["kind"] == "layers"}
    assert sorted(layers) == [SAVED + 1, SAVED + 2]
    for iteration, alpha in layers.items():
        t = max(iteration - 1 - SAVED, 0)
        expected = [torch.tensor(min(t / l, 1.0), dtype=torch.float32).item() for l in range(1, L + 1)]
        assert alpha == expected, (iteration, alpha)
    assert "step t=0 " in log and f"--prores-start-step {SAVED} |" in log


def test_an_unchanged_resume_says_nothing(vanilla):
    _, first_log = vanilla
    _, log = resumed(vanilla, "same", "--prores-schedule none")
    assert warning_of(log) is None and warning_of(first_log) is None
    assert " [ProRes] iteration        5 | first step of this launch: schedule none" in log


def test_resume_changes_names_each_difference(monkeypatch):
    """Another T, and ProRes switched off, without a run: the message's numbers by hand."""
    from prores_megatron.training import resume_check

    saved = SimpleNamespace(prores_schedule="linear", prores_warmup_steps=2.0, prores_arch="pre")
    monkeypatch.setattr(resume_check, "_resumed_checkpoint",
                        lambda args: SimpleNamespace(args=saved, iteration=6, directory="ckpt/iter_0000006"))
    args = SimpleNamespace(num_layers=4, prores_schedule="linear", prores_warmup_steps=4.0, prores_arch="pre",
                           prores_start_step=0, load="ckpt", finetune=False)
    text = resume_check.resume_changes(args)
    # t = 6, L = 4: T = 2 gives 1, 1, 1, 0.75; T = 4 gives 1, 0.75, 0.5, 0.375: layer 3 jumps most.
    assert "--prores-warmup-steps 2 -> 4" in text and "--prores-schedule" not in text
    assert "layer 3: alpha 1 -> 0.5, deepest layer 4: alpha 0.75 -> 0.375" in text
    off = SimpleNamespace(**{**vars(args), "prores_schedule": "none", "prores_warmup_steps": None})
    text = resume_check.resume_changes(off)
    assert "--prores-schedule linear -> none" in text and "--prores-warmup-steps 2 -> unset" in text
    assert "layer 4: alpha 0.75 -> 1" in text
    same = SimpleNamespace(**{**vars(args), "prores_warmup_steps": 2.0})
    assert resume_check.resume_changes(same) is None
