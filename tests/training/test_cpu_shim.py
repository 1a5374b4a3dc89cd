"""The CPU shim: installs only without CUDA, core-only mode imports no megatron.training, and it
refuses (patching nothing) when a target has moved."""

import subprocess
import sys


def run(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_core_only_install_does_not_import_megatron_training():
    rc, out = run(
        "import sys, torch; from prores_megatron.training.cpu_shim import install_cpu_shim, is_cpu_shim_installed;"
        "assert install_cpu_shim(training=False) and is_cpu_shim_installed();"
        "assert 'megatron.training' not in sys.modules, 'imported megatron.training';"
        "assert torch.cuda.device_count() == 1 and not torch.cuda.is_available();"
        "t = torch.ones(2, device='cuda'); assert t.device.type == 'cpu';"
        "assert t.cuda() is t and t.type() == 'torch.cuda.FloatTensor';"
        "assert install_cpu_shim() is True and 'megatron.training' in sys.modules;"
        "import megatron.training.training as tr; assert tr.set_jit_fusion_options(1) is None;"
        "print('ok')"
    )
    assert rc == 0 and "ok" in out, out


def test_missing_target_fails_loudly_and_patches_nothing():
    rc, out = run(
        "import torch, megatron.training.training as tr; del tr.set_jit_fusion_options;"
        "orig = torch.cuda.device_count;"
        "from prores_megatron.training.cpu_shim import install_cpu_shim, is_cpu_shim_installed\n"
        "try:\n    install_cpu_shim()\nexcept RuntimeError as e:\n    print('ERR', e)\n"
        "assert torch.cuda.device_count is orig and not is_cpu_shim_installed()\n"
        "print('clean')"
    )
    assert rc == 0, out
    assert "ERR prores_megatron.training.cpu_shim: cannot patch megatron.training.training.set_jit_fusion_options" in out
    assert "targets megatron-core 0.19.2" in out and "clean" in out


def test_nothing_happens_when_cuda_is_available():
    rc, out = run(
        "import torch; torch.cuda.is_available = lambda: True; orig = torch.cuda.current_device;"
        "from prores_megatron.training.cpu_shim import install_cpu_shim, is_cpu_shim_installed;"
        "assert install_cpu_shim() is False and not is_cpu_shim_installed();"
        "assert torch.cuda.current_device is orig; print('ok')"
    )
    assert rc == 0 and "ok" in out, out
