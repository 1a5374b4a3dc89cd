"""Megatron's dataset-helper build on a pip-installed megatron-core, without the CPU shim: skipped
with one log line when the prebuilt helpers import, Megatron's stock behaviour (``make``, then exit
1 on the wheel, which has no Makefile) when they do not (docs/megatron.md §4, row 10)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Megatron-LM's own start-up step (initialize_megatron -> _compile_dependencies), world size 1 on
# gloo, with no CPU shim: nothing here touches CUDA.
PROGRAM = textwrap.dedent("""
    import argparse, sys
    if sys.argv[1] == "blocked":
        sys.modules["megatron.core.datasets.helpers_cpp"] = None  # the prebuilt helpers do not import
    import torch
    from prores_megatron.training import skip_helper_build_if_prebuilt
    from prores_megatron.training.cpu_shim import is_cpu_shim_installed
    from prores_megatron.utils import free_port
    torch.distributed.init_process_group("gloo", rank=0, world_size=1,
                                         init_method=f"tcp://127.0.0.1:{free_port()}")
    from megatron.training.global_vars import set_args
    from megatron.training.initialize import _compile_dependencies
    set_args(argparse.Namespace())
    print("skipped:", skip_helper_build_if_prebuilt(), "shim:", is_cpu_shim_installed(), flush=True)
    _compile_dependencies()
    print("started", flush=True)
""")


def run(mode):
    return subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_prebuilt_helpers_skip_the_build_with_one_log_line():
    proc = run("prebuilt")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "skipped: True shim: False" in out and "started" in out
    lines = [ln for ln in out.splitlines() if "dataset helpers: using the prebuilt" in ln]
    assert len(lines) == 1 and "helpers_cpp" in lines[0], out


def test_without_prebuilt_helpers_megatron_builds_them_as_stock():
    proc = run("blocked")
    assert "skipped: False shim: False" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    # Stock megatron-core: `make` in the wheel's folder finds no Makefile and Megatron exits 1.
    assert proc.returncode == 1 and "started" not in proc.stdout
    assert "dataset helpers: using the prebuilt" not in proc.stdout
    assert "Failed to compile the C++ dataset helper functions" in proc.stdout + proc.stderr
