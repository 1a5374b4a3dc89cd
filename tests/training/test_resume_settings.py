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
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prores_megatron.utils import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "scripts" / "pretrain_tiny_cpu.sh"
L, SAVED = 8, 4


def launch(save: Path, prores: str, extra: str = "", exit_interval=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, TP="1", PP="1", TRAIN_ITERS=str(SAVED + 2), SAVE_DIR=str(save),
               PRORES_ARGS=prores, MASTER_PORT=str(free_port()))
    if exit_interval:
        env["EXIT_INTERVAL"] = str(exit_interval)
    env["EXTRA_ARGS"] = f"--save-interval {SAVED} --eval-interval 1000 --eval-iters 1 --log-interval 4 {extra}"
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)


def log_of(proc: subprocess.CompletedProcess, ok: bool = True) -> str:
    log = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, log[-4000:]
    return log


@pytest.fixture(scope="module")
def vanilla(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume_settings")
    log = log_of(launch(tmp / "vanilla", "", exit_interval=SAVED))  # no --prores-* flag: ProRes off, stock
    assert (tmp / "vanilla" / f"iter_{SAVED:07d}").is_dir()
    return tmp, log


# The resumes of the vanilla checkpoint, each from its own copy: name -> (--prores-* flags, extra flags).
RESUMES = {
    "on": ("--prores-schedule linear --prores-warmup-steps 1", ""),
    "start": (f"--prores-schedule linear --prores-warmup-steps 1 --prores-start-step {SAVED}", "--prores-monitor-interval 1"),
    "same": ("", ""),
    # A trained checkpoint fine-tuned (iteration 0) with a time-dependent schedule: refused before work.
    "finetune": ("--prores-schedule linear --prores-warmup-steps 1", "--finetune"),
    "crafted": ("--prores-schedule none", ""),  # its .metadata edited first (_craft)
    "trusted": ("--prores-schedule none --prores-trust-checkpoint", ""),  # crafted too, loaded trusting it
    "vocab": ("--prores-schedule none", "--make-vocab-size-divisible-by 1024"),
}


@pytest.fixture(scope="module")
def resumes(vanilla):
    """Every resume, two at a time (each is one process on one thread): {name: (copy, process)}, and
    the marker file that the crafted checkpoint's pickle would create."""
    tmp, _ = vanilla
    for name in RESUMES:
        shutil.copytree(tmp / "vanilla", tmp / name)
    marker = _craft(tmp / "crafted", tmp / "marker")
    _craft(tmp / "trusted", tmp / "marker_trusted")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(launch, tmp / name, *flags) for name, flags in RESUMES.items()}
        return {name: (tmp / name, futures[name].result()) for name in RESUMES}, marker


def resumed(resumes, name):
    save, proc = resumes[0][name]
    return save, log_of(proc)


def warning_of(log):
    lines = [line for line in log.splitlines() if line.startswith("WARNING: ProRes settings differ")]
    assert len(lines) <= 1, lines
    return lines[0] if lines else None


def test_switching_prores_on_warns_with_the_alpha_jump(resumes):
    save, log = resumed(resumes, "on")
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


def test_start_step_starts_the_warmup_at_the_resume_point(resumes):
    save, log = resumed(resumes, "start")
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


def test_without_prores_flags_the_run_is_stock(vanilla, resumes):
    """No --prores-* flag (the vanilla run and its resume): ProRes is off, nothing of it is installed
    (no alpha lines, no coverage check, no resume check); the model is stock Megatron-LM's
    (tests/training/test_stock_spec_parity.py compares it, bit for bit, with Megatron's own build)."""
    _, first_log = vanilla
    _, log = resumed(resumes, "same")
    for text in (first_log, log):
        assert "ProRes: off (no --prores-schedule): the stock Megatron-LM model and loop" in text
        assert "[ProRes]" not in text and "coverage check" not in text and warning_of(text) is None
    assert re.search(r"iteration\s+4/\s+6 \|.*lm loss", first_log)  # it trained (--log-interval 4)


def test_fine_tuning_with_a_warmup_is_refused_before_training(resumes):
    """--finetune on the vanilla checkpoint with linear: exit 2 before distributed initialisation,
    naming the flags and both choices; nothing is written to the checkpoint directory."""
    save, proc = resumes[0]["finetune"]
    log = log_of(proc, ok=False)
    assert proc.returncode != 0 and "error: --prores-schedule linear with --finetune (loading" in log, log[-3000:]
    assert "--prores-schedule none" in log and "--prores-rewarm-pretrained" in log
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(SAVED)
    assert "iteration        1/" not in log


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


class _TouchMarker:
    """Unpickling this runs ``touch <marker>`` (through os.system) under plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _craft(save: Path, marker: Path) -> Path:
    """Make the copy's .metadata carry a pickle that would run ``touch marker``."""
    import pickle

    metadata = save / f"iter_{SAVED:07d}" / ".metadata"
    with open(metadata, "rb") as f:
        md = pickle.load(f)  # our own checkpoint, just written: trusted
    md.storage_meta.modules = ["model", _TouchMarker(marker)]
    with open(metadata, "wb") as f:
        pickle.dump(md, f)
    return marker


def test_resuming_a_crafted_checkpoint_runs_no_code(resumes):
    """Megatron-LM's own load_checkpoint runs under the allow-list: a .metadata whose pickle calls
    os.system stops the run on every rank, naming the global, and the command never runs."""
    (_, proc), marker = resumes[0]["crafted"], resumes[1]
    log = log_of(proc, ok=False)
    assert f"{os.system.__module__}.system" in log and "UnsafePickleError" in log, log[-3000:]
    assert "--prores-trust-checkpoint" in log  # the refusal names the way to load a checkpoint one trusts
    assert not marker.exists()


def test_a_trusted_checkpoint_loads_without_the_allow_list(resumes):
    """--prores-trust-checkpoint: Megatron-LM's load_checkpoint unpickles without the allow-list, and the
    start-up log says so loudly. Shown on a crafted copy: its pickle's command does run."""
    save, proc = resumes[0]["trusted"]
    log = proc.stdout + proc.stderr
    assert "WARNING: ProRes: --prores-trust-checkpoint: checkpoints are unpickled WITHOUT the allow-list" in log
    assert "UnsafePickleError" not in log
    assert (save.parent / "marker_trusted").exists(), log[-3000:]


def test_a_resume_that_pads_the_vocabulary_differently_is_refused(resumes):
    """The vanilla run's vocabulary (511 tokens) is padded to 512 rows (a multiple of 128 x TP 1).
    Resumed with --make-vocab-size-divisible-by 1024 it would pad to 1024, and Megatron would load
    the checkpoint without a word (measured at TP 1 -> TP 2 with 100 tokens, 128 -> 256 rows: loss 4.23
    at the save, 4.63 one step later; docs/megatron.md §7). The run refuses, naming the two paddings
    and a --make-vocab-size-divisible-by that keeps 512 rows (128: ceil(511 / 128) x 128 = 512)."""
    log = log_of(resumes[0]["vocab"][1], ok=False)
    assert ("refusing to resume: the checkpoint being resumed" in log and "padded to 512 rows" in log
            and "pads the 511-token vocabulary to 1024" in log), log[-3000:]
    # That the suggestion reproduces the saved padding is also checked by hand below, against
    # Megatron-LM's own padding function.
    assert "Pass --make-vocab-size-divisible-by 128 to keep the saved padding at TP 1" in log


def test_the_vocab_padding_refusal_has_an_escape_flag(vanilla, capsys):
    """The hook itself, on the vanilla run's checkpoint (vocabulary 511 padded to 512): a run that
    would pad to 1024 is refused, or, with --prores-allow-vocab-padding-change, warned about."""
    from prores_megatron.training.resume_check import resume_check_hook

    tmp, _ = vanilla
    args = SimpleNamespace(load=str(tmp / "vanilla"), ckpt_step=None, finetune=False, num_layers=L,
                           prores_schedule="none", prores_warmup_steps=None, prores_arch="pre", prores_start_step=0,
                           padded_vocab_size=1024, make_vocab_size_divisible_by=1024, tensor_model_parallel_size=1,
                           vocab_size=511, prores_allow_vocab_padding_change=False)
    with pytest.raises(ValueError, match="refusing to resume: .* padded to 512 rows .* to 1024"):
        resume_check_hook(args)([])
    args.prores_allow_vocab_padding_change = True
    assert resume_check_hook(args)([]) == []
    assert "WARNING: the checkpoint being resumed" in capsys.readouterr().out
    args.padded_vocab_size = 512
    assert resume_check_hook(args)([]) == []


@pytest.mark.parametrize("vocab, saved, tp, expected", [
    (32000, (32000, 128, 2), 4, "Pass --make-vocab-size-divisible-by 64 "),  # Llama-2: 32000 = 125 x 256
    (32000, (32000, 128, 2), 2, None),                                       # same layout: nothing to say
    (50257, (50304, 128, 1), 8, "Pass --make-vocab-size-divisible-by 16 "),  # GPT-2: 50304 = 393 x 128
    (101, (128, 128, 1), 3, "No --make-vocab-size-divisible-by gives 128 rows at TP 3"),
])
def test_vocab_padding_change_by_hand(vocab, saved, tp, expected):
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    from prores_megatron.training.resume_check import vocab_padding_change

    padded, div, s_tp = saved
    ckpt = SimpleNamespace(directory="CKPT", args=SimpleNamespace(padded_vocab_size=padded,
                           make_vocab_size_divisible_by=div, tensor_model_parallel_size=s_tp))
    now = calculate_padded_vocab_size(vocab, 128, tp, logging_enabled=False)
    args = SimpleNamespace(padded_vocab_size=now, make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp)
    text = vocab_padding_change(args, ckpt, vocab)
    assert (text is None) == (expected is None)
    if expected:
        assert expected in text and f"padded to {padded} rows" in text
