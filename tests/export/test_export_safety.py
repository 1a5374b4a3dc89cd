"""The export on a shared cluster: signals, killed processes, a full disk, and its thread count.

Expectations: a signal leaves no output and no hidden staging directory and exits 128 + signum; a
SIGKILLed export's leftover is removed by the next export into the same place; a filesystem with
less room than the weights' byte count (hand-computed from the layout) is refused before writing.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_checkpoints import MID, export, it_dir

ROOT = Path(__file__).resolve().parents[2]

# The real command, with each layer slowed down so a signal lands mid-export.
SLOW_EXPORT = """
import sys, time
import prores_megatron.export.exporter as ex
from prores_megatron.export import convert_to_hf
real = ex.convert_layer
def slow(layout, i, tensors):
    time.sleep(1.0)
    return real(layout, i, tensors)
ex.convert_layer = slow
sys.exit(convert_to_hf.main(sys.argv[1:]))
"""


def start_slow_export(ckpt, out, *flags):
    return subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(ckpt), str(out), "--dtype", "float32", *flags],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def wait_for_line(proc, needle, timeout=120):
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {needle!r}: {''.join(seen)[-2000:]}")


def hidden(out: Path):
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def test_a_hangup_mid_export_cleans_up_and_says_so(runs, tmp_path):
    """A dropped SSH session: SIGHUP from outside, to the real command, mid-export."""
    ckpt = it_dir(runs["ckpt"][("A", "torch_dist")], MID)
    out = tmp_path / "hf"
    proc = start_slow_export(ckpt, out)
    wait_for_line(proc, "layer 1/4 written")
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "stopped by SIGHUP" in err and "nothing was written" in err
    assert not out.exists() and hidden(out) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_sigterm_and_ctrl_c_mid_export_clean_up(runs, tmp_path, monkeypatch, capsys, signum):
    """The same handlers for SIGTERM and SIGINT, the signal raised in this process at layer 2; a
    previous export in the same place survives."""
    import prores_megatron.export.exporter as ex
    from prores_megatron.export import convert_to_hf

    ckpt = it_dir(runs["ckpt"][("A", "torch_dist")], MID)
    out = tmp_path / "hf"
    export(ckpt, out)
    before = (out / "config.json").read_bytes()
    real = ex.convert_layer

    def signalled(layout, i, tensors):
        if i == 1:
            os.kill(os.getpid(), signum)
        return real(layout, i, tensors)

    monkeypatch.setattr(ex, "convert_layer", signalled)
    assert convert_to_hf.main([str(ckpt), str(out), "--force", "--quiet"]) == 128 + signum
    assert f"stopped by {signum.name}" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == before and hidden(out) == []


def test_a_killed_export_is_cleaned_up_by_the_next_one(runs, tmp_path):
    ckpt = it_dir(runs["ckpt"][("A", "torch_dist")], MID)
    out = tmp_path / "hf"
    proc = start_slow_export(ckpt, out)
    wait_for_line(proc, "layer 1/4 written")
    proc.kill()  # SIGKILL, as the OOM killer does: no clean-up is possible
    proc.communicate(timeout=60)
    left = hidden(out)
    assert len(left) == 1 and left[0].startswith(f".hf.partial-{proc.pid}@{socket.gethostname()}@")
    summary = export(ckpt, out)
    assert any(f"removed {out.parent / left[0]}" in line and f"pid {proc.pid}" in line for line in summary["log"])
    assert hidden(out) == [] and (out / "config.json").exists()


def test_a_signal_during_start_up_is_honoured(monkeypatch, tmp_path, capsys):
    """SIGHUP while the command imports torch (here: sent from inside that phase) stops it before
    any work instead of being swallowed by an import's blanket ``except``."""
    from prores_megatron.export import convert_to_hf

    real = convert_to_hf.build_parser

    def parser_then_hangup():
        os.kill(os.getpid(), signal.SIGHUP)
        return real()

    monkeypatch.setattr(convert_to_hf, "build_parser", parser_then_hangup)
    out = tmp_path / "hf"
    assert convert_to_hf.main([str(tmp_path / "no_checkpoint"), str(out)]) == 128 + signal.SIGHUP
    assert "stopped by SIGHUP during start-up" in capsys.readouterr().err
    assert not out.exists()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # handlers put back


def test_not_enough_free_space_is_refused_before_writing(runs, tmp_path, monkeypatch):
    from prores_megatron.export.exporter import ExportError

    ckpt = it_dir(runs["ckpt"][("A", "torch_dist")], MID)
    # Config A by hand (megatron_checkpoints.py): V = 500, hidden 64, FFN 172, 4 layers, GQA 4/2
    # (head_dim 16: q 64x64, k and v 32x64 with biases), o 64x64 + bias, biases on the MLP too,
    # two norms per layer, untied head. fp32 = 4 bytes per value.
    per_layer = (64 * 64 + 64) + 2 * (32 * 64 + 32) + (64 * 64 + 64) + 2 * (172 * 64 + 172) + (64 * 172 + 64) + 2 * 64
    weights = 4 * (500 * 64 * 2 + 64 + 4 * per_layer)
    real = __import__("shutil").disk_usage

    def fake(path, free):
        usage = real(path)
        return type(usage)(usage.total, usage.used, free)

    monkeypatch.setattr("shutil.disk_usage", lambda path: fake(path, weights))  # the weights, not the JSON
    with pytest.raises(ExportError, match=r"needs 0\.00 GB on the filesystem of .*only 0\.00 GB are free"):
        export(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and hidden(tmp_path / "hf") == []
    monkeypatch.setattr("shutil.disk_usage", lambda path: fake(path, weights + 2**20))
    summary = export(ckpt, tmp_path / "hf")
    assert summary["total_bytes"] == weights  # the planned size is the written size


def test_the_copy_loop_runs_on_its_own_thread_count(runs, tmp_path, monkeypatch):
    import prores_megatron.export.exporter as ex

    ckpt = it_dir(runs["ckpt"][("A", "torch_dist")], MID)
    seen = []
    real = ex.convert_layer
    monkeypatch.setattr(ex, "convert_layer", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    torch.set_num_threads(2)
    export(ckpt, tmp_path / "one")
    export(ckpt, tmp_path / "two", threads=2)
    assert seen == [1] * 4 + [2] * 4 and torch.get_num_threads() == 2  # restored afterwards
    with pytest.raises(ex.ExportError, match="--threads 0"):
        export(ckpt, tmp_path / "zero", threads=0)


def test_leftovers_are_judged_by_their_writer(tmp_path):
    """utils.atomic_output.clear_leftovers on hand-made staging names: a live writer on this host is
    refused by PID, another host's leftover is named and kept, a dead writer's staging is removed,
    and a previous output that a killed replacement had moved aside is put back."""
    from prores_megatron.utils.atomic_output import OutputPathError, clear_leftovers

    host = socket.gethostname()
    out = tmp_path / "hf"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live = tmp_path / f".hf.partial-{sleeper.pid}@{host}@abc"
        live.mkdir()
        with pytest.raises(OutputPathError, match=f"process {sleeper.pid} on this host is writing it"):
            clear_leftovers(out, error=OutputPathError)
        live.rmdir()
    finally:
        sleeper.kill()
        sleeper.wait()
    other = tmp_path / ".hf.partial-123@elsewhere.example@xyz"
    other.mkdir()
    stale = tmp_path / f".hf.partial-{dead.pid}@{host}@def"
    (stale / "sub").mkdir(parents=True)
    moved = tmp_path / f".hf.old-{dead.pid}@{host}@ghi"
    (moved / "hf").mkdir(parents=True)
    (moved / "hf" / "config.json").write_text("{}")
    notes = []
    clear_leftovers(out, notes.append)
    assert other.is_dir() and not stale.exists() and not moved.exists()
    assert (out / "config.json").read_text() == "{}"  # the previous output is back
    assert any(f"{other}" in n and "pid 123 on host elsewhere.example" in n for n in notes)
    assert any(f"removed {stale}" in n for n in notes) and any("restored the previous" in n for n in notes)
