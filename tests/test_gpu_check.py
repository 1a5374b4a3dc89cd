"""tools/gpu_check.py, the GPU check, kept honest on CPU: the items that need no GPU pass here, the
GPU items say SKIP (not PASS), and a failing item makes the command fail."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def test_cpu_capable_items_pass_and_gpu_items_skip():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--items", "fp32_alpha,graphs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ")[0] in ("PASS", "FAIL", "SKIP")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [ln.split(" ")[:2] for ln in lines] == [["PASS", "fp32_alpha"], ["SKIP", "graphs"]]


def test_a_failing_item_fails_the_command(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.CHECKS["kernel"] = lambda: (False, "max |fused - reference| = 0.5")

    def crash():
        raise RuntimeError("boom")

    gpu_check.CHECKS["fp32_alpha"] = crash
    assert gpu_check.main(["--allow-cpu", "--items", "kernel,fp32_alpha"]) == 1
    out = capsys.readouterr().out
    assert "FAIL kernel" in out and "FAIL fp32_alpha" in out and "RuntimeError: boom" in out
